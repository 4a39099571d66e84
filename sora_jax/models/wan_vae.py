"""The Wan 2.1 video VAE (diffusers' ``AutoencoderKLWan``) in Flax NNX, channels-last.

Owns: ``WanVAEConfig`` (the Wan 2.1 preset by default, with its per-channel ``latents_mean`` /
``latents_std``), the modules (``CausalConv3d``, ``Conv2d``, ``WanRMSNorm``, ``ResidualBlock``,
``AttentionBlock``, ``Resample``, ``MidBlock``, ``UpBlock``, ``WanEncoder``, ``WanDecoder``, ``WanVAE``), the
diagonal Gaussian ``WanPosterior``, chunked coding with explicit caches (``encode_chunked`` /
``decode_chunked``) and the pipeline's latent normalisation (``normalize_latents`` / ``denormalize_latents``).
Weight conversion from and to diffusers folders lives in ``wan_vae_convert.py``.

What diffusers computes (``AutoencoderKLWan.encode`` / ``decode``, also with ``enable_tiling`` as long as the
video is at most 256 x 256 pixels, past which it blends spatial tiles, not done here): the encoder sees the
first frame alone, then chunks of 4 frames, each causal conv continuing from a cache of the last 2 frames of
its input (``_feat_map``, ``CACHE_T = 2``); the decoder sees one latent frame at a time the same way and clips
the video to [-1, 1]. That chunked computation equals one causal pass over the whole video where

- every time-kernel-3 conv pads the past with 2 zero frames (the cache replaces them in later chunks);
- a temporal downsample (``downsample3d``) passes frame 0 through untouched and runs its stride-2 time conv
  (no padding) over frames (0, 1, 2), (2, 3, 4), ...: ``1 + 2m -> 1 + m`` frames;
- a temporal upsample (``upsample3d``) passes frame 0 through untouched and runs its time conv (zero-padded,
  2C output channels, interleaved into two frames each) over frames 1..m: ``1 + m -> 1 + 2m`` frames;
- norms (L2 over channels) and attention (over the pixels of one frame) never mix frames.

``WanVAE.encode`` / ``decode`` run that full pass; ``encode_chunked`` / ``decode_chunked`` run diffusers' chunks
(jitted per chunk, caches as a list of arrays passed in and returned) and equal it to float32 rounding.

Layouts: videos ``[B, T, H, W, 3]`` in [-1, 1] with ``T = 1 + 4k``; latents ``[B, 1 + k, H/8, W/8, 16]``.
"""

from __future__ import annotations

import dataclasses
import math
from typing import NamedTuple

import jax
import jax.numpy as jnp
from flax import nnx

from sora_jax.models.layers import as_dtype, dot_product_attention
from sora_jax.models.vae import CausalCaches, conv3d_params, conv3d_valid_time

# fmt: off
WAN21_LATENTS_MEAN = (-0.7571, -0.7089, -0.9113, 0.1075, -0.1745, 0.9653, -0.1517, 1.5508,
                      0.4134, -0.0715, 0.5517, -0.3632, -0.1922, -0.9497, 0.2503, -0.2921)
WAN21_LATENTS_STD = (2.8184, 1.4541, 2.3275, 2.6558, 1.2196, 1.7708, 2.6052, 2.0743,
                     3.2687, 2.1526, 2.8652, 1.5579, 1.6382, 1.1253, 2.8251, 1.9160)
# fmt: on


