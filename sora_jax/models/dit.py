"""The spacetime Diffusion Transformer (DiT) with text cross-attention, its variant table and its cost model.

Owns: ``DiTConfig`` (the model's only input), ``VARIANTS`` / ``dit_config`` (named sizes and the paper each
follows), the modules ``TimestepEmbedder``, ``DiTBlock``, ``FinalLayer``, ``DiT``, and the analytic
``param_count`` / ``flops_per_token`` used for MFU.

Data flow (Peebles & Xie 2023, "Scalable Diffusion Models with Transformers", extended to video and text as
in PixArt-alpha / Open-Sora / Latte)::

    x [B,T,H,W,C] --patchify (pt,ph,pw)--> [B,N,P] --Linear--> tokens [B,N,D]
    c = TimestepEmbedder(t) (+ Linear(masked mean of text) when pooled_text_cond)            # [B, D]
    DiTBlock x depth (stacked params [depth, ...], run with lax.scan, optional remat):
        x += gate_msa * SelfAttn(modulate(LN(x), shift_msa, scale_msa))   # 3D RoPE + QK RMSNorm
        x += CrossAttn(RMSNorm(x), text, key mask)                         # QK RMSNorm, no modulation
        x += gate_mlp * Mlp(modulate(LN(x), shift_mlp, scale_mlp))
    FinalLayer: modulate(LN(x), shift, scale) --Linear--> [B,N,P] --unpatchify--> [B,T,H,W,C]
    out_conv = K (optional head): + Conv1x3x3(SiLU(unpatchify(Linear(same, D -> pt*ph*pw*K))))  # zero-init

adaLN-Zero: every block's modulation Linear (D -> 6D) is zero-initialised, so each block starts as the
identity; the cross-attention is not modulated and instead has a zero-initialised output projection (its own
"gate" at zero); the FinalLayer's modulation and output Linear are zero-initialised, so a fresh model outputs
exactly zero. Positions come from 3D RoPE computed at trace time (nothing stored).
"""

from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
from flax import nnx

from sora_jax.choices import DIT_VARIANTS, DiTVariant, PosEmbed, TextAttention
from sora_jax.models.layers import (
    ATTENTION_IMPLEMENTATIONS,
    Attention,
    Mlp,
    RMSNorm,
    as_dtype,
    gate,
    layer_norm,
    linear,
    modulate,
    patchify,
    rope_3d_angles,
    rope_split,
    sincos_2d,
    timestep_embedding,
    unpatchify,
    zeros_init,
)
from sora_jax.parallel.sequence import SEQ_PARALLEL
from sora_jax.parallel.sharding import constrain

FREQ_DIM = 256  # TimestepEmbedder's sinusoidal width, as in DiT
POS_EMBEDS = tuple(p.value for p in PosEmbed)
TEXT_ATTENTIONS = tuple(a.value for a in TextAttention)

# Rematerialisation: what each scanned block keeps for the backward pass (MaxText's names). "none" keeps
# everything (fastest, most memory); "full" keeps only the block input and recomputes the rest; "dots" keeps
# matmul outputs; "dots_no_batch" keeps weight matmuls but recomputes attention score matmuls; "attn_out"
# keeps the attention outputs (named in layers.Attention) and recomputes the MLP and projections.
REMAT_POLICIES = {
    "none": None,
    "full": jax.checkpoint_policies.nothing_saveable,
    "dots": jax.checkpoint_policies.checkpoint_dots,
    "dots_no_batch": jax.checkpoint_policies.dots_with_no_batch_dims_saveable,
    "attn_out": jax.checkpoint_policies.save_only_these_names("attn_out"),
}


