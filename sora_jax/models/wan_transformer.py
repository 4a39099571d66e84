"""The Wan 2.1 text-to-video transformer, computed as diffusers' ``WanTransformer3DModel`` computes it.

Owns: ``WanConfig`` (the model's only input), ``WAN_VARIANTS`` / ``wan_config`` (the released sizes), the
modules ``WanAttention``, ``WanBlock``, ``WanTransformer`` and Wan's interleaved 3D RoPE ``apply_rope_pairs``.
Reading and writing diffusers folders lives in ``sora_jax.models.wan_convert``; ``sora_jax.models.wan`` is the
public face of both.

Data flow (Wan Team 2025, "Wan: Open and Advanced Large-Scale Video Generative Models")::

    x [B,T,H,W,C] --patchify (pt,ph,pw)--> [B,N,P] --Linear (the Conv3d, kernel = stride)--> [B,N,D]
    temb = MLP(sinusoid_256(t))  [B,D] (float32)        e6 = Linear(SiLU(temb)) -> [B,6,D]
    text = Linear(GELU_tanh(Linear(text)))  [B,L,D]
    WanBlock x depth (stacked params [depth, ...], lax.scan, optional remat); (shift, scale, gate, c_shift,
    c_scale, c_gate) = table[6, D] + e6, in float32:
        x += gate * SelfAttn(LN(x) * (1 + scale) + shift)       # q/k RMSNorm over all heads, then 3D RoPE
        x += CrossAttn(LN_affine(x) or x, text)                  # q/k RMSNorm over all heads, no mask
        x += c_gate * FFN(LN(x) * (1 + c_scale) + c_shift)       # GELU tanh
    head: (shift, scale) = table[2, D] + temb;  Linear(LN(x) * (1 + scale) + shift) -> [B,N,P'] -> unpatchify

LayerNorms have no affine parameters except the cross-attention one (``cross_attn_norm``); all norms, the
modulation and the gated residual adds run in float32, as diffusers does (its ``_keep_in_fp32_modules``: the
time MLP, the scale-shift tables and the affine norm are stored in float32 here whatever ``param_dtype``).
RoPE tables are computed at trace time for any grid (diffusers precomputes 1024 positions per axis).
Only the text-to-video path: no image embedder / added k-v (I2V) branch.
"""

from __future__ import annotations

import dataclasses
from functools import partial

import jax
import jax.numpy as jnp
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from sora_jax.models import lora
from sora_jax.models.dit import REMAT_POLICIES
from sora_jax.models.layers import (
    ATTENTION_IMPLEMENTATIONS,
    Mlp,
    as_dtype,
    dot_product_attention,
    layer_norm,
    linear,
    patchify,
    project_out,
    project_qkv,
    rope_3d_angles,
    rope_split,
    timestep_embedding,
    unpatchify,
)
from sora_jax.parallel import sequence
from sora_jax.parallel.sharding import constrain

F32 = jnp.float32


