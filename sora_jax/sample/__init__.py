"""Samplers (the pmap evaluation sampler) and video writers (MP4, GIF, contact sheets)."""
