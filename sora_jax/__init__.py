"""sora_jax: Sora-style text-to-video in JAX/Flax (NNX)."""

__version__ = "0.1.0"