@dataclasses.dataclass(frozen=True)
class WanConfig:
    """Everything the Wan transformer needs (diffusers' names in comments). ``dtype`` computes,
    ``param_dtype`` stores (except the float32 modules named in the module docstring)."""

    width: int  # num_attention_heads * attention_head_dim (diffusers' inner_dim)
    depth: int  # num_layers
    num_heads: int  # num_attention_heads
    ffn_dim: int
    text_dim: int = 4096  # umT5-XXL
    in_channels: int = 16
    out_channels: int = 16
    patch_size: tuple[int, int, int] = (1, 2, 2)
    freq_dim: int = 256
    eps: float = 1e-6
    cross_attn_norm: bool = True
    rope_theta: float = 10000.0
    dtype: str | jnp.dtype = "float32"
    param_dtype: str | jnp.dtype = "float32"
    attention_impl: str | None = None  # None/"xla" | "cudnn" | "reference"
    remat: str = "none"  # a name in dit.REMAT_POLICIES
    seq_parallel: str = "none"  # self-attention over the mesh's seq axis: none | ulysses | ring
    ffn_chunk: int = (
        0  # > 0: the FFN runs over blocks of this many tokens (layers.Mlp), never [N, ffn_dim] whole
    )

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(f"WanConfig.patch_size must be 3 positive ints, got {self.patch_size}")
        if min(self.width, self.depth, self.num_heads, self.ffn_dim, self.text_dim, self.freq_dim) < 1:
            raise ValueError(
                "WanConfig: width, depth, num_heads, ffn_dim, text_dim, freq_dim must be positive"
            )
        if self.ffn_chunk < 0:
            raise ValueError(
                f"WanConfig.ffn_chunk={self.ffn_chunk} must be >= 0 (0: the whole sequence at once)"
            )
        if min(self.in_channels, self.out_channels) < 1:
            raise ValueError("WanConfig: in_channels and out_channels must be positive")
        if self.width % self.num_heads:
            raise ValueError(f"WanConfig.width {self.width} is not divisible by num_heads {self.num_heads}")
        rope_split(self.head_dim)  # raises on odd or too small head dims
        for key in ("dtype", "param_dtype"):
            try:
                dt = jnp.dtype(getattr(self, key))
            except TypeError as e:
                raise ValueError(f"WanConfig.{key}={getattr(self, key)!r} is not a dtype") from e
            if not jnp.issubdtype(dt, jnp.floating):
                raise ValueError(f"WanConfig.{key} must be a float dtype, got {dt}")
        if self.attention_impl is not None and self.attention_impl not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"WanConfig.attention_impl={self.attention_impl!r}; use None or one of {ATTENTION_IMPLEMENTATIONS}"
            )
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"WanConfig.remat={self.remat!r} unknown; use one of {tuple(REMAT_POLICIES)}")
        if self.seq_parallel not in sequence.SEQ_PARALLEL:
            raise ValueError(
                f"WanConfig.seq_parallel={self.seq_parallel!r} unknown; use one of {sequence.SEQ_PARALLEL}"
            )

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def patch_dim(self) -> int:
        pt, ph, pw = self.patch_size
        return pt * ph * pw * self.in_channels

    @property
    def out_patch_dim(self) -> int:
        pt, ph, pw = self.patch_size
        return pt * ph * pw * self.out_channels


# Released sizes (the Wan-AI/Wan2.1-T2V-* config.json files) and a test-only one.
WAN_VARIANTS: dict[str, dict] = {
    "1.3B": dict(width=1536, depth=30, num_heads=12, ffn_dim=8960),  # Wan2.1-T2V-1.3B
    "14B": dict(width=5120, depth=40, num_heads=40, ffn_dim=13824),  # Wan2.1-T2V-14B
    "tiny": dict(width=48, depth=2, num_heads=3, ffn_dim=96, text_dim=32, in_channels=4, out_channels=4),
}