@dataclasses.dataclass(frozen=True)
class DiTConfig:
    """Everything the DiT needs. ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype."""

    in_channels: int
    patch_size: tuple[int, int, int]
    width: int
    depth: int
    num_heads: int
    text_dim: int
    mlp_ratio: float = 4.0
    qk_norm: bool = True
    rope_theta: float = 10000.0
    dtype: str | jnp.dtype = "float32"
    param_dtype: str | jnp.dtype = "float32"
    attention_impl: str | None = None  # None/"xla" | "cudnn" | "reference"
    remat: str = "none"  # a name in REMAT_POLICIES: what the backward pass keeps of each block
    # True: the stacked blocks run as a loop (lax.scan), compile time flat in depth; False: a Python loop over
    # them (MaxText's scan_layers), one program with every block in it and no while loop: the demo's 4-block
    # step 1.05x / 1.10x the steps per second on 2 CPU cores (benchmarks/results/step_ab_scan_layers*.json);
    # compile time grows with depth. The same parameters either way.
    scan_layers: bool = True
    seq_parallel: str = "none"  # self-attention over the mesh's seq axis: none | ulysses | ring
    pooled_text_cond: bool = True
    # absolute positions added to the tokens after the patch embedding (``PosEmbed``): "none" (3D RoPE alone) or
    # "sincos_2d" (DiT's fixed 2D table over the grid's (h, w), the same in every frame; nothing stored)
    pos_embed: str = "none"
    # how the blocks read the text (``TextAttention``): "cross" (a cross-attention per block) or "joint" (the
    # caption's tokens, through one Linear, join the self-attention sequence, keys masked, RoPE-free, and go
    # through every block with the video tokens: SD3's joint attention with shared weights; no cross-attention)
    text_attention: str = "cross"
    # REPA (Yu et al. 2024, sora_jax/train/repa.py): a projector MLP on the tokens after block ``repa_layer``
    # (1..depth; 0: none) to a frozen encoder's feature width ``repa_dim``, used by the training loss only
    repa_layer: int = 0
    repa_dim: int = 0
    # a convolutional head (U-ViT's final conv, widened): K > 0 more channels per pixel from the final layer's
    # tokens (one more Linear), unpatchified, SiLU, a 1x3x3 conv per frame (zero-initialised) to the output channels,
    # added to the output, so that neighbouring patches meet at their seams; 0: none
    out_conv: int = 0

    def __post_init__(self):
        object.__setattr__(self, "patch_size", tuple(int(p) for p in self.patch_size))
        if len(self.patch_size) != 3 or min(self.patch_size) < 1:
            raise ValueError(
                f"DiTConfig.patch_size must be 3 positive ints (pt, ph, pw), got {self.patch_size}"
            )
        if self.width % self.num_heads:
            raise ValueError(f"DiTConfig.width {self.width} is not divisible by num_heads {self.num_heads}")
        rope_split(self.head_dim)  # raises on odd or too small head dims
        for key in ("dtype", "param_dtype"):
            try:
                dt = jnp.dtype(getattr(self, key))
            except TypeError as e:
                raise ValueError(f"DiTConfig.{key}={getattr(self, key)!r} is not a dtype") from e
            if not jnp.issubdtype(dt, jnp.floating):
                raise ValueError(f"DiTConfig.{key} must be a float dtype, got {dt}")
        if self.attention_impl is not None and self.attention_impl not in ATTENTION_IMPLEMENTATIONS:
            raise ValueError(
                f"DiTConfig.attention_impl={self.attention_impl!r}; "
                f"use None or one of {ATTENTION_IMPLEMENTATIONS}"
            )
        if self.remat not in REMAT_POLICIES:
            raise ValueError(f"DiTConfig.remat={self.remat!r} unknown; use one of {tuple(REMAT_POLICIES)}")
        if self.pos_embed not in POS_EMBEDS:
            raise ValueError(f"DiTConfig.pos_embed={self.pos_embed!r} unknown; use one of {POS_EMBEDS}")
        if self.pos_embed != "none" and self.width % 4:
            raise ValueError(f"DiTConfig.pos_embed={self.pos_embed!r} needs a width divisible by 4")
        if self.text_attention not in TEXT_ATTENTIONS:
            raise ValueError(
                f"DiTConfig.text_attention={self.text_attention!r} unknown; use one of {TEXT_ATTENTIONS}"
            )
        if self.text_attention == TextAttention.JOINT and self.seq_parallel != "none":
            raise ValueError("DiTConfig.text_attention='joint' needs seq_parallel='none'")
        if self.seq_parallel not in SEQ_PARALLEL:
            raise ValueError(
                f"DiTConfig.seq_parallel={self.seq_parallel!r} unknown; use one of {SEQ_PARALLEL}"
            )
        if min(self.in_channels, self.width, self.depth, self.text_dim) < 1:
            raise ValueError("DiTConfig: in_channels, width, depth, text_dim must be positive")
        if self.out_conv < 0:
            raise ValueError(f"DiTConfig.out_conv must be >= 0 (channels), got {self.out_conv}")
        if not 0 <= self.repa_layer <= self.depth or (self.repa_layer > 0) != (self.repa_dim > 0):
            raise ValueError(
                f"DiTConfig: repa_layer ({self.repa_layer}) must be in [0, depth = {self.depth}] and "
                f"repa_dim ({self.repa_dim}) > 0 exactly when repa_layer > 0"
            )

    @property
    def head_dim(self) -> int:
        return self.width // self.num_heads

    @property
    def mlp_dim(self) -> int:
        return int(self.width * self.mlp_ratio)

    @property
    def patch_dim(self) -> int:
        pt, ph, pw = self.patch_size
        return pt * ph * pw * self.in_channels


