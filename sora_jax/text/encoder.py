"""Text encoders: the ``TextEncoder`` protocol and ``TrainableTextEncoder`` (trained with the DiT).

Owns: ``TextEncoderConfig`` and ``TrainableTextEncoder`` (token embedding, 1D RoPE, ``depth`` pre-norm
transformer layers with key-masked self-attention, final RMSNorm; outputs at padding positions are zero), and
the ``Tokenizer`` / ``TextEncoder`` protocols that pretrained encoders (T5, MiniLM) implement to plug in.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Sequence
from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax.models.layers import (
    ATTENTION_IMPLEMENTATIONS,
    Attention,
    Mlp,
    RMSNorm,
    as_dtype,
    rope_1d_angles,
)
from sora_jax.parallel.sharding import constrain
from sora_jax.text.tokenizer import HashWordTokenizer


@runtime_checkable
class Tokenizer(Protocol):
    vocab_size: int
    max_length: int

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """B strings -> ids int32 ``[B, L]``, mask bool ``[B, L]`` (True = real token)."""
        ...


@runtime_checkable
class TextEncoder(Protocol):
    """A text encoder the DiT can cross-attend to: its tokenizer, its width and ids/mask -> features."""

    output_dim: int

    @property
    def tokenizer(self) -> Tokenizer: ...

    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """ids int32 ``[B, L]``, mask bool ``[B, L]`` -> features ``[B, L, output_dim]``."""
        ...


@dataclasses.dataclass(frozen=True)
class TextEncoderConfig:
    vocab_size: int
    max_length: int
    width: int
    depth: int
    num_heads: int
    dtype: str | jnp.dtype = "float32"
    param_dtype: str | jnp.dtype = "float32"
    mlp_ratio: float = 4.0
    rope_theta: float = 10000.0
    attention_impl: str | None = None

    def __post_init__(self):
        if self.width % self.num_heads or (self.width // self.num_heads) % 2:
            raise ValueError(
                f"TextEncoderConfig: width {self.width} / num_heads {self.num_heads} must be an even integer"
            )
        if min(self.vocab_size, self.max_length, self.width, self.depth) < 1:
            raise ValueError("TextEncoderConfig: vocab_size, max_length, width, depth must be positive")
        if self.attention_impl is not None and self.attention_impl not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(f"TextEncoderConfig.attention_impl={self.attention_impl!r} unknown")
        for key in ("dtype", "param_dtype"):
            jnp.dtype(getattr(self, key))


class TextLayer(nnx.Module):
    """Pre-norm transformer layer: x += Attn(RMSNorm(x)) (key-masked, RoPE); x += Mlp(RMSNorm(x))."""

    def __init__(self, cfg: TextEncoderConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.norm1 = RMSNorm(cfg.width, param_dtype=cfg.param_dtype, rngs=rngs)
        self.attn = Attention(
            cfg.width, cfg.num_heads, qk_norm=False, implementation=cfg.attention_impl, **kw
        )
        self.norm2 = RMSNorm(cfg.width, param_dtype=cfg.param_dtype, rngs=rngs)
        self.mlp = Mlp(cfg.width, int(cfg.width * cfg.mlp_ratio), **kw)

    def __call__(self, x: jax.Array, mask: jax.Array, rope: tuple[jax.Array, jax.Array]) -> jax.Array:
        """x ``[B, L, D]``, key mask ``[B, L]`` -> ``[B, L, D]``."""
        x = x + self.attn(self.norm1(x), mask=mask, rope=rope)
        x = x + self.mlp(self.norm2(x))
        return constrain(x, ("act_batch", "act_text", "act_embed"))


class TrainableTextEncoder(nnx.Module):
    """ids ``[B, L]`` + mask ``[B, L]`` -> features ``[B, L, width]`` (zero at padding)."""

    def __init__(self, cfg: TextEncoderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.output_dim = cfg.width
        self.embed = nnx.Embed(
            cfg.vocab_size,
            cfg.width,
            embedding_init=nnx.with_partitioning(nnx.initializers.normal(0.02), ("vocab", "embed")),
            dtype=as_dtype(cfg.dtype),
            param_dtype=as_dtype(cfg.param_dtype),
            rngs=rngs,
        )

        @nnx.split_rngs(splits=cfg.depth)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_layers(r: nnx.Rngs) -> TextLayer:
            return TextLayer(cfg, rngs=r)

        self.layers = make_layers(rngs)
        self.final_norm = RMSNorm(cfg.width, param_dtype=cfg.param_dtype, rngs=rngs)

    @property
    def tokenizer(self) -> HashWordTokenizer:
        return HashWordTokenizer(self.cfg.vocab_size, self.cfg.max_length)

    def __call__(self, ids: jax.Array, mask: jax.Array) -> jax.Array:
        cfg = self.cfg
        if ids.ndim != 2 or mask.shape != ids.shape:
            raise ValueError(f"TrainableTextEncoder wants ids and mask [B, L]; got {ids.shape}, {mask.shape}")
        mask = mask.astype(jnp.bool_)
        x = self.embed(ids).astype(as_dtype(cfg.dtype))  # [B, L, D]
        x = constrain(x, ("act_batch", "act_text", "act_embed"))
        rope = rope_1d_angles(ids.shape[1], cfg.width // cfg.num_heads, cfg.rope_theta)
        graphdef, state = nnx.split(self.layers)

        def body(h: jax.Array, layer_state) -> tuple[jax.Array, None]:
            return nnx.merge(graphdef, layer_state)(h, mask, rope), None

        x, _ = jax.lax.scan(body, x, state)
        return self.final_norm(x) * mask[..., None].astype(x.dtype)