def wan_config(variant: str, **overrides) -> WanConfig:
    """``WanConfig`` for a named size (``WAN_VARIANTS``) with field overrides (e.g. ``dtype="bfloat16"``)."""
    if variant not in WAN_VARIANTS:
        raise ValueError(f"unknown Wan variant {variant!r}; choose one of {', '.join(WAN_VARIANTS)}")
    fields = {f.name for f in dataclasses.fields(WanConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"wan_config: unknown field(s) {unknown}; WanConfig has {sorted(fields)}")
    return WanConfig(**{**WAN_VARIANTS[variant], **overrides})


# ------------------------------------------------------------------------------------------------ helpers


def apply_rope_pairs(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Wan's rotary embedding: x ``[B, N, K, H]`` by angles ``[N, H/2]``, rotating the adjacent pairs
    (2i, 2i+1) (diffusers' ``repeat_interleave_real`` layout, not rotate-half); float32 inside."""
    xf = x.astype(F32)
    x1, x2 = xf[..., 0::2], xf[..., 1::2]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = jnp.stack([x1 * c - x2 * s, x1 * s + x2 * c], axis=-1)
    return out.reshape(x.shape).astype(x.dtype)


def _rms_norm_heads(x: jax.Array, scale: jax.Array, eps: float) -> jax.Array:
    """RMSNorm of x ``[B, N, K, H]`` over all heads together (K*H values) with a scale ``[K, H]``."""
    xf = x.astype(F32)
    y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=(-2, -1), keepdims=True) + eps)
    return (y * scale.astype(F32)).astype(x.dtype)


def _param(init, names, rngs: nnx.Rngs, shape, dtype) -> nnx.Param:
    return nnx.Param(nnx.with_partitioning(init, names)(rngs.params(), shape, as_dtype(dtype)))


# ------------------------------------------------------------------------------------------------ modules


class WanAttention(nnx.Module):
    """Wan's attention: q/k/v/o as einsum kernels ``[D, K, H]`` / ``[K, H, D]`` with biases, an RMSNorm on q
    and on k over the full width (all heads at once, before RoPE), optional RoPE, no mask."""

    LORA_KERNELS = lora.ATTENTION_KERNELS  # the kernels a LoRA adapter can go on (sora_jax/models/lora.py)

    def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs):
        D, K, H = cfg.width, cfg.num_heads, cfg.head_dim
        pd = cfg.param_dtype
        xavier = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=0, out_axis=(1, 2))
        oinit = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1), out_axis=2)
        zeros, ones = nnx.initializers.zeros_init(), nnx.initializers.ones_init()
        for n in "qkv":
            setattr(self, f"w{n}", _param(xavier, ("embed", "heads", "kv"), rngs, (D, K, H), pd))
            setattr(self, f"b{n}", _param(zeros, ("heads", "kv"), rngs, (K, H), pd))
        self.wo = _param(oinit, ("heads", "kv", "embed"), rngs, (K, H, D), pd)
        self.bo = _param(zeros, ("embed",), rngs, (D,), pd)
        self.norm_q = _param(ones, ("heads", "kv"), rngs, (K, H), pd)
        self.norm_k = _param(ones, ("heads", "kv"), rngs, (K, H), pd)
        self.eps = cfg.eps
        self.dtype = as_dtype(cfg.dtype)
        self.implementation = cfg.attention_impl
        self.seq_parallel = cfg.seq_parallel

    def __call__(
        self,
        x: jax.Array,
        context: jax.Array | None = None,
        rope: tuple[jax.Array, jax.Array] | None = None,
    ) -> jax.Array:
        """x ``[B, N, D]``, context ``[B, M, D]`` (default x), rope (cos, sin) ``[N, H/2]`` -> ``[B, N, D]``."""
        dt = self.dtype
        q, k, v = project_qkv(self, x, context, dt)
        q = _rms_norm_heads(q, self.norm_q[...], self.eps)
        k = _rms_norm_heads(k, self.norm_k[...], self.eps)
        if rope is not None:
            q, k = apply_rope_pairs(q, *rope), apply_rope_pairs(k, *rope)
        q = constrain(q, ("act_batch", "act_seq", "act_heads", "act_kv"))
        kernel = partial(dot_product_attention, implementation=self.implementation)
        if context is None and self.seq_parallel != "none":  # self-attention split over the seq axis
            out = sequence.attention(q, k, v, mode=self.seq_parallel, kernel=kernel)
        else:
            out = kernel(q, k, v)
        out = checkpoint_name(constrain(out, ("act_batch", "act_seq", "act_heads", "act_kv")), "attn_out")
        return project_out(self, out, dt)


