"""The causal 3D video VAE (Sora's "video compression network"): videos <-> latent spacetime.

Owns: ``VAEConfig`` (its variant table ``VAE_VARIANTS`` lives in ``sora_jax/choices.py``), the modules (``CausalConv3d``, ``ResBlock``,
``Downsample``, ``Upsample``, ``Encoder``, ``Decoder``, ``VideoVAE``), the diagonal Gaussian posterior
(``kl_divergence``), and bounded-memory coding: temporal chunks with causal-conv caches
(``encode_chunked`` / ``decode_chunked``, equal to the full pass) and spatial tiles blended over their overlap
(``decode_tiled``).

Design (as the causal VAEs of CogVideoX, Open-Sora 1.2+, LTX-Video and Wan 2.1):

- every temporal convolution is causal: the input is padded with ``kt - 1`` copies of the first frame in
  front, so output frame t sees input frames <= t. An image is a 1-frame video; a video of ``1 + 4k`` frames
  becomes ``1 + k`` latent frames (4x temporal), the first latent frame encoding the first frame alone;
- normalisation is RMSNorm over channels at every position (Wan), so no statistic mixes frames or tiles:
  the model stays causal and chunked coding is exact;
- temporal downsampling is a causal conv with stride 2 (``1 + 2m -> 1 + m`` frames); temporal upsampling
  repeats every frame twice and drops the very first copy (``1 + m -> 1 + 2m``);
- spatial downsampling is a stride-2 3x3 conv (padding right/bottom, as Stable Diffusion's VAE), upsampling
  nearest-neighbour x2 + 3x3 conv.

Layouts: videos ``[B, T, H, W, C]`` in [-1, 1]; latents ``[B, T', H', W', Z]``.

Chunked coding: every ``CausalConv3d`` keeps the last ``kt - stride`` frames of its (padded) input as a
cache; feeding the video in chunks (first the first frame, then whole multiples of the temporal factor)
with the caches threaded through gives exactly the full pass, in memory bounded by the chunk.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Iterator

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax.choices import VAE_VARIANTS
from sora_jax.models.layers import RMSNorm, as_dtype

# ----------------------------------------------------------------------------------------------- config


@dataclasses.dataclass(frozen=True)
class VAEConfig:
    """Everything the VAE needs. ``width_mults`` gives one level per entry; between consecutive levels the
    resolution halves in space, and in time where ``temporal_down`` says so (len = levels - 1)."""

    in_channels: int = 3
    latent_channels: int = 16
    base_width: int = 64
    width_mults: tuple[int, ...] = (1, 2, 4, 4)
    temporal_down: tuple[bool, ...] = (True, True, False)
    num_res_blocks: int = 2
    dtype: str = "float32"
    param_dtype: str = "float32"

    def __post_init__(self):
        object.__setattr__(self, "width_mults", tuple(int(m) for m in self.width_mults))
        object.__setattr__(self, "temporal_down", tuple(bool(t) for t in self.temporal_down))
        if len(self.temporal_down) != len(self.width_mults) - 1:
            raise ValueError(
                f"VAEConfig: temporal_down has {len(self.temporal_down)} entries, needs one per level "
                f"transition ({len(self.width_mults) - 1})"
            )
        if min(self.in_channels, self.latent_channels, self.base_width, self.num_res_blocks, 1) < 1:
            raise ValueError("VAEConfig: channels, widths and num_res_blocks must be positive")

    @property
    def temporal_downsample(self) -> int:
        return 2 ** sum(self.temporal_down)

    @property
    def spatial_downsample(self) -> int:
        return 2 ** (len(self.width_mults) - 1)


def vae_config(variant: str, **overrides) -> VAEConfig:
    if variant not in VAE_VARIANTS:
        raise ValueError(f"unknown VAE variant {variant!r}; known: {sorted(VAE_VARIANTS)}")
    return VAEConfig(**{**VAE_VARIANTS[variant], **overrides})


# ----------------------------------------------------------------------------------------------- caches


class CausalCaches:
    """Causal-conv caches of one pass, in call order (this VAE's and the Wan VAE's). ``incoming`` None: the
    pass starts the video."""

    def __init__(self, incoming: list[jax.Array] | None):
        self.incoming, self.outgoing, self.index = incoming, [], 0

    @property
    def start(self) -> bool:
        return self.incoming is None

    def take(self) -> jax.Array | None:
        if self.incoming is None:
            return None
        c = self.incoming[self.index]
        self.index += 1
        return c

    def put(self, cache: jax.Array) -> None:
        self.outgoing.append(cache)


# ---------------------------------------------------------------------------------------------- modules


def conv3d_params(cin: int, cout: int, kernel, param_dtype, rngs: nnx.Rngs) -> tuple[nnx.Param, nnx.Param]:
    """A 3D convolution's kernel ``[kt, kh, kw, cin, cout]`` (fan-in truncated normal, axes ``conv_in`` /
    ``conv_out``) and zero bias ``[cout]``, stored in ``param_dtype``."""
    init = nnx.initializers.variance_scaling(1.0, "fan_in", "truncated_normal", in_axis=(0, 1, 2, 3))
    pd = as_dtype(param_dtype)
    k = nnx.with_partitioning(init, (None, None, None, "conv_in", "conv_out"))(
        rngs.params(), (*kernel, cin, cout), pd
    )
    return nnx.Param(k), nnx.Param(jnp.zeros((cout,), pd))


def conv3d_valid_time(x: jax.Array, kernel: jax.Array, stride, pad_hw) -> jax.Array:
    """x ``[B, T, H, W, Cin]`` * kernel ``[kt, kh, kw, Cin, Cout]``, valid in time, ``pad_hw`` (two (lo, hi)
    pairs) in space -> ``[B, (T - kt) // st + 1, H', W', Cout]``. On CPU as kt 2D convolutions over the temporal
    taps (XLA CPU 3D convolutions are ~3x slower)."""
    kt, st, (sh, sw) = kernel.shape[0], stride[0], stride[1:]
    if jax.default_backend() != "cpu":
        dims = ("NDHWC", "DHWIO", "NDHWC")
        return jax.lax.conv_general_dilated(
            x, kernel, tuple(stride), ((0, 0), *pad_hw), dimension_numbers=dims
        )
    B, Tp, H, W, C = x.shape
    n = (Tp - kt) // st + 1
    y = 0.0
    for tau in range(kt):
        frames = x[:, tau : tau + st * (n - 1) + 1 : st].reshape(B * n, H, W, C)
        y = y + jax.lax.conv_general_dilated(
            frames, kernel[tau], (sh, sw), tuple(pad_hw), dimension_numbers=("NHWC", "HWIO", "NHWC")
        )
    return y.reshape(B, n, *y.shape[1:])


class CausalConv3d(nnx.Module):
    """3D convolution, causal in time (front padding by repeating the first frame, or the cache), 'same' in
    space (stride 1) or right/bottom padded (stride 2). Kernel ``[kt, kh, kw, Cin, Cout]``."""

    def __init__(
        self,
        cin: int,
        cout: int,
        kernel: tuple[int, int, int] = (3, 3, 3),
        stride: tuple[int, int, int] = (1, 1, 1),
        *,
        dtype="float32",
        param_dtype="float32",
        rngs: nnx.Rngs,
    ):
        self.kernel, self.bias = conv3d_params(cin, cout, kernel, param_dtype, rngs)
        self.kernel_size, self.stride = tuple(kernel), tuple(stride)
        self.dtype = as_dtype(dtype)

    @property
    def cache_frames(self) -> int:
        return max(self.kernel_size[0] - self.stride[0], 0)

    def __call__(self, x: jax.Array, caches: CausalCaches) -> jax.Array:
        """x ``[B, T, H, W, Cin]`` -> ``[B, T', H', W', Cout]``."""
        kt, kh, kw = self.kernel_size
        st, sh, sw = self.stride
        x = x.astype(self.dtype)
        if kt > 1:
            cache = caches.take()
            front = jnp.repeat(x[:, :1], kt - 1, axis=1) if cache is None else cache.astype(self.dtype)
            x = jnp.concatenate([front, x], axis=1)
            if self.cache_frames:
                caches.put(x[:, x.shape[1] - self.cache_frames :])
        pad_h = (kh // 2, kh // 2) if sh == 1 else (0, kh - sh)
        pad_w = (kw // 2, kw // 2) if sw == 1 else (0, kw - sw)
        y = conv3d_valid_time(x, self.kernel[...].astype(self.dtype), self.stride, (pad_h, pad_w))
        return y + self.bias[...].astype(self.dtype)


class ResBlock(nnx.Module):
    """x + conv(silu(norm(conv(silu(norm(x)))))) with a 1x1x1 projection when widths differ."""

    def __init__(self, cin: int, cout: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.norm1 = RMSNorm(cin, param_dtype=param_dtype, rngs=rngs)
        self.conv1 = CausalConv3d(cin, cout, **kw)
        self.norm2 = RMSNorm(cout, param_dtype=param_dtype, rngs=rngs)
        self.conv2 = CausalConv3d(cout, cout, **kw)
        self.skip = CausalConv3d(cin, cout, (1, 1, 1), **kw) if cin != cout else None

    def __call__(self, x: jax.Array, caches: CausalCaches) -> jax.Array:
        h = self.conv1(jax.nn.silu(self.norm1(x)), caches)
        h = self.conv2(jax.nn.silu(self.norm2(h)), caches)
        return (x if self.skip is None else self.skip(x, caches)) + h


class Downsample(nnx.Module):
    """Spatial /2 (stride-2 3x3 conv), then optionally temporal /2 (causal stride-2 conv over 3 frames)."""

    def __init__(self, ch: int, temporal: bool, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.spatial = CausalConv3d(ch, ch, (1, 3, 3), (1, 2, 2), **kw)
        self.temporal = CausalConv3d(ch, ch, (3, 1, 1), (2, 1, 1), **kw) if temporal else None

    def __call__(self, x: jax.Array, caches: CausalCaches) -> jax.Array:
        x = self.spatial(x, caches)
        return x if self.temporal is None else self.temporal(x, caches)


class Upsample(nnx.Module):
    """Optionally temporal x2 (repeat frames, drop the first copy at the video start, causal conv), then
    spatial x2 (nearest + 3x3 conv)."""

    def __init__(self, ch: int, temporal: bool, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.temporal = CausalConv3d(ch, ch, (3, 1, 1), **kw) if temporal else None
        self.spatial = CausalConv3d(ch, ch, (1, 3, 3), **kw)

    def __call__(self, x: jax.Array, caches: CausalCaches) -> jax.Array:
        if self.temporal is not None:
            x = jnp.repeat(x, 2, axis=1)
            if caches.start:
                x = x[:, 1:]
            x = self.temporal(x, caches)
        B, T, H, W, C = x.shape
        x = jnp.broadcast_to(x[:, :, :, None, :, None], (B, T, H, 2, W, 2, C)).reshape(B, T, 2 * H, 2 * W, C)
        return self.spatial(x, caches)


class Encoder(nnx.Module):
    """video ``[B, T, H, W, Cin]`` -> posterior moments ``[B, T', H', W', 2Z]`` (mean, log-variance)."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        widths = [cfg.base_width * m for m in cfg.width_mults]
        self.conv_in = CausalConv3d(cfg.in_channels, widths[0], **kw)
        blocks, downs = [], []
        cin = widths[0]
        for level, w in enumerate(widths):
            level_blocks = []
            for _ in range(cfg.num_res_blocks):
                level_blocks.append(ResBlock(cin, w, **kw))
                cin = w
            blocks.append(nnx.List(level_blocks))
            if level < len(widths) - 1:
                downs.append(Downsample(w, cfg.temporal_down[level], **kw))
        self.blocks, self.downs = nnx.List(blocks), nnx.List(downs)
        self.mid = nnx.List([ResBlock(cin, cin, **kw), ResBlock(cin, cin, **kw)])
        self.norm_out = RMSNorm(cin, param_dtype=cfg.param_dtype, rngs=rngs)
        self.conv_out = CausalConv3d(cin, 2 * cfg.latent_channels, **kw)

    def __call__(self, x: jax.Array, caches: CausalCaches) -> jax.Array:
        h = self.conv_in(x, caches)
        for level, level_blocks in enumerate(self.blocks):
            for block in level_blocks:
                h = block(h, caches)
            if level < len(self.downs):
                h = self.downs[level](h, caches)
        for block in self.mid:
            h = block(h, caches)
        return self.conv_out(jax.nn.silu(self.norm_out(h)), caches).astype(jnp.float32)


class Decoder(nnx.Module):
    """latents ``[B, T', H', W', Z]`` -> video ``[B, T, H, W, Cin]`` (unbounded; clip for pixels)."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        widths = [cfg.base_width * m for m in cfg.width_mults][::-1]
        temporal_up = cfg.temporal_down[::-1]
        cin = widths[0]
        self.conv_in = CausalConv3d(cfg.latent_channels, cin, **kw)
        self.mid = nnx.List([ResBlock(cin, cin, **kw), ResBlock(cin, cin, **kw)])
        blocks, ups = [], []
        for level, w in enumerate(widths):
            level_blocks = []
            for _ in range(cfg.num_res_blocks + 1):
                level_blocks.append(ResBlock(cin, w, **kw))
                cin = w
            blocks.append(nnx.List(level_blocks))
            if level < len(widths) - 1:
                ups.append(Upsample(w, temporal_up[level], **kw))
        self.blocks, self.ups = nnx.List(blocks), nnx.List(ups)
        self.norm_out = RMSNorm(cin, param_dtype=cfg.param_dtype, rngs=rngs)
        self.conv_out = CausalConv3d(cin, cfg.in_channels, **kw)

    def __call__(self, z: jax.Array, caches: CausalCaches) -> jax.Array:
        h = self.conv_in(z, caches)
        for block in self.mid:
            h = block(h, caches)
        for level, level_blocks in enumerate(self.blocks):
            for block in level_blocks:
                h = block(h, caches)
            if level < len(self.ups):
                h = self.ups[level](h, caches)
        return self.conv_out(jax.nn.silu(self.norm_out(h)), caches).astype(jnp.float32)


def kl_divergence(mean: jax.Array, logvar: jax.Array) -> jax.Array:
    """KL(N(mean, exp(logvar)) || N(0, 1)) summed over all but the batch axis: ``[B]``."""
    kl = 0.5 * (jnp.square(mean) + jnp.exp(logvar) - 1.0 - logvar)
    return jnp.sum(kl, axis=tuple(range(1, kl.ndim)))


class VideoVAE(nnx.Module):
    """The causal video VAE. ``encode`` gives posterior moments; ``decode`` latents; ``__call__`` the
    training pass (sample, decode, return reconstruction + moments)."""

    def __init__(self, cfg: VAEConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        self.encoder = Encoder(cfg, rngs=rngs)
        self.decoder = Decoder(cfg, rngs=rngs)

    # ------------------------------------------------------------------ shapes

    def latent_frames(self, T: int) -> int:
        f = self.cfg.temporal_downsample
        if T < 1 or (T - 1) % f:
            raise ValueError(f"the causal VAE wants 1 + {f}k frames (an image is 1 frame), got {T}")
        return 1 + (T - 1) // f

    def latent_shape(self, T: int, H: int, W: int) -> tuple[int, int, int, int]:
        s = self.cfg.spatial_downsample
        if H % s or W % s:
            raise ValueError(f"the VAE wants height and width divisible by {s}, got {H}x{W}")
        return (self.latent_frames(T), H // s, W // s, self.cfg.latent_channels)

    def _check_video(self, x: jax.Array) -> None:
        if x.ndim != 5 or x.shape[-1] != self.cfg.in_channels:
            raise ValueError(f"VideoVAE wants videos [B, T, H, W, {self.cfg.in_channels}], got {x.shape}")
        self.latent_shape(*x.shape[1:4])

    # ---------------------------------------------------------------- full pass

    def encode_moments(
        self, x: jax.Array, caches: list[jax.Array] | None = None
    ) -> tuple[jax.Array, jax.Array, list[jax.Array]]:
        """x ``[B, T, H, W, C]`` -> (mean, logvar) ``[B, T', H', W', Z]`` and the caches after x."""
        c = CausalCaches(caches)
        moments = self.encoder(x, c)
        mean, logvar = jnp.split(moments, 2, axis=-1)
        return mean, jnp.clip(logvar, -30.0, 20.0), c.outgoing

    def encode(self, x: jax.Array) -> jax.Array:
        """x ``[B, T, H, W, C]`` (T = 1 + 4k) -> posterior mean ``[B, 1 + k, H/8, W/8, Z]`` (default variant)."""
        self._check_video(x)
        return self.encode_moments(x)[0]

    def decode_with_caches(
        self, z: jax.Array, caches: list[jax.Array] | None = None
    ) -> tuple[jax.Array, list[jax.Array]]:
        c = CausalCaches(caches)
        return self.decoder(z, c), c.outgoing

    def decode(self, z: jax.Array) -> jax.Array:
        """z ``[B, T', H', W', Z]`` -> video ``[B, 1 + f (T' - 1), H' s, W' s, C]``."""
        if z.ndim != 5 or z.shape[-1] != self.cfg.latent_channels:
            raise ValueError(
                f"VideoVAE.decode wants [B, T', H', W', {self.cfg.latent_channels}], got {z.shape}"
            )
        return self.decode_with_caches(z)[0]

    def __call__(self, x: jax.Array, key: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """Training pass: (reconstruction ``[B, T, H, W, C]``, mean, logvar) with z ~ posterior."""
        self._check_video(x)
        mean, logvar, _ = self.encode_moments(x)
        z = mean + jnp.exp(0.5 * logvar) * jax.random.normal(key, mean.shape, mean.dtype)
        return self.decode(z), mean, logvar


# ---------------------------------------------------------------------------- bounded-memory coding


def _chunks(total: int, first: int, size: int) -> Iterator[tuple[int, int]]:
    yield 0, first
    for s in range(first, total, size):
        yield s, min(s + size, total)


def encode_chunked(model: VideoVAE, x: jax.Array, chunk_frames: int = 16) -> jax.Array:
    """Posterior mean of x ``[B, T, H, W, C]``, encoding the first frame, then ``chunk_frames`` frames (a
    multiple of the temporal factor) at a time; equal to ``model.encode(x)``."""
    model._check_video(x)
    f = model.cfg.temporal_downsample
    if chunk_frames % f:
        raise ValueError(f"chunk_frames={chunk_frames} must be a multiple of the temporal factor {f}")
    graphdef, state = nnx.split(model)
    step = _jitted_encode(graphdef)
    caches, out = None, []
    for s, e in _chunks(x.shape[1], 1, chunk_frames):
        mean, caches = step(state, x[:, s:e], caches)
        out.append(mean)
    return jnp.concatenate(out, axis=1)


def decode_chunked(
    model: VideoVAE, z: jax.Array, chunk_latents: int = 4, *, sink: Callable[[np.ndarray], None] | None = None
) -> np.ndarray | None:
    """Decodes z ``[B, T', H', W', Z]`` one latent chunk at a time (the first latent frame, then
    ``chunk_latents`` frames), threading the causal caches; equal to ``model.decode(z)``.

    Frames go to ``sink(frames float32 [B, t, H, W, C])`` as they are made (e.g. a video writer), so device
    memory is bounded by one chunk whatever the clip length; without a sink they are returned concatenated.
    """
    graphdef, state = nnx.split(model)
    step = _jitted_decode(graphdef)
    caches, out = None, []
    for s, e in _chunks(z.shape[1], 1, chunk_latents):
        frames, caches = step(state, z[:, s:e], caches)
        frames = np.asarray(frames)
        if sink is None:
            out.append(frames)
        else:
            sink(frames)
    return np.concatenate(out, axis=1) if sink is None else None


_JIT_CACHE: dict = {}


def _jitted_encode(graphdef):
    key = ("enc", graphdef)
    if key not in _JIT_CACHE:

        def f(state, x, caches):
            mean, _, new = nnx.merge(graphdef, state).encode_moments(x, caches)
            return mean, new

        _JIT_CACHE[key] = jax.jit(f)
    return _JIT_CACHE[key]


def _jitted_decode(graphdef):
    key = ("dec", graphdef)
    if key not in _JIT_CACHE:

        def f(state, z, caches):
            return nnx.merge(graphdef, state).decode_with_caches(z, caches)

        _JIT_CACHE[key] = jax.jit(f)
    return _JIT_CACHE[key]


def _ramp(n: int, overlap: int, at_start: bool, at_end: bool) -> np.ndarray:
    """Blend weights along one axis of a tile. Where a neighbour tile overlaps: weight 0 over the outer
    quarter of the overlap (pixels that saw the zero padding past the tile edge most), a linear ramp over
    the middle half, 1 inside; the two tiles' weights over an overlap sum to 1."""
    w = np.ones(n, np.float32)
    if overlap > 0:
        dead, ramp = overlap // 4, overlap - 2 * (overlap // 4)
        r = np.concatenate([np.zeros(dead), (np.arange(ramp) + 0.5) / ramp, np.ones(overlap - dead - ramp)])
        if not at_start:
            w[:overlap] = r
        if not at_end:
            w[n - overlap :] = np.minimum(w[n - overlap :], r[::-1])
    return w


def _tile_starts(size: int, tile: int, stride: int) -> list[int]:
    if size <= tile:
        return [0]
    starts = list(range(0, size - tile, stride))
    return starts + [size - tile]


def decode_tiled(
    model: VideoVAE, z: jax.Array, *, tile_latent: int = 32, overlap_latent: int = 8, chunk_latents: int = 4
) -> np.ndarray:
    """Decodes z ``[B, T', H', W', Z]`` in overlapping spatial tiles of ``tile_latent`` latent pixels (each
    decoded in temporal chunks), blending tiles linearly over the overlap. Approximates ``model.decode``: the
    decoder's receptive field crosses tile edges, so agreement improves with the overlap (tests: < 0.05
    max abs on [-1, 1] pixels at overlap >= tile / 4 for the bundled variants)."""
    if overlap_latent >= tile_latent:
        raise ValueError(f"overlap {overlap_latent} must be smaller than the tile {tile_latent}")
    s = model.cfg.spatial_downsample
    B, Tl, Hl, Wl, _ = z.shape
    T = 1 + model.cfg.temporal_downsample * (Tl - 1)
    out = np.zeros((B, T, Hl * s, Wl * s, model.cfg.in_channels), np.float32)
    weight = np.zeros((1, 1, Hl * s, Wl * s, 1), np.float32)
    stride = tile_latent - overlap_latent
    hs, ws = _tile_starts(Hl, tile_latent, stride), _tile_starts(Wl, tile_latent, stride)
    for i in hs:
        for j in ws:
            th, tw = min(tile_latent, Hl), min(tile_latent, Wl)
            frames = decode_chunked(model, z[:, :, i : i + th, j : j + tw], chunk_latents)
            wh = _ramp(th * s, overlap_latent * s, i == 0, i + th >= Hl)
            ww = _ramp(tw * s, overlap_latent * s, j == 0, j + tw >= Wl)
            w = (wh[:, None] * ww[None, :])[None, None, :, :, None]
            out[:, :, i * s : (i + th) * s, j * s : (j + tw) * s] += frames * w
            weight[:, :, i * s : (i + th) * s, j * s : (j + tw) * s] += w
    return out / weight


def param_count(cfg: VAEConfig) -> int:
    state = jax.eval_shape(lambda: nnx.state(VideoVAE(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    return sum(math.prod(x.shape) for x in jax.tree.leaves(state))


# ------------------------------------------------------------------------ the VAE as the DiT's codec

LATENT_STATS = "latent_stats.json"


class VAECodec:
    """A trained VAE as the ``Autoencoder`` the DiT works through: ``encode`` gives the posterior mean
    normalised as ``(mean - shift) / scale`` (statistics measured on training clips, stored next to the VAE's
    checkpoints by ``sora-jax eval``), ``decode`` undoes it and decodes, clipped to [-1, 1]. Built without
    weights from a config (``factory.vae_codec``: shapes only); ``with_params`` binds them (loaded by
    ``sora_jax.loading``, or passed into a jitted function as an argument)."""

    def __init__(
        self,
        graphdef: nnx.GraphDef,
        params: nnx.State | None,
        cfg: VAEConfig,
        shift: float,
        scale: float,
        step: int = 0,
    ):
        self.graphdef, self.params, self.cfg, self.step = graphdef, params, cfg, int(step)
        self.shift, self.scale = float(shift), float(scale)
        self.latent_channels = cfg.latent_channels
        self.temporal_downsample = cfg.temporal_downsample
        self.spatial_downsample = cfg.spatial_downsample

    def with_params(self, params: nnx.State) -> VAECodec:
        """The same codec over ``params`` (host arrays, device arrays, or tracers inside a jitted function,
        where the frozen VAE is then an argument rather than a compiled constant)."""
        return VAECodec(self.graphdef, params, self.cfg, self.shift, self.scale, self.step)

    def _model(self) -> VideoVAE:
        if self.params is None:
            raise ValueError(
                "this VAECodec has no weights (shapes only): use sora_jax.loading.load_autoencoder"
            )
        return nnx.merge(self.graphdef, self.params)

    def latent_shape(self, T: int, H: int, W: int) -> tuple[int, int, int, int]:
        f, s = self.temporal_downsample, self.spatial_downsample
        if T < 1 or (T - 1) % f or H % s or W % s:
            raise ValueError(f"the VAE codes 1 + {f}k frames of sizes divisible by {s}; got {T}x{H}x{W}")
        return (1 + (T - 1) // f, H // s, W // s, self.latent_channels)

    def encode(self, video: jax.Array) -> jax.Array:
        """video ``[B, T, H, W, 3]`` in [-1, 1] -> normalised latents ``[B, T', H', W', Z]``."""
        return (self._model().encode(video) - self.shift) / self.scale

    def decode(self, latents: jax.Array) -> jax.Array:
        """normalised latents ``[B, T', H', W', Z]`` -> video ``[B, T, H, W, 3]`` in [-1, 1]."""
        return jnp.clip(self._model().decode(latents * self.scale + self.shift), -1.0, 1.0)

    def decode_chunked(self, latents: np.ndarray, chunk_latents: int = 4) -> np.ndarray:
        """``decode`` one latent chunk at a time with the causal caches (``decode_chunked``): equal to it, in
        memory bounded by the chunk. Host float32 ``[B, T, H, W, 3]`` in [-1, 1]."""
        z = jnp.asarray(latents) * self.scale + self.shift
        return np.clip(decode_chunked(self._model(), z, chunk_latents), -1.0, 1.0)


def latent_statistics(means: np.ndarray) -> dict[str, float]:
    """Scalar shift / scale (as SD3 and Flux) that make the posterior means zero-mean, unit-variance."""
    m = np.asarray(means, np.float64)
    return {"shift": float(m.mean()), "scale": float(m.std() + 1e-8)}