@dataclasses.dataclass(frozen=True)
class WanVAEConfig:
    """diffusers' ``AutoencoderKLWan`` config (its field names, ``temperal`` spelling included); defaults are
    Wan 2.1's VAE (126.9M parameters, 8x spatial / 4x temporal, 16 latent channels). ``attn_scales`` builds
    attention blocks into the encoder as diffusers does, but diffusers' own encoder cannot run them (it passes
    them the cache), so that option has no reference; Wan 2.1 has none."""

    base_dim: int = 96
    decoder_base_dim: int | None = None
    z_dim: int = 16
    dim_mult: tuple[int, ...] = (1, 2, 4, 4)
    num_res_blocks: int = 2
    attn_scales: tuple[float, ...] = ()
    temperal_downsample: tuple[bool, ...] = (False, True, True)
    in_channels: int = 3
    out_channels: int = 3
    latents_mean: tuple[float, ...] = WAN21_LATENTS_MEAN
    latents_std: tuple[float, ...] = WAN21_LATENTS_STD
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        for name in ("dim_mult", "attn_scales", "temperal_downsample", "latents_mean", "latents_std"):
            cast = {"dim_mult": int, "temperal_downsample": bool}.get(name, float)
            object.__setattr__(self, name, tuple(cast(v) for v in getattr(self, name)))
        if len(self.temperal_downsample) != len(self.dim_mult) - 1:
            raise ValueError(
                f"WanVAEConfig: temperal_downsample has {len(self.temperal_downsample)} entries, needs "
                f"len(dim_mult) - 1 = {len(self.dim_mult) - 1}"
            )
        if len(self.latents_mean) != self.z_dim or len(self.latents_std) != self.z_dim:
            raise ValueError(
                f"WanVAEConfig: latents_mean / latents_std have {len(self.latents_mean)} / "
                f"{len(self.latents_std)} entries, need z_dim = {self.z_dim}"
            )

    @property
    def temporal_downsample(self) -> int:
        return 2 ** sum(self.temperal_downsample)

    @property
    def spatial_downsample(self) -> int:
        return 2 ** (len(self.dim_mult) - 1)


# ---------------------------------------------------------------------------------------------- layers