# Named sizes: one table, in sora_jax/choices.py (JAX-free, read by config validation too).
Variant = DiTVariant
VARIANTS = DIT_VARIANTS


def dit_config(variant: str, **overrides) -> DiTConfig:
    """``DiTConfig`` for a named variant (``VARIANTS``) with field overrides (e.g. ``dtype="bfloat16"``)."""
    if variant not in VARIANTS:
        raise ValueError(f"unknown DiT variant {variant!r}; choose one of {', '.join(VARIANTS)}")
    v = dataclasses.asdict(VARIANTS[variant])
    v.pop("follows")
    fields = {f.name for f in dataclasses.fields(DiTConfig)}
    unknown = sorted(set(overrides) - fields)
    if unknown:
        raise ValueError(f"dit_config: unknown field(s) {unknown}; DiTConfig has {sorted(fields)}")
    v.update(overrides)
    return DiTConfig(**v)


# ------------------------------------------------------------------------------------------------ modules


class TimestepEmbedder(nnx.Module):
    """t ``[B]`` (or per frame group ``[B, G]``) -> sinusoidal ``[..., 256]`` -> Linear -> SiLU -> Linear ->
    ``[B, D]`` (``[B, G, D]``)."""

    def __init__(self, width: int, *, dtype, param_dtype, rngs: nnx.Rngs):
        kw = dict(dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc1 = linear(FREQ_DIM, width, ("cond", "embed"), **kw)
        self.fc2 = linear(width, width, ("embed", "cond"), **kw)
        self.dtype = as_dtype(dtype)

    def __call__(self, t: jax.Array) -> jax.Array:
        freq = timestep_embedding(t, FREQ_DIM).astype(self.dtype)
        return self.fc2(jax.nn.silu(self.fc1(freq)))


class DiTBlock(nnx.Module):
    """adaLN-Zero self-attention (3D RoPE, QK-norm), un-modulated cross-attention to text, modulated MLP."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        D = cfg.width
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        akw = dict(qk_norm=cfg.qk_norm, implementation=cfg.attention_impl, **kw)
        self.attn = Attention(D, cfg.num_heads, seq_parallel=cfg.seq_parallel, **akw)
        self.joint = cfg.text_attention == TextAttention.JOINT
        if not self.joint:
            self.cross_norm = RMSNorm(D, param_dtype=cfg.param_dtype, rngs=rngs)
            self.cross_attn = Attention(D, cfg.num_heads, context_dim=cfg.text_dim, zero_out=True, **akw)
        self.mlp = Mlp(D, cfg.mlp_dim, **kw)
        self.adaLN_modulation = linear(D, 6 * D, ("embed", "cond"), zero=True, **kw)

    def __call__(
        self,
        x: jax.Array,
        c: jax.Array,
        text: jax.Array,
        text_mask: jax.Array,
        rope: tuple[jax.Array, jax.Array],
    ) -> jax.Array:
        """x ``[B, N, D]``, c ``[B, D]`` (or per frame group ``[B, G, D]``), text ``[B, L, Dt]``, text_mask
        ``[B, L]`` -> ``[B, N, D]``. Joint text attention: x is ``[B, N + L, D]`` (the text tokens last), text
        None and text_mask the keys' mask ``[B, N + L]``; c ``[B, D]`` or per token ``[B, N + L, D]``."""
        mod = self.adaLN_modulation(jax.nn.silu(c))  # [B, 6D] or [B, G, 6D]
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = jnp.split(mod, 6, axis=-1)
        mask = text_mask if self.joint else None
        h = self.attn(modulate(layer_norm(x), shift_msa, scale_msa), mask=mask, rope=rope)
        x = x + gate(gate_msa, h)
        x = constrain(x, ("act_batch", "act_seq", "act_embed"))
        if not self.joint:
            x = x + self.cross_attn(self.cross_norm(x), text, mask=text_mask)
            x = constrain(x, ("act_batch", "act_seq", "act_embed"))
        x = x + gate(gate_mlp, self.mlp(modulate(layer_norm(x), shift_mlp, scale_mlp)))
        return constrain(x, ("act_batch", "act_seq", "act_embed"))


class FinalLayer(nnx.Module):
    """modulate(LN(x), shift, scale) -> Linear(D -> pt*ph*pw*C); modulation and output zero-initialised.
    With ``out_conv`` = K also ``features``: Linear(D -> pt*ph*pw*K), the convolutional head's input."""

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.adaLN_modulation = linear(cfg.width, 2 * cfg.width, ("embed", "cond"), zero=True, **kw)
        self.linear = linear(cfg.width, cfg.patch_dim, ("embed", "patch"), zero=True, **kw)
        k = math.prod(cfg.patch_size) * cfg.out_conv
        self.features = linear(cfg.width, k, ("embed", "patch"), **kw) if k else None

    def __call__(self, x: jax.Array, c: jax.Array) -> jax.Array | tuple[jax.Array, jax.Array]:
        """x ``[B, N, D]``, c ``[B, D]`` or ``[B, G, D]`` -> ``[B, N, P]``; with features also ``[B, N, P/C*K]``."""
        shift, scale = jnp.split(self.adaLN_modulation(jax.nn.silu(c)), 2, axis=-1)
        h = modulate(layer_norm(x), shift, scale)
        return self.linear(h) if self.features is None else (self.linear(h), self.features(h))


def conv_1x3x3(x: jax.Array, kernel: jax.Array, bias: jax.Array) -> jax.Array:
    """``nnx.Conv`` with a (1, 3, 3) kernel and SAME padding as one matmul over the 9 shifted copies (im2col):
    x ``[B, T, H, W, K]``, kernel ``[1, 3, 3, K, C]`` -> ``[B, T, H, W, C]``. XLA CPU runs a convolution with
    few output channels and its gradients far slower than this dot."""
    _, _, H, W, K = x.shape
    xp = jnp.pad(x, ((0, 0), (0, 0), (1, 1), (1, 1), (0, 0)))
    cols = jnp.concatenate([xp[:, :, a : a + H, b : b + W] for a in range(3) for b in range(3)], -1)
    return cols @ kernel.reshape(9 * K, -1).astype(x.dtype) + bias.astype(x.dtype)


class DiT(nnx.Module):
    """Spacetime DiT: ``(x [B,T,H,W,C], t [B] or [B,T], text [B,L,Dt], text_mask [B,L]) -> [B,T,H,W,C]``.

    ``t`` is model time in [0, 1000] (float), one per sample, or one per frame ``[B, T]`` for conditioning on
    frames (clean conditioning frames at t = 0, Open-Sora's mask strategies): the adaLN modulation is then
    computed per temporal patch group from the largest time among the group's ``pt`` frames and applied to
    that group's tokens. Equal times in every frame give exactly the per-sample result. Blocks are stored stacked (leading axis ``"layers"``) and run
    with ``jax.lax.scan`` so compile time does not grow with depth (``cfg.scan_layers``; False unrolls it).
    """

    def __init__(self, cfg: DiTConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        kw = dict(dtype=cfg.dtype, param_dtype=cfg.param_dtype, rngs=rngs)
        self.x_embedder = linear(cfg.patch_dim, cfg.width, ("patch", "embed"), **kw)
        self.t_embedder = TimestepEmbedder(cfg.width, **kw)
        self.y_embedder = (
            linear(cfg.text_dim, cfg.width, ("embed", "cond"), **kw) if cfg.pooled_text_cond else None
        )
        self.context_embedder = (  # joint text attention: the caption's tokens into the sequence
            linear(cfg.text_dim, cfg.width, ("embed", "cond"), **kw)
            if cfg.text_attention == TextAttention.JOINT
            else None
        )

        @nnx.split_rngs(splits=cfg.depth)
        @nnx.vmap(in_axes=(0,), out_axes=0, transform_metadata={nnx.PARTITION_NAME: "layers"})
        def make_blocks(r: nnx.Rngs) -> DiTBlock:
            return DiTBlock(cfg, rngs=r)

        self.blocks = make_blocks(rngs)
        self.final_layer = FinalLayer(cfg, rngs=rngs)
        self.head_conv = (
            nnx.Conv(
                cfg.out_conv,
                cfg.in_channels,
                kernel_size=(1, 3, 3),
                padding="SAME",
                kernel_init=zeros_init((None, None, None, "conv_in", "conv_out")),
                bias_init=zeros_init(("conv_out",)),
                dtype=as_dtype(cfg.dtype),
                param_dtype=as_dtype(cfg.param_dtype),
                rngs=rngs,
            )
            if cfg.out_conv
            else None
        )
        if cfg.repa_layer:  # REPA's projector (its paper: 3 linear layers, SiLU), hidden 2 x width
            hid = 2 * cfg.width
            self.repa_proj = nnx.List(
                [
                    linear(cfg.width, hid, ("embed", "mlp"), **kw),
                    linear(hid, hid, ("mlp", "embed"), **kw),
                    linear(hid, cfg.repa_dim, ("embed", "patch"), **kw),
                ]
            )

    def _join_text(self, tokens, c, rope, text, text_mask):
        """Joint text attention: the blocks' inputs for [video tokens ``[B, N, D]``, text tokens] -> tokens
        ``[B, N + L, D]``; c as given, or per token ``[B, N + L, D]`` when per frame group (each video token its
        group's, the text tokens the groups' mean); RoPE angles with the text unrotated; the keys' mask
        ``[B, N + L]``."""
        B, N, _ = tokens.shape
        L = text.shape[1]
        tokens = jnp.concatenate([tokens, self.context_embedder(text)], 1)
        if c.ndim == 3:
            text_c = jnp.broadcast_to(c.mean(1, keepdims=True), (B, L, c.shape[-1]))
            c = jnp.concatenate([jnp.repeat(c, N // c.shape[1], axis=1), text_c], 1)
        cos, sin = rope
        rope = (
            jnp.concatenate([cos, jnp.ones((L, cos.shape[1]), cos.dtype)]),
            jnp.concatenate([sin, jnp.zeros((L, sin.shape[1]), sin.dtype)]),
        )
        return tokens, c, rope, jnp.concatenate([jnp.ones((B, N), jnp.bool_), text_mask], 1)

    def __call__(
        self, x: jax.Array, t: jax.Array, text: jax.Array, text_mask: jax.Array, features: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """x ``[B, T, H, W, C]`` -> ``[B, T, H, W, C]``; ``features`` (a REPA model): also the projected tokens
        after block ``repa_layer``, ``[B, N, repa_dim]`` in patch order (``patchify``)."""
        cfg = self.cfg
        if features and not cfg.repa_layer:
            raise ValueError("DiT(features=True) needs DiTConfig.repa_layer > 0")
        dt = as_dtype(cfg.dtype)
        if x.ndim != 5 or x.shape[-1] != cfg.in_channels:
            raise ValueError(f"DiT wants x [B, T, H, W, {cfg.in_channels}], got {x.shape}")
        B, T, H, W, _ = x.shape
        pt, ph, pw = cfg.patch_size
        if T % pt or H % ph or W % pw:
            raise ValueError(
                f"DiT: video [T, H, W] = {(T, H, W)} is not divisible by patch_size {cfg.patch_size}"
            )
        if text.ndim != 3 or text.shape[0] != B or text.shape[-1] != cfg.text_dim:
            raise ValueError(f"DiT wants text [{B}, L, {cfg.text_dim}], got {text.shape}")
        if text_mask.shape != text.shape[:2]:
            raise ValueError(f"DiT: text_mask {text_mask.shape} != text [B, L] {text.shape[:2]}")
        if jnp.shape(t) not in ((B,), (B, T)):
            raise ValueError(f"DiT wants t [{B}] or per frame [{B}, {T}], got shape {jnp.shape(t)}")
        grid = (T // pt, H // ph, W // pw)
        if (
            jnp.ndim(t) == 2
        ):  # per frame -> per temporal patch group [B, gt]: a group is clean only if all are
            t = jnp.max(jnp.reshape(t, (B, grid[0], pt)), axis=-1)
        text_mask = text_mask.astype(jnp.bool_)
        text = constrain(text.astype(dt), ("act_batch", "act_text", "act_embed"))

        tokens = self.x_embedder(patchify(x.astype(dt), cfg.patch_size))  # [B, N, D]
        if cfg.pos_embed == PosEmbed.SINCOS_2D:  # the same (h, w) table in every temporal group
            tokens = tokens + jnp.tile(sincos_2d(grid[1], grid[2], cfg.width), (grid[0], 1)).astype(dt)
        tokens = constrain(tokens, ("act_batch", "act_seq", "act_embed"))
        c = self.t_embedder(t)  # [B, D]
        if self.y_embedder is not None:
            m = text_mask[..., None].astype(jnp.float32)
            pooled = jnp.sum(text.astype(jnp.float32) * m, axis=1) / jnp.maximum(jnp.sum(m, axis=1), 1.0)
            y = self.y_embedder(pooled.astype(dt))
            c = c + (y[:, None] if c.ndim == 3 else y)
        rope = rope_3d_angles(*grid, cfg.head_dim, cfg.rope_theta)
        num_video = tokens.shape[1]
        c_blocks = c  # the blocks' conditioning; the final layer keeps c
        if self.context_embedder is not None:
            tokens, c_blocks, rope, text_mask = self._join_text(tokens, c, rope, text, text_mask)
            text = None

        graphdef, state = nnx.split(self.blocks)

        def body(h: jax.Array, block_state) -> tuple[jax.Array, None]:
            block = nnx.merge(graphdef, block_state)
            return block(h, c_blocks, text, text_mask, rope), None

        if cfg.remat != "none":
            body = jax.checkpoint(body, prevent_cse=False, policy=REMAT_POLICIES[cfg.remat])

        def run_blocks(h: jax.Array, blocks_state) -> jax.Array:
            with jax.named_scope("blocks"):  # a name for profiles (benchmarks/cpu_step_profile.py)
                if cfg.scan_layers:
                    return jax.lax.scan(body, h, blocks_state)[0]
                # unrolled: a Python loop (a scan of one block with unroll=True still lowers to a while loop)
                for i in range(jax.tree.leaves(blocks_state)[0].shape[0]):
                    h = body(h, jax.tree.map(lambda a, i=i: a[i], blocks_state))[0]
                return h

        if features:  # two scans: the blocks up to repa_layer, then the rest
            k = cfg.repa_layer
            tokens = run_blocks(tokens, jax.tree.map(lambda a: a[:k], state))
            z = tokens[:, :num_video]
            for i, layer in enumerate(self.repa_proj):
                z = layer(z) if i == 0 else layer(jax.nn.silu(z))
            tokens = run_blocks(tokens, jax.tree.map(lambda a: a[k:], state))
        else:
            tokens = run_blocks(tokens, state)

        out = self.head(tokens[:, :num_video], c, grid)
        return (out, z) if features else out

    def head(self, tokens: jax.Array, c: jax.Array, grid: tuple[int, int, int]) -> jax.Array:
        """The final layer (and the convolutional head, across the patches' seams): tokens ``[B, N, D]`` of the
        ``grid`` (gt, gh, gw), conditioning c -> ``[B, T, H, W, C]``."""
        patch = self.cfg.patch_size
        if self.head_conv is None:
            return unpatchify(self.final_layer(tokens, c), patch, grid)
        out, feat = self.final_layer(tokens, c)
        feat = jax.nn.silu(unpatchify(feat, patch, grid))
        kernel, bias = self.head_conv.kernel.get_value(), self.head_conv.bias.get_value()
        return unpatchify(out, patch, grid) + conv_1x3x3(feat, kernel, bias)


# ------------------------------------------------------------------------------------------ cost model


def param_count(cfg: DiTConfig) -> int:
    """Exact number of parameters of ``DiT(cfg)`` from the architecture (tests check it against the model)."""
    D, F, P, Dt, Hd = cfg.width, cfg.mlp_dim, cfg.patch_dim, cfg.text_dim, cfg.head_dim
    qkn = 2 * Hd if cfg.qk_norm else 0
    self_attn = 4 * D * D + 4 * D + qkn
    joint = cfg.text_attention == TextAttention.JOINT
    cross_attn = 0 if joint else 2 * D * D + 2 * Dt * D + 4 * D + qkn + D  # + the pre-norm scale
    mlp = D * F + F + F * D + D
    ada = D * 6 * D + 6 * D
    block = self_attn + cross_attn + mlp + ada
    embed = P * D + D + FREQ_DIM * D + D + D * D + D + ((Dt * D + D) if cfg.pooled_text_cond else 0)
    embed += (Dt * D + D) if joint else 0
    final = D * 2 * D + 2 * D + D * P + P
    if cfg.out_conv:  # the features Linear and the 1x3x3 conv
        k = math.prod(cfg.patch_size) * cfg.out_conv
        final += D * k + k + 9 * cfg.out_conv * cfg.in_channels + cfg.in_channels
    repa = (
        (D * 2 * D + 2 * D + 4 * D * D + 2 * D + 2 * D * cfg.repa_dim + cfg.repa_dim) if cfg.repa_layer else 0
    )
    return embed + cfg.depth * block + final + repa


def flops_per_token(cfg: DiTConfig, num_tokens: int, text_len: int) -> float:
    """Forward FLOPs per video token (2 per multiply-add): matmuls plus attention scores and values.

    Per-sample work (conditioning, adaLN) and per-text-token work (cross-attention k/v projections) is
    amortised over the ``num_tokens`` video tokens. Training is about 3x this.
    """
    D, F, P, Dt, N, L = cfg.width, cfg.mlp_dim, cfg.patch_dim, cfg.text_dim, num_tokens, text_len
    # the convolutional head, per token: its features Linear and the conv over the token's pixels
    head = 2 * math.prod(cfg.patch_size) * cfg.out_conv * (D + 9 * cfg.in_channels)
    cond = 2 * (FREQ_DIM * D + D * D + (Dt * D if cfg.pooled_text_cond else 0) + 2 * D * D) / N
    if cfg.text_attention == TextAttention.JOINT:  # N + L tokens through every block, no cross-attention
        S = N + L
        per_block = (S * (2 * 4 * D * D + 2 * 2 * S * D + 2 * 2 * D * F) + 2 * 6 * D * D) / N
        return float(cfg.depth * per_block + 2 * P * D + 2 * D * P + 2 * Dt * D * L / N + cond + head)
    per_block = (
        2 * 4 * D * D  # self-attention q, k, v, o
        + 2 * 2 * N * D  # self-attention scores and values
        + 2 * 2 * D * D  # cross-attention q, o
        + 2 * 2 * Dt * D * L / N  # cross-attention k, v on the text tokens
        + 2 * 2 * L * D  # cross-attention scores and values
        + 2 * 2 * D * F  # MLP
        + 2 * 6 * D * D / N  # adaLN modulation, once per sample
    )
    return float(cfg.depth * per_block + 2 * P * D + 2 * D * P + cond + head)


def repa_flops_per_token(cfg: DiTConfig) -> float:
    """Forward FLOPs per video token of the REPA projector (training only; 0 without one)."""
    D = cfg.width
    return float(2 * (2 * D * D + 4 * D * D + 2 * D * cfg.repa_dim)) if cfg.repa_layer else 0.0


def summary(cfg: DiTConfig) -> str:
    """One line for logs: size, shape and parameter count."""
    n = param_count(cfg)
    return (
        f"DiT width={cfg.width} depth={cfg.depth} heads={cfg.num_heads} patch={cfg.patch_size} "
        f"params={n / 1e6:.1f}M ({math.log10(max(n, 1)):.1f} log10)"
    )