class WanBlock(nnx.Module):
    """Modulated self-attention (RoPE), cross-attention to the text (optionally after an affine LayerNorm),
    modulated GELU-tanh FFN; modulation = the block's own ``scale_shift_table [6, D]`` + the shared e6."""

    def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs):
        D = cfg.width
        self.attn1 = WanAttention(cfg, rngs=rngs)
        self.attn2 = WanAttention(cfg, rngs=rngs)
        if cfg.cross_attn_norm:  # diffusers' FP32LayerNorm(elementwise_affine=True): float32 parameters
            self.norm2_scale = _param(nnx.initializers.ones_init(), ("norm",), rngs, (D,), F32)
            self.norm2_bias = _param(nnx.initializers.zeros_init(), ("norm",), rngs, (D,), F32)
        self.ffn = Mlp(
            D, cfg.ffn_dim, dtype=cfg.dtype, param_dtype=cfg.param_dtype, token_chunk=cfg.ffn_chunk, rngs=rngs
        )
        init = nnx.initializers.normal(stddev=D**-0.5)  # torch.randn(1, 6, D) / D**0.5
        self.scale_shift_table = _param(init, (None, "norm"), rngs, (6, D), F32)
        self.cross_attn_norm = cfg.cross_attn_norm
        self.eps = cfg.eps

    def __call__(
        self, x: jax.Array, e6: jax.Array, text: jax.Array, rope: tuple[jax.Array, jax.Array]
    ) -> jax.Array:
        """x ``[B, N, D]``, e6 ``[B, 6, D]``, text ``[B, L, D]`` (embedded), rope ``[N, H/2]`` x 2 -> ``[B, N, D]``."""
        dt, eps = x.dtype, self.eps
        mod = self.scale_shift_table[...].astype(F32)[None] + e6.astype(F32)  # [B, 6, D]
        shift, scale, gate, c_shift, c_scale, c_gate = (mod[:, i : i + 1] for i in range(6))  # [B, 1, D]
        h = (layer_norm(x.astype(F32), eps) * (1 + scale) + shift).astype(dt)
        x = (x.astype(F32) + self.attn1(h, rope=rope) * gate).astype(dt)
        x = constrain(x, ("act_batch", "act_seq", "act_embed"))
        h = x
        if self.cross_attn_norm:
            h = layer_norm(x.astype(F32), eps) * self.norm2_scale[...] + self.norm2_bias[...]
            h = h.astype(dt)
        x = x + self.attn2(h, text)
        x = constrain(x, ("act_batch", "act_seq", "act_embed"))
        h = (layer_norm(x.astype(F32), eps) * (1 + c_scale) + c_shift).astype(dt)
        x = (x.astype(F32) + self.ffn(h).astype(F32) * c_gate).astype(dt)
        return constrain(x, ("act_batch", "act_seq", "act_embed"))


class _TwoLinear(nnx.Module):
    """``linear_2(act(linear_1(x)))``: diffusers' ``TimestepEmbedding`` (SiLU) / ``PixArtAlphaTextProjection``
    (GELU tanh), with the same attribute names."""

    def __init__(self, din, dout, names1, names2, act, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.linear_1 = linear(din, dout, names1, **kw)
        self.linear_2 = linear(dout, dout, names2, **kw)
        self.act = act

    def __call__(self, x: jax.Array) -> jax.Array:
        return self.linear_2(self.act(self.linear_1(x)))


class WanConditionEmbedder(nnx.Module):
    """t ``[B]`` -> (temb ``[B, D]``, e6 ``[B, 6, D]``); text ``[B, L, Dt]`` -> ``[B, L, D]``."""

    def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs):
        D, dt, pd = cfg.width, cfg.dtype, cfg.param_dtype
        f32 = dict(dtype=F32, param_dtype=F32, rngs=rngs)  # diffusers' _keep_in_fp32_modules
        self.time_embedder = _TwoLinear(
            cfg.freq_dim, D, ("cond", "embed"), ("embed", "cond"), jax.nn.silu, **f32
        )
        self.time_proj = linear(D, 6 * D, ("embed", "cond"), dtype=dt, param_dtype=pd, rngs=rngs)
        gelu = lambda h: jax.nn.gelu(h, approximate=True)
        self.text_embedder = _TwoLinear(
            cfg.text_dim, D, ("embed", "cond"), ("cond", "embed"), gelu, dtype=dt, param_dtype=pd, rngs=rngs
        )
        self.freq_dim = cfg.freq_dim
        self.dtype = as_dtype(dt)

    def __call__(self, t: jax.Array, text: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array]:
        """t ``[B]`` float (0..1000), text ``[B, L, Dt]`` -> temb ``[B, D]``, e6 ``[B, 6, D]``, text ``[B, L, D]``."""
        # diffusers' Timesteps(flip_sin_to_cos=True, downscale_freq_shift=0) is DiT's [cos, sin] embedding
        temb = self.time_embedder(timestep_embedding(t, self.freq_dim)).astype(self.dtype)
        e6 = self.time_proj(jax.nn.silu(temb))
        return temb, e6.reshape(e6.shape[0], 6, -1), self.text_embedder(text.astype(self.dtype))