class CausalConv3d(nnx.Module):
    """``WanCausalConv3d``: kernel ``[kt, kh, kw, Cin, Cout]``, zero 'same' padding in space; in time the
    input must already carry its past (``__call__``) or gets it from the cache / zeros (``causal``)."""

    def __init__(self, cin, cout, kernel=3, stride=1, *, dtype="float32", param_dtype="float32", rngs):
        kernel = (kernel,) * 3 if isinstance(kernel, int) else tuple(kernel)
        stride = (stride,) * 3 if isinstance(stride, int) else tuple(stride)
        self.kernel, self.bias = conv3d_params(cin, cout, kernel, param_dtype, rngs)
        self.kernel_size, self.stride, self.dtype = kernel, stride, as_dtype(dtype)

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[B, T, H, W, Cin]`` -> ``[B, (T - kt) // st + 1, H', W', Cout]`` (valid in time)."""
        kt, kh, kw = self.kernel_size
        st, sh, sw = self.stride
        x = x.astype(self.dtype)
        pad = ((kh // 2, kh // 2), (kw // 2, kw // 2))
        y = conv3d_valid_time(x, self.kernel[...].astype(self.dtype), self.stride, pad)
        return y + self.bias[...].astype(self.dtype)

    def causal(self, x: jax.Array, caches: CausalCaches) -> jax.Array:
        """The chunk x ``[B, T, H, W, Cin]`` after its past (the cache, or ``kt - 1`` zero frames at the
        start): ``[B, T, H, W, Cout]``; caches the last ``kt - 1`` frames of that padded input."""
        p = self.kernel_size[0] - 1
        if p == 0:
            return self(x)
        past = caches.take()
        if past is None:
            past = jnp.zeros((x.shape[0], p, *x.shape[2:]), x.dtype)
        x = jnp.concatenate([past.astype(x.dtype), x], axis=1)
        caches.put(x[:, x.shape[1] - p :])
        return self(x)


class Conv2d(nnx.Module):
    """A per-frame 2D conv (diffusers' ``nn.Conv2d``): kernel ``[kh, kw, Cin, Cout]``."""

    def __init__(self, cin, cout, kernel=3, *, dtype="float32", param_dtype="float32", rngs):
        init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=(0, 1, 2))
        pd = as_dtype(param_dtype)
        self.kernel = nnx.Param(
            nnx.with_partitioning(init, (None, None, "conv_in", "conv_out"))(
                rngs.params(), (kernel, kernel, cin, cout), pd
            )
        )
        self.bias = nnx.Param(jnp.zeros((cout,), pd))
        self.dtype = as_dtype(dtype)

    def __call__(self, x: jax.Array, stride: int = 1, padding=None) -> jax.Array:
        """x ``[..., H, W, Cin]`` -> ``[..., H', W', Cout]``; ``padding`` default 'same' (k // 2 each side)."""
        k = self.kernel.shape[0]
        x = x.astype(self.dtype)
        kernel = self.kernel[...].astype(self.dtype)
        if k == 1 and stride == 1:
            y = jnp.einsum("...c,cd->...d", x, kernel[0, 0])
        else:
            padding = ((k // 2, k // 2),) * 2 if padding is None else padding
            lead, (H, W, C) = x.shape[:-3], x.shape[-3:]
            y = jax.lax.conv_general_dilated(
                x.reshape(-1, H, W, C),
                kernel,
                (stride, stride),
                padding,
                dimension_numbers=("NHWC", "HWIO", "NHWC"),
            )
            y = y.reshape(*lead, *y.shape[1:])
        return y + self.bias[...].astype(self.dtype)


class WanRMSNorm(nnx.Module):
    """diffusers' ``WanRMS_norm``: ``x / max(||x||_2, 1e-12) * sqrt(C) * gamma`` over channels (no bias in
    the VAE), float32 inside. ``gamma`` ``[C]`` (diffusers: ``[C, 1, 1, 1]``, or ``[C, 1, 1]`` in attention)."""

    def __init__(self, dim: int, *, param_dtype="float32"):
        init = nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",))
        self.gamma = nnx.Param(init(jax.random.key(0), (dim,), as_dtype(param_dtype)))

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[..., C]`` -> ``[..., C]`` in x's dtype."""
        xf = x.astype(jnp.float32)
        norm = jnp.sqrt(jnp.sum(jnp.square(xf), axis=-1, keepdims=True))
        y = xf / jnp.maximum(norm, 1e-12) * math.sqrt(x.shape[-1]) * self.gamma[...].astype(jnp.float32)
        return y.astype(x.dtype)


def _kw(cfg: WanVAEConfig, rngs: nnx.Rngs) -> dict:
    return dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)


class ResidualBlock(nnx.Module):
    """``x -> conv_shortcut(x) + conv2(silu(norm2(conv1(silu(norm1(x))))))`` (dropout: inference, none)."""

    def __init__(self, cin: int, cout: int, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
        self.norm1 = WanRMSNorm(cin, param_dtype=cfg.param_dtype)
        self.conv1 = CausalConv3d(cin, cout, 3, **_kw(cfg, rngs))
        self.norm2 = WanRMSNorm(cout, param_dtype=cfg.param_dtype)
        self.conv2 = CausalConv3d(cout, cout, 3, **_kw(cfg, rngs))
        self.conv_shortcut = CausalConv3d(cin, cout, 1, **_kw(cfg, rngs)) if cin != cout else None

    def __call__(self, x: jax.Array, caches: CausalCaches) -> jax.Array:
        """x ``[B, T, H, W, Cin]`` -> ``[B, T, H, W, Cout]``."""
        h = x if self.conv_shortcut is None else self.conv_shortcut(x)
        x = self.conv1.causal(jax.nn.silu(self.norm1(x)), caches)
        x = self.conv2.causal(jax.nn.silu(self.norm2(x)), caches)
        return x + h


class AttentionBlock(nnx.Module):
    """Single-head self-attention over the pixels of each frame, residual (``WanAttentionBlock``)."""

    def __init__(self, dim: int, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
        self.norm = WanRMSNorm(dim, param_dtype=cfg.param_dtype)
        self.to_qkv = Conv2d(dim, 3 * dim, 1, **_kw(cfg, rngs))
        self.proj = Conv2d(dim, dim, 1, **_kw(cfg, rngs))

    def __call__(self, x: jax.Array, caches: CausalCaches | None = None) -> jax.Array:
        """x ``[B, T, H, W, C]`` -> ``[B, T, H, W, C]``."""
        B, T, H, W, C = x.shape
        q, k, v = jnp.split(self.to_qkv(self.norm(x)).reshape(B * T, H * W, 1, 3 * C), 3, axis=-1)
        o = dot_product_attention(q, k, v).reshape(B, T, H, W, C)
        return x + self.proj(o)


class Resample(nnx.Module):
    """``WanResample``. Down: zero pad right/bottom, 3x3 stride-2 conv; with ``temporal`` then the stride-2
    time conv (frame 0 passes through at the start). Up: with ``temporal`` first the time conv to 2C
    channels interleaved into 2 frames (frame 0 passes through at the start); then nearest x2 and a 3x3 conv
    to ``out_dim`` (default ``dim // 2``, Wan 2.1's decoder)."""

    def __init__(self, dim: int, cfg: WanVAEConfig, *, up: bool, temporal: bool, rngs: nnx.Rngs):
        self.up = up
        self.resample = Conv2d(dim, dim // 2 if up else dim, 3, **_kw(cfg, rngs))
        cout, stride = (2 * dim, 1) if up else (dim, (2, 1, 1))
        self.time_conv = CausalConv3d(dim, cout, (3, 1, 1), stride, **_kw(cfg, rngs)) if temporal else None

    def __call__(self, x: jax.Array, caches: CausalCaches) -> jax.Array:
        """x ``[B, T, H, W, C]`` -> up ``[B, T', 2H, 2W, C/2]`` / down ``[B, T', H/2, W/2, C]``."""
        if self.up:
            if self.time_conv is not None:
                x = self._time_up(x, caches)
            B, T, H, W, C = x.shape
            x = jnp.broadcast_to(x[:, :, :, None, :, None], (B, T, H, 2, W, 2, C)).reshape(
                B, T, 2 * H, 2 * W, C
            )
            return self.resample(x)
        x = self.resample(x, stride=2, padding=((0, 1), (0, 1)))
        return x if self.time_conv is None else self._time_down(x, caches)

    def _time_up(self, x: jax.Array, caches: CausalCaches) -> jax.Array:
        past, head = caches.take(), None
        if past is None:  # diffusers' "Rep": frame 0 untouched, the time conv starts at frame 1 from zeros
            head, x = x[:, :1], x[:, 1:]
            past = jnp.zeros((x.shape[0], 2, *x.shape[2:]), x.dtype)
        xp = jnp.concatenate([past.astype(x.dtype), x], axis=1)
        caches.put(xp[:, xp.shape[1] - 2 :])
        if x.shape[1]:
            B, T, H, W, C = x.shape
            y = self.time_conv(xp).reshape(B, T, H, W, 2, C)
            x = jnp.moveaxis(y, 4, 2).reshape(B, 2 * T, H, W, C)
        return x if head is None else jnp.concatenate([head, x.astype(head.dtype)], axis=1)

    def _time_down(self, x: jax.Array, caches: CausalCaches) -> jax.Array:
        past, head = caches.take(), None
        if past is None:  # the first frame passes through; windows (0, 1, 2), (2, 3, 4), ...
            head, xp = x[:, :1], x
        else:
            xp = jnp.concatenate([past.astype(x.dtype), x], axis=1)
        caches.put(x[:, x.shape[1] - 1 :])
        if xp.shape[1] < 3:
            return head
        y = self.time_conv(xp)
        return y if head is None else jnp.concatenate([head, y.astype(head.dtype)], axis=1)


class MidBlock(nnx.Module):
    """``WanMidBlock``: residual, attention, residual at constant width."""

    def __init__(self, dim: int, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
        self.resnets = nnx.List([ResidualBlock(dim, dim, cfg, rngs=rngs) for _ in range(2)])
        self.attentions = nnx.List([AttentionBlock(dim, cfg, rngs=rngs)])

    def __call__(self, x: jax.Array, caches: CausalCaches) -> jax.Array:
        x = self.resnets[0](x, caches)
        return self.resnets[1](self.attentions[0](x), caches)


class UpBlock(nnx.Module):
    """``WanUpBlock``: ``num_res_blocks + 1`` residual blocks, then an optional upsampler."""

    def __init__(self, cin, cout, cfg: WanVAEConfig, *, upsample: bool, temporal: bool, rngs: nnx.Rngs):
        dims = [cin] + [cout] * (cfg.num_res_blocks + 1)
        self.resnets = nnx.List([ResidualBlock(a, b, cfg, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])
        self.upsamplers = (
            nnx.List([Resample(cout, cfg, up=True, temporal=temporal, rngs=rngs)]) if upsample else None
        )

    def __call__(self, x: jax.Array, caches: CausalCaches) -> jax.Array:
        for resnet in self.resnets:
            x = resnet(x, caches)
        return x if self.upsamplers is None else self.upsamplers[0](x, caches)


class WanEncoder(nnx.Module):
    """``WanEncoder3d``: video ``[B, T, H, W, Cin]`` -> moments ``[B, T', H', W', 2Z]`` (before quant_conv)."""

    def __init__(self, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
        dims = [cfg.base_dim * u for u in (1, *cfg.dim_mult)]
        self.conv_in = CausalConv3d(cfg.in_channels, dims[0], 3, **_kw(cfg, rngs))
        blocks, scale = [], 1.0
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            for _ in range(cfg.num_res_blocks):
                blocks.append(ResidualBlock(cin, cout, cfg, rngs=rngs))
                if scale in cfg.attn_scales:
                    blocks.append(AttentionBlock(cout, cfg, rngs=rngs))
                cin = cout
            if i != len(cfg.dim_mult) - 1:
                blocks.append(Resample(cout, cfg, up=False, temporal=cfg.temperal_downsample[i], rngs=rngs))
                scale /= 2.0
        self.down_blocks = nnx.List(blocks)
        self.mid_block = MidBlock(dims[-1], cfg, rngs=rngs)
        self.norm_out = WanRMSNorm(dims[-1], param_dtype=cfg.param_dtype)
        self.conv_out = CausalConv3d(dims[-1], 2 * cfg.z_dim, 3, **_kw(cfg, rngs))

    def __call__(self, x: jax.Array, caches: CausalCaches) -> jax.Array:
        x = self.conv_in.causal(x, caches)
        for block in self.down_blocks:
            x = block(x, caches)
        x = self.mid_block(x, caches)
        return self.conv_out.causal(jax.nn.silu(self.norm_out(x)), caches)


class WanDecoder(nnx.Module):
    """``WanDecoder3d``: latents ``[B, T', H', W', Z]`` -> video ``[B, T, H, W, Cout]`` (unclipped)."""

    def __init__(self, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
        base = cfg.decoder_base_dim or cfg.base_dim
        dims = [base * u for u in (cfg.dim_mult[-1], *cfg.dim_mult[::-1])]
        temporal_up = cfg.temperal_downsample[::-1]
        self.conv_in = CausalConv3d(cfg.z_dim, dims[0], 3, **_kw(cfg, rngs))
        self.mid_block = MidBlock(dims[0], cfg, rngs=rngs)
        blocks = []
        for i, (cin, cout) in enumerate(zip(dims[:-1], dims[1:])):
            up = i != len(cfg.dim_mult) - 1
            blocks.append(
                UpBlock(
                    cin // 2 if i > 0 else cin,
                    cout,
                    cfg,
                    upsample=up,
                    temporal=up and temporal_up[i],
                    rngs=rngs,
                )
            )
        self.up_blocks = nnx.List(blocks)
        self.norm_out = WanRMSNorm(dims[-1], param_dtype=cfg.param_dtype)
        self.conv_out = CausalConv3d(dims[-1], cfg.out_channels, 3, **_kw(cfg, rngs))

    def __call__(self, z: jax.Array, caches: CausalCaches) -> jax.Array:
        x = self.mid_block(self.conv_in.causal(z, caches), caches)
        for block in self.up_blocks:
            x = block(x, caches)
        return self.conv_out.causal(jax.nn.silu(self.norm_out(x)), caches)


# ------------------------------------------------------------------------------------------- the VAE


class WanPosterior(NamedTuple):
    """diffusers' ``DiagonalGaussianDistribution`` over latents: mean, logvar ``[B, T', H', W', Z]``."""

    mean: jax.Array
    logvar: jax.Array

    @classmethod
    def from_moments(cls, moments: jax.Array) -> WanPosterior:
        """moments ``[..., 2Z]`` (mean first) -> posterior; logvar clipped to [-30, 20] as diffusers."""
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return cls(mean, jnp.clip(logvar, -30.0, 20.0))

    def mode(self) -> jax.Array:
        return self.mean

    def sample(self, key: jax.Array) -> jax.Array:
        """``mean + exp(logvar / 2) * N(0, 1)`` with an explicit key."""
        return self.mean + jnp.exp(0.5 * self.logvar) * jax.random.normal(
            key, self.mean.shape, self.mean.dtype
        )


class WanVAE(nnx.Module):
    """``AutoencoderKLWan``: encoder + ``quant_conv``, ``post_quant_conv`` + decoder (1x1x1 convs)."""

    def __init__(self, cfg: WanVAEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.encoder = WanEncoder(cfg, rngs=rngs)
        self.quant_conv = CausalConv3d(2 * cfg.z_dim, 2 * cfg.z_dim, 1, **_kw(cfg, rngs))
        self.post_quant_conv = CausalConv3d(cfg.z_dim, cfg.z_dim, 1, **_kw(cfg, rngs))
        self.decoder = WanDecoder(cfg, rngs=rngs)

    def latent_shape(self, T: int, H: int, W: int) -> tuple[int, int, int, int]:
        f, s = self.cfg.temporal_downsample, self.cfg.spatial_downsample
        if T < 1 or (T - 1) % f or H % s or W % s:
            raise ValueError(
                f"the Wan VAE codes 1 + {f}k frames of sizes divisible by {s}; got {T}x{H}x{W} "
                "(diffusers silently drops the frames past the last whole chunk)"
            )
        return (1 + (T - 1) // f, H // s, W // s, self.cfg.z_dim)

    def encode_chunk(self, x: jax.Array, caches: list[jax.Array] | None = None):
        """One chunk x ``[B, t, H, W, Cin]`` (the start of the video when ``caches`` is None) -> (moments
        ``[B, t', H', W', 2Z]``, the caches after it)."""
        c = CausalCaches(caches)
        moments = self.quant_conv(self.encoder(x, c))
        return moments.astype(jnp.float32), c.outgoing

    def decode_chunk(self, z: jax.Array, caches: list[jax.Array] | None = None):
        """One chunk z ``[B, t', H', W', Z]`` -> (video ``[B, t, H, W, Cout]`` unclipped, the caches after it)."""
        c = CausalCaches(caches)
        x = self.decoder(self.post_quant_conv(z), c)
        return x.astype(jnp.float32), c.outgoing

    def encode(self, x: jax.Array) -> WanPosterior:
        """The full causal pass: video ``[B, 1 + 4k, H, W, 3]`` -> posterior over ``[B, 1 + k, H/8, W/8, Z]``."""
        if x.ndim != 5 or x.shape[-1] != self.cfg.in_channels:
            raise ValueError(f"WanVAE.encode wants [B, T, H, W, {self.cfg.in_channels}], got {x.shape}")
        self.latent_shape(*x.shape[1:4])
        return WanPosterior.from_moments(self.encode_chunk(x)[0])

    def decode(self, z: jax.Array) -> jax.Array:
        """The full causal pass: latents ``[B, 1 + k, h, w, Z]`` -> video ``[B, 1 + 4k, 8h, 8w, 3]`` in
        [-1, 1] (clipped, as diffusers)."""
        if z.ndim != 5 or z.shape[-1] != self.cfg.z_dim:
            raise ValueError(f"WanVAE.decode wants [B, T', H', W', {self.cfg.z_dim}], got {z.shape}")
        return jnp.clip(self.decode_chunk(z)[0], -1.0, 1.0)


# ------------------------------------------------------------------------------- chunked, as diffusers


_JIT_CACHE: dict = {}


def _jitted(graphdef, which: str):
    key = (which, graphdef)
    if key not in _JIT_CACHE:

        def f(state, x, caches):
            model = nnx.merge(graphdef, state)
            return (model.encode_chunk if which == "enc" else model.decode_chunk)(x, caches)

        _JIT_CACHE[key] = jax.jit(f)
    return _JIT_CACHE[key]


def encode_chunked(model: WanVAE, x: jax.Array, chunk_frames: int = 4) -> WanPosterior:
    """diffusers' ``encode``: video ``[B, 1 + 4k, H, W, 3]`` coded as its first frame, then ``chunk_frames``
    frames (diffusers: 4; any multiple of the temporal factor gives the same result) at a time, caches
    threaded through; jitted per chunk (one compilation per chunk shape). Posterior over
    ``[B, 1 + k, H/8, W/8, Z]``."""
    model.latent_shape(*x.shape[1:4])
    if chunk_frames % model.cfg.temporal_downsample:
        raise ValueError(f"chunk_frames={chunk_frames} must be a multiple of {model.cfg.temporal_downsample}")
    graphdef, state = nnx.split(model)
    step, caches, out = _jitted(graphdef, "enc"), None, []
    for s in [0, *range(1, x.shape[1], chunk_frames)]:
        e = 1 if s == 0 else s + chunk_frames
        moments, caches = step(state, x[:, s:e], caches)
        out.append(moments)
    return WanPosterior.from_moments(jnp.concatenate(out, axis=1))


def decode_chunked(model: WanVAE, z: jax.Array, chunk_latents: int = 1) -> jax.Array:
    """diffusers' ``decode``: latents ``[B, T', h, w, Z]`` decoded ``chunk_latents`` latent frames at a time
    (diffusers: 1), caches threaded through, jitted per chunk -> video ``[B, 1 + 4 (T' - 1), 8h, 8w, 3]``
    clipped to [-1, 1]."""
    graphdef, state = nnx.split(model)
    step, caches, out = _jitted(graphdef, "dec"), None, []
    for s in [0, *range(1, z.shape[1], chunk_latents)]:
        e = 1 if s == 0 else s + chunk_latents
        frames, caches = step(state, z[:, s:e], caches)
        out.append(frames)
    return jnp.clip(jnp.concatenate(out, axis=1), -1.0, 1.0)


def normalize_latents(z: jax.Array, cfg: WanVAEConfig) -> jax.Array:
    """VAE latents ``[..., Z]`` -> the DiT's: ``(z - latents_mean) * (1 / latents_std)`` (WanImageToVideo)."""
    mean = jnp.asarray(cfg.latents_mean, jnp.float32).astype(z.dtype)
    inv_std = (1.0 / jnp.asarray(cfg.latents_std, jnp.float32)).astype(z.dtype)
    return (z - mean) * inv_std


def denormalize_latents(z: jax.Array, cfg: WanVAEConfig) -> jax.Array:
    """The DiT's latents ``[..., Z]`` -> the VAE's: ``z / (1 / latents_std) + latents_mean`` (WanPipeline)."""
    mean = jnp.asarray(cfg.latents_mean, jnp.float32).astype(z.dtype)
    inv_std = (1.0 / jnp.asarray(cfg.latents_std, jnp.float32)).astype(z.dtype)
    return z / inv_std + mean
