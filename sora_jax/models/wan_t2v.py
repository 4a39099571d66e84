"""Wan 2.1 behind this codebase's interfaces: the ``TextToVideo`` contract samplers and the trainer call, and
the ``Autoencoder`` contract over Wan's VAE.

Owns:
- ``WanTextToVideo``: ``encode_text`` passes the frozen UMT5 features through (Wan's own text projection,
  ``text_embedder``, is inside the transformer), ``denoise`` calls ``WanTransformer`` with the model time.
- ``WanVAECodec``: ``AutoencoderKLWan`` as an ``Autoencoder`` over the latents the transformer sees, normalised
  per channel with the VAE's ``latents_mean`` / ``latents_std`` as ``WanPipeline`` does; coding runs in
  diffusers' causal chunks (``encode_chunked`` / ``decode_chunked``), the posterior mean on encode.

Time and target: our rectified flow is ``x_t = (1 - t) x0 + t noise`` with velocity target ``noise - x0`` and
model time ``1000 t`` (``sora_jax.diffusion.flow``). Diffusers' Wan schedulers (``UniPCMultistepScheduler``
with ``prediction_type="flow_prediction"``, ``FlowMatchEulerDiscreteScheduler``) noise as
``sigma noise + (1 - sigma) x0``, feed the transformer ``timestep = 1000 sigma`` and step with
``x0 = x_t - sigma v``, i.e. ``v = noise - x0``: the same time, scale and sign, so Wan's output is our
velocity with no conversion.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sora_jax.models.wan_transformer import WanConfig, WanTransformer
from sora_jax.models.wan_vae import (
    WanVAE,
    WanVAEConfig,
    decode_chunked,
    denormalize_latents,
    encode_chunked,
    normalize_latents,
)


class WanTextToVideo(nnx.Module):
    """The Wan 2.1 transformer as a text-to-video model: input frozen UMT5 features ``[B, L, text_dim]``
    (zero at padding, as ``WanPipeline`` pads them), no trainable adapter; parameters under ``transformer``."""

    def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs):
        self.transformer = WanTransformer(cfg, rngs=rngs)

    @property
    def patch_size(self) -> tuple[int, int, int]:
        """The transformer's (t, h, w) patch over latent frames."""
        return tuple(self.transformer.cfg.patch_size)

    def encode_text(self, emb: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """emb float ``[B, L, F]`` (frozen features), mask bool ``[B, L]`` -> the same (ctx, mask)."""
        if emb.ndim != 3:
            raise ValueError(
                f"WanTextToVideo takes frozen text features [B, L, F], got shape {emb.shape} "
                "(config.text.encoder must be 't5', the UMT5 folder)"
            )
        return emb, mask

    def denoise(self, x_t: jax.Array, t: jax.Array, ctx: jax.Array, mask: jax.Array) -> jax.Array:
        """x_t ``[B, T, H, W, C]``, t ``[B]`` model time in [0, 1000], ctx ``[B, L, F]`` -> velocity like x_t.

        ``mask`` is unused: Wan 2.1 attends to every text position, the zero padding included (as diffusers).
        Per-frame times ``[B, T]`` (frame conditioning) raise: Wan 2.1 embeds one time per sample."""
        if t.ndim != 1:
            raise ValueError(
                f"Wan 2.1 takes one time per sample [B], got times of shape {t.shape}: per-frame times "
                "(frame conditioning: i2v, extend, connect) are not supported by this model"
            )
        return self.transformer(x_t, t, ctx).astype(x_t.dtype)

    def __call__(self, x_t: jax.Array, t: jax.Array, emb: jax.Array, mask: jax.Array) -> jax.Array:
        """x_t ``[B, T, H, W, C]``, t ``[B]``, emb ``[B, L, F]``, mask ``[B, L]`` -> ``[B, T, H, W, C]``."""
        ctx, mask = self.encode_text(emb, mask)
        return self.denoise(x_t, t, ctx, mask)


class WanVAECodec:
    """Wan 2.1's VAE as an ``Autoencoder``: videos ``[B, 1 + 4k, H, W, 3]`` in [-1, 1] <-> normalised latents
    ``[B, 1 + k, H/8, W/8, 16]``. Built without weights (``params`` None, shapes only) from its config;
    ``with_params`` binds them (``sora_jax.loading.load_autoencoder``, or tracers inside a jitted caller)."""

    def __init__(self, graphdef: nnx.GraphDef, params: nnx.State | None, cfg: WanVAEConfig):
        self.graphdef, self.params, self.cfg = graphdef, params, cfg
        self.latent_channels = cfg.z_dim
        self.temporal_downsample = cfg.temporal_downsample
        self.spatial_downsample = cfg.spatial_downsample

    @classmethod
    def from_config(cls, cfg: WanVAEConfig) -> WanVAECodec:
        """The codec of ``cfg`` without weights (no memory allocated)."""
        graphdef, _ = nnx.split(nnx.eval_shape(lambda: WanVAE(cfg, rngs=nnx.Rngs(0))))
        return cls(graphdef, None, cfg)

    def with_params(self, params: nnx.State | None) -> WanVAECodec:
        return WanVAECodec(self.graphdef, params, self.cfg)

    def _model(self) -> WanVAE:
        if self.params is None:
            raise ValueError(
                "this WanVAECodec has no weights (shapes only): use sora_jax.loading.load_autoencoder"
            )
        return nnx.merge(self.graphdef, self.params)

    def latent_shape(self, T: int, H: int, W: int) -> tuple[int, int, int, int]:
        f, s = self.temporal_downsample, self.spatial_downsample
        if T < 1 or (T - 1) % f or H % s or W % s:
            raise ValueError(f"the Wan VAE codes 1 + {f}k frames of sizes divisible by {s}; got {T}x{H}x{W}")
        return (1 + (T - 1) // f, H // s, W // s, self.latent_channels)

    def encode(self, video: jax.Array) -> jax.Array:
        """video float32 ``[B, T, H, W, 3]`` in [-1, 1] -> normalised posterior means ``[B, T', H', W', Z]``."""
        z = encode_chunked(self._model(), jnp.asarray(video, jnp.float32)).mean
        return normalize_latents(z.astype(jnp.float32), self.cfg)

    def decode(self, latents: jax.Array) -> jax.Array:
        """normalised latents ``[B, T', H', W', Z]`` -> video float32 ``[B, T, H, W, 3]`` in [-1, 1]."""
        z = denormalize_latents(jnp.asarray(latents, jnp.float32), self.cfg)
        return decode_chunked(self._model(), z).astype(jnp.float32)