class WanTransformer(nnx.Module):
    """Wan 2.1 T2V: ``(latents [B,T,H,W,C], timestep [B], text [B,L,Dt]) -> [B,T,H,W,C_out]``, channels last.

    ``timestep`` is diffusers' scale (0..1000, float); ``text`` is the umT5 embedding, padding included (Wan
    attends to all L text tokens, no mask). Blocks are stored stacked (leading axis ``"layers"``) and run with
    ``jax.lax.scan`` so compile time does not grow with depth.
    """

    def __init__(self, cfg: WanConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        # the Conv3d with kernel = stride = patch size is a Linear on patchify's (pt, ph, pw, C) patches
        self.patch_embedding = linear(cfg.patch_dim, cfg.width, ("patch", "embed"), **kw)
        self.condition_embedder = WanConditionEmbedder(cfg, rngs=rngs)

        @nnx.split_rngs(splits=cfg.depth)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(r: nnx.Rngs) -> WanBlock:
            return WanBlock(cfg, rngs=r)

        self.blocks = make_blocks(rngs)
        self.proj_out = linear(cfg.width, cfg.out_patch_dim, ("embed", "patch"), **kw)
        self.scale_shift_table = _param(
            nnx.initializers.normal(stddev=cfg.width**-0.5), (None, "norm"), rngs, (2, cfg.width), F32
        )

    def __call__(self, latents: jax.Array, timestep: jax.Array, text: jax.Array) -> jax.Array:
        """latents ``[B, T, H, W, C]``, timestep ``[B]``, text ``[B, L, Dt]`` -> ``[B, T, H, W, C_out]``."""
        cfg = self.cfg
        dt = as_dtype(cfg.dtype)
        if latents.ndim != 5 or latents.shape[-1] != cfg.in_channels:
            raise ValueError(f"Wan wants latents [B, T, H, W, {cfg.in_channels}], got {latents.shape}")
        B, T, H, W, _ = latents.shape
        pt, ph, pw = cfg.patch_size
        if T % pt or H % ph or W % pw:
            raise ValueError(f"Wan: latents [T, H, W] = {(T, H, W)} not divisible by patch {cfg.patch_size}")
        if text.ndim != 3 or text.shape[0] != B or text.shape[-1] != cfg.text_dim:
            raise ValueError(f"Wan wants text [{B}, L, {cfg.text_dim}], got {text.shape}")
        if jnp.shape(timestep) != (B,):
            raise ValueError(f"Wan wants timestep [{B}], got shape {jnp.shape(timestep)}")
        grid = (T // pt, H // ph, W // pw)

        x = self.patch_embedding(patchify(latents.astype(dt), cfg.patch_size))  # [B, N, D]
        x = constrain(x, ("act_batch", "act_seq", "act_embed"))
        temb, e6, ctx = self.condition_embedder(timestep, text)
        ctx = constrain(ctx, ("act_batch", "act_text", "act_embed"))
        rope = rope_3d_angles(*grid, cfg.head_dim, cfg.rope_theta)  # Wan's (t, h, w) split of the pairs

        graphdef, state = nnx.split(self.blocks)

        def body(h: jax.Array, block_state) -> tuple[jax.Array, None]:
            return nnx.merge(graphdef, block_state)(h, e6, ctx, rope), None

        if cfg.remat != "none":
            body = jax.checkpoint(body, prevent_cse=False, policy=REMAT_POLICIES[cfg.remat])
        x, _ = jax.lax.scan(body, x, state)

        shift, scale = jnp.split(self.scale_shift_table[...][None] + temb[:, None].astype(F32), 2, axis=1)
        x = (layer_norm(x.astype(F32), cfg.eps) * (1 + scale) + shift).astype(dt)
        return unpatchify(self.proj_out(x), cfg.patch_size, grid)


def param_count(cfg: WanConfig) -> int:
    """Exact number of parameters of ``WanTransformer(cfg)`` (and of diffusers' model for the same config)."""
    D, F, Dt = cfg.width, cfg.ffn_dim, cfg.text_dim
    attn = 4 * (D * D + D) + 2 * D
    block = 2 * attn + (2 * D if cfg.cross_attn_norm else 0) + 2 * D * F + F + D + 6 * D
    embed = cfg.patch_dim * D + D + cfg.freq_dim * D + D + D * D + D + D * 6 * D + 6 * D
    embed += Dt * D + D + D * D + D
    head = D * cfg.out_patch_dim + cfg.out_patch_dim + 2 * D
    return embed + cfg.depth * block + head
