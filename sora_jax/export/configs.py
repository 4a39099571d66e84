"""The twins' ``config.json`` values from the JAX models' config dataclasses (the one translation)."""

from __future__ import annotations

from sora_jax.models.dit import DiTConfig
from sora_jax.models.vae import VAEConfig
from sora_jax.text.encoder import TextEncoderConfig


def transformer_config(cfg: DiTConfig) -> dict:
    """``SoraTransformer3DModel`` kwargs of a DiT."""
    return {
        "in_channels": cfg.in_channels,
        "patch_size": list(cfg.patch_size),
        "width": cfg.width,
        "depth": cfg.depth,
        "num_heads": cfg.num_heads,
        "text_dim": cfg.text_dim,
        "mlp_ratio": float(cfg.mlp_ratio),
        "qk_norm": bool(cfg.qk_norm),
        "rope_theta": float(cfg.rope_theta),
        "pooled_text_cond": bool(cfg.pooled_text_cond),
        "pos_embed": str(cfg.pos_embed),
        "out_conv": int(cfg.out_conv),
    }


def text_encoder_config(cfg: TextEncoderConfig) -> dict:
    """``SoraTextEncoder`` kwargs of the trainable text encoder."""
    return {
        "vocab_size": cfg.vocab_size,
        "max_length": cfg.max_length,
        "width": cfg.width,
        "depth": cfg.depth,
        "num_heads": cfg.num_heads,
        "mlp_ratio": float(cfg.mlp_ratio),
        "rope_theta": float(cfg.rope_theta),
    }


def vae_config(cfg: VAEConfig, shift: float = 0.0, scale: float = 1.0) -> dict:
    """``SoraVideoVAE`` kwargs of a VAE whose latents the DiT sees as ``(mean - shift) / scale``."""
    return {
        "in_channels": cfg.in_channels,
        "latent_channels": cfg.latent_channels,
        "base_width": cfg.base_width,
        "width_mults": list(cfg.width_mults),
        "temporal_down": [bool(t) for t in cfg.temporal_down],
        "num_res_blocks": cfg.num_res_blocks,
        "shift_factor": float(shift),
        "scaling_factor": float(1.0 / scale),
    }
