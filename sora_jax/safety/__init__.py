"""Safeguards: watermark, provenance, prompt policy."""
