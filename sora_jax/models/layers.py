"""Building blocks shared by the DiT and the text encoder: attention dispatch, norms, MLP, 3D RoPE, patchify.

Owns: ``dot_product_attention`` (one entry point for the XLA / cuDNN / naive reference paths), ``RMSNorm``,
``layer_norm`` (parameter-free, as DiT's), ``Mlp`` (GELU tanh), ``Attention`` (q/k/v/o as einsum kernels with
optional QK-norm and RoPE), the 3D rotary tables ``rope_3d_angles`` / ``apply_rope`` (computed, never stored),
``patchify`` / ``unpatchify`` for spacetime patches, DiT's sinusoidal ``timestep_embedding`` and ``modulate``.

Layouts: tokens ``[B, N, D]``; per-head tensors ``[B, N, K, H]`` (K heads of width H). Norms and softmax run
in float32 and cast back to the compute dtype.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from functools import partial

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from jax.ad_checkpoint import checkpoint_name

from sora_jax.choices import AttentionImpl
from sora_jax.models import lora
from sora_jax.parallel import sequence
from sora_jax.parallel.sharding import constrain

ATTENTION_IMPLEMENTATIONS = tuple(a.value for a in AttentionImpl)

Dtype = jnp.dtype | str | type


def as_dtype(dtype: Dtype) -> jnp.dtype:
    """``"float32"`` / ``"bfloat16"`` / ``jnp.bfloat16`` -> ``jnp.dtype``."""
    return jnp.dtype(dtype)


# ----------------------------------------------------------------------------------------------- attention


def _expand_mask(mask: jax.Array | None, q: jax.Array, k: jax.Array) -> jax.Array | None:
    """A key mask ``[B, M]`` becomes ``[B, 1, 1, M]``; other masks must broadcast to ``[B, K, N, M]``."""
    if mask is None:
        return None
    mask = jnp.asarray(mask)
    if mask.dtype != jnp.bool_:
        raise ValueError(f"attention mask must be bool, got {mask.dtype}")
    if mask.ndim == 2:
        if mask.shape != (k.shape[0], k.shape[1]):
            raise ValueError(f"key mask shape {mask.shape} != (B, M) = {(k.shape[0], k.shape[1])}")
        return mask[:, None, None, :]
    if mask.ndim != 4:
        raise ValueError(f"attention mask must be [B, M] or broadcastable to [B, K, N, M]; got {mask.shape}")
    return mask


def _reference_attention(q: jax.Array, k: jax.Array, v: jax.Array, mask: jax.Array | None) -> jax.Array:
    """Naive attention in float32: softmax(q k^T / sqrt(H)) v, masked logits set to the dtype's minimum."""
    scale = 1.0 / math.sqrt(q.shape[-1])
    logits = jnp.einsum("BNKH,BMKH->BKNM", q.astype(jnp.float32), k.astype(jnp.float32)) * scale
    if mask is not None:
        logits = jnp.where(mask, logits, jnp.finfo(jnp.float32).min)
    probs = jax.nn.softmax(logits, axis=-1)
    out = jnp.einsum("BKNM,BMKH->BNKH", probs, v.astype(jnp.float32))
    return out.astype(q.dtype)


def dot_product_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    implementation: str | None = None,
) -> jax.Array:
    """Scaled dot-product attention: q ``[B, N, K, H]``, k/v ``[B, M, K, H]`` -> ``[B, N, K, H]``.

    ``mask`` (bool, True = attend) is a key mask ``[B, M]`` or anything broadcastable to ``[B, K, N, M]``.
    ``implementation``: ``None``/``"xla"`` -> ``jax.nn.dot_product_attention`` XLA path; ``"cudnn"`` -> the
    cuDNN flash kernel (needs bf16/fp16 inputs; raises otherwise rather than silently falling back);
    ``"reference"`` -> a naive einsum path used by the tests; ``"chunked"`` -> ``chunked_attention``, flash-style
    blocks in plain JAX (any backend, any dtype), memory linear in N instead of quadratic.

    On cuDNN a key mask ``[B, M]`` goes in as per-sample key lengths (``mask.sum(-1)``), never as a dense
    mask (cuDNN is slow with an explicit one): key masks must then be prefixes (padding at the end, as every
    tokenizer here writes them) and keep at least one key. Other masks stay dense.
    """
    impl = implementation or "xla"
    if impl not in ATTENTION_IMPLEMENTATIONS:
        raise ValueError(f"attention implementation {impl!r} unknown; use one of {ATTENTION_IMPLEMENTATIONS}")
    if q.ndim != 4 or k.ndim != 4 or v.ndim != 4:
        raise ValueError(f"attention wants [B, N, K, H] inputs; got {q.shape}, {k.shape}, {v.shape}")
    mask4 = _expand_mask(mask, q, k)
    if impl == "reference":
        return _reference_attention(q, k, v, mask4)
    if impl == "chunked":
        return chunked_attention(q, k, v, mask=mask4)
    if impl == "cudnn":
        if q.dtype not in (jnp.bfloat16, jnp.float16) or not (q.dtype == k.dtype == v.dtype):
            raise ValueError(
                f"cudnn attention needs equal bf16/fp16 q, k, v; got {q.dtype}, {k.dtype}, {v.dtype}"
                " (set the model dtype to bfloat16 or use attention_impl='xla')"
            )
        if mask4 is not None and jnp.ndim(mask) == 2:
            return prefix_key_attention(q, k, v, mask, implementation=impl)
        if mask4 is not None:
            mask4 = jnp.broadcast_to(mask4, (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
    return jax.nn.dot_product_attention(q, k, v, mask=mask4, implementation=impl)


CHUNK_Q = 1024  # query tokens per block of ``chunked_attention``
CHUNK_K = 1024  # key tokens per block


def chunked_attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mask: jax.Array | None = None,
    q_chunk: int | None = None,
    k_chunk: int | None = None,
) -> jax.Array:
    """Flash-style attention in plain JAX: q ``[B, N, K, H]``, k/v ``[B, M, K, H]`` -> ``[B, N, K, H]``.

    ``mask`` (bool, True = attend) broadcastable to ``[B, K, N, M]`` (``dot_product_attention`` expands a key
    mask ``[B, M]`` to ``[B, 1, 1, M]``). Queries go in blocks of ``q_chunk`` (``lax.map``); inside one, keys in
    blocks of ``k_chunk`` (``lax.scan``; defaults ``CHUNK_Q``, ``CHUNK_K``) with an online softmax in float32 (running max ``m``, normaliser ``l``,
    accumulator). Both bodies are under ``jax.checkpoint``: the backward pass recomputes a block's scores from
    q/k/v, so the step holds one ``[B, q_chunk, K, k_chunk]`` tile of scores, plus per query block the
    ``[M / k_chunk]`` running accumulators, never ``[B, K, N, M]``. N and M need not divide the chunks: queries
    are padded (rows dropped), padded keys are masked out. Masked logits are the float32 minimum, as in the
    reference path (a row with every key masked averages all its real keys).
    """
    B, N, K, H = q.shape
    M = k.shape[1]
    cq, ck = min(q_chunk or CHUNK_Q, N), min(k_chunk or CHUNK_K, M)
    nq, nk = -(-N // cq), -(-M // ck)
    pad_n, pad_m = nq * cq - N, nk * ck - M
    scale = 1.0 / math.sqrt(H)
    f32 = jnp.float32

    qs = jnp.pad(q, ((0, 0), (0, pad_n), (0, 0), (0, 0))).reshape(B, nq, cq, K, H).swapaxes(0, 1)
    ks, vs = (
        jnp.pad(a, ((0, 0), (0, pad_m), (0, 0), (0, 0))).reshape(B, nk, ck, K, H).swapaxes(0, 1)
        for a in (k, v)
    )
    valid = (jnp.arange(nk * ck) < M).reshape(nk, 1, 1, 1, ck) if pad_m else None  # padded keys
    mq = mk = None  # the mask per query block (map xs) or shared by all of them (closed over)
    if mask is not None:
        mb, mh, mn = mask.shape[:3]
        m4 = jnp.broadcast_to(mask, (mb, mh, mn, M)).transpose(
            0, 2, 1, 3
        )  # [mb, mn, mh, M]: the scores' layout
        m4 = jnp.pad(m4, ((0, 0), (0, 0), (0, 0), (0, pad_m)))
        m4 = m4.reshape(mb, mn, mh, nk, ck).transpose(3, 0, 1, 2, 4)  # [nk, mb, mn, mh, ck]
        if mn == 1:
            mk = m4
        else:
            m4 = jnp.pad(m4, ((0, 0), (0, 0), (0, pad_n), (0, 0), (0, 0)))
            mq = m4.reshape(nk, mb, nq, cq, mh, ck).transpose(2, 0, 1, 3, 4, 5)  # [nq, nk, mb, cq, mh, ck]

    @jax.checkpoint
    def query_block(xs):
        qc, mask_q = xs  # [B, cq, K, H], [nk, mb, cq, mh, ck] or None

        @jax.checkpoint
        def key_block(carry, xs):
            m, l, acc = carry  # [B, cq, K], [B, cq, K], [B, cq, K, H] float32
            kc, vc, valid_c, mask_c = xs
            s = jnp.einsum("BNKH,BMKH->BNKM", qc, kc, preferred_element_type=f32) * scale
            if mask_c is not None:
                s = jnp.where(mask_c, s, jnp.finfo(f32).min)
            if valid_c is not None:
                s = jnp.where(valid_c, s, -jnp.inf)
            m_new = jnp.maximum(
                m, jax.lax.stop_gradient(jnp.max(s, axis=-1))
            )  # the result does not depend on m
            p = jnp.exp(s - m_new[..., None])
            corr = jnp.exp(m - m_new)
            l = l * corr + jnp.sum(p, axis=-1)
            acc = acc * corr[..., None] + jnp.einsum("BNKM,BMKH->BNKH", p, vc.astype(f32))
            return (m_new, l, acc), None

        init = (
            jnp.full((B, cq, K), -jnp.inf, f32),
            jnp.zeros((B, cq, K), f32),
            jnp.zeros((B, cq, K, H), f32),
        )
        (_, l, acc), _ = jax.lax.scan(key_block, init, (ks, vs, valid, mk if mask_q is None else mask_q))
        return (acc / l[..., None]).astype(q.dtype)

    out = jax.lax.map(query_block, (qs, mq))  # [nq, B, cq, K, H]
    return out.swapaxes(0, 1).reshape(B, nq * cq, K, H)[:, :N]


def prefix_key_attention(
    q: jax.Array, k: jax.Array, v: jax.Array, key_mask: jax.Array, *, implementation: str
) -> jax.Array:
    """Attention over the first ``key_mask.sum(-1)`` keys of each sample: q ``[B, N, K, H]``, k/v
    ``[B, M, K, H]``, ``key_mask`` bool ``[B, M]`` (a prefix) -> ``[B, N, K, H]``.

    The length form of a key mask (``key_value_seq_lengths``), which cuDNN's flash kernel runs without
    materialising a mask; ``implementation="xla"`` runs the same call on any backend (the tests compare it
    with the dense-mask reference).
    """
    lengths = jnp.sum(key_mask.astype(jnp.int32), axis=-1)
    q_lengths = jnp.full((q.shape[0],), q.shape[1], jnp.int32)
    return jax.nn.dot_product_attention(
        q, k, v, query_seq_lengths=q_lengths, key_value_seq_lengths=lengths, implementation=implementation
    )


# ---------------------------------------------------------------------------------------------- norms, MLP


def layer_norm(x: jax.Array, eps: float = 1e-6) -> jax.Array:
    """Parameter-free LayerNorm over the last axis (DiT's ``elementwise_affine=False``), float32 inside."""
    xf = x.astype(jnp.float32)
    mean = jnp.mean(xf, axis=-1, keepdims=True)
    var = jnp.mean(jnp.square(xf - mean), axis=-1, keepdims=True)
    return ((xf - mean) * jax.lax.rsqrt(var + eps)).astype(x.dtype)


class RMSNorm(nnx.Module):
    """RMSNorm over the last axis with a learned scale ``[D]`` (logical ``("norm",)``); float32 inside."""

    def __init__(self, dim: int, *, eps: float = 1e-6, param_dtype: Dtype = jnp.float32, rngs: nnx.Rngs):
        del rngs  # deterministic init; kept for a uniform constructor signature
        init = nnx.with_partitioning(nnx.initializers.ones_init(), ("norm",))
        self.scale = nnx.Param(init(jax.random.key(0), (dim,), as_dtype(param_dtype)))
        self.eps = eps

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[..., D]`` -> ``[..., D]`` in x's dtype."""
        xf = x.astype(jnp.float32)
        y = xf * jax.lax.rsqrt(jnp.mean(jnp.square(xf), axis=-1, keepdims=True) + self.eps)
        return (y * self.scale[...].astype(jnp.float32)).astype(x.dtype)


def dense_init(names: Sequence[str | None], init=None):
    """A kernel initializer (default: xavier uniform, as DiT) annotated with logical axis names."""
    return nnx.with_partitioning(init or nnx.initializers.xavier_uniform(), tuple(names))


def zeros_init(names: Sequence[str | None]):
    return nnx.with_partitioning(nnx.initializers.zeros_init(), tuple(names))


def linear(
    din: int,
    dout: int,
    names: tuple[str, str],
    *,
    zero: bool = False,
    dtype: Dtype = jnp.float32,
    param_dtype: Dtype = jnp.float32,
    rngs: nnx.Rngs,
) -> nnx.Linear:
    """``nnx.Linear``, logical names on kernel ``[din, dout]`` and bias ``[dout]``; ``zero``: adaLN-Zero."""
    kinit = zeros_init(names) if zero else dense_init(names)
    return nnx.Linear(
        din,
        dout,
        kernel_init=kinit,
        bias_init=zeros_init((names[1],)),
        dtype=as_dtype(dtype),
        param_dtype=as_dtype(param_dtype),
        rngs=rngs,
    )


class Mlp(nnx.Module):
    """Transformer MLP: Linear(D -> F), GELU (tanh approximation), Linear(F -> D).

    ``token_chunk > 0``: the tokens go through in blocks of that many (``lax.map``, each under
    ``jax.checkpoint``), so a long sequence never holds the hidden ``[B, N, F]`` whole, forward or backward;
    the same numbers (the MLP is per token)."""

    LORA_KERNELS = lora.MLP_KERNELS  # the kernels a LoRA adapter can go on (sora_jax/models/lora.py)

    def __init__(
        self,
        dim: int,
        hidden: int,
        *,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        token_chunk: int = 0,
        rngs: nnx.Rngs,
    ):
        self.fc1 = linear(dim, hidden, ("embed", "mlp"), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.fc2 = linear(hidden, dim, ("mlp", "embed"), dtype=dtype, param_dtype=param_dtype, rngs=rngs)
        self.token_chunk = token_chunk

    def __call__(self, x: jax.Array) -> jax.Array:
        """x ``[B, N, D]`` -> ``[B, N, D]``."""
        fc1, fc2 = self.fc1, self.fc2

        def mlp(x):
            # nnx.Linear's x @ kernel + bias, through lora.project: a quantized base kernel, adapters, DoRA
            h = lora.project(fc1, "kernel", x, 1, fc1.dtype or x.dtype, fc1.bias[...])
            h = constrain(jax.nn.gelu(h, approximate=True), ("act_batch", "act_seq", "act_mlp"))
            return lora.project(fc2, "kernel", h, 1, fc2.dtype or h.dtype, fc2.bias[...])

        c = self.token_chunk
        B, N, D = x.shape
        if not c or c >= N:
            return mlp(x)
        n = -(-N // c)
        xs = jnp.pad(x, ((0, 0), (0, n * c - N), (0, 0))).reshape(B, n, c, D).swapaxes(0, 1)  # [n, B, c, D]
        out = jax.lax.map(jax.checkpoint(mlp), xs)
        return out.swapaxes(0, 1).reshape(B, n * c, out.shape[-1])[:, :N]


def project_qkv(attn, x: jax.Array, context: jax.Array | None, dt) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q ``[B, N, K, H]`` from x ``[B, N, D]``, k and v ``[B, M, K, H]`` from context ``[B, M, Dc]`` (default
    x) through ``attn``'s ``wq / bq``, ``wk / bk``, ``wv / bv`` (``[D, K, H]`` / ``[K, H]``), computed in ``dt``."""
    ctx = x if context is None else context
    # "BND,DKH->BNKH" through lora.project: a quantized base kernel, LoRA adapters, DoRA, the bias
    q = lora.project(attn, "wq", x, 1, dt, attn.bq[...])
    k = lora.project(attn, "wk", ctx, 1, dt, attn.bk[...])
    v = lora.project(attn, "wv", ctx, 1, dt, attn.bv[...])
    return q, k, v


def project_out(attn, out: jax.Array, dt) -> jax.Array:
    """The output projection: out ``[B, N, K, H]`` through ``attn``'s ``wo [K, H, D]`` and ``bo [D]`` (plus its
    LoRA adapter, when it has one: ``lora.project``) -> ``[B, N, D]`` in ``dt``."""
    return lora.project(attn, "wo", out, 2, dt, attn.bo[...])  # "BNKH,KHD->BND"


class Attention(nnx.Module):
    """Multi-head attention with einsum kernels ``[D_in, K, H]`` (q from x, k/v from ``context``).

    Self-attention when ``context`` is None. Optional QK RMSNorm over H (one scale shared by all heads) and
    rotary embedding of q and k (self-attention only). ``zero_out`` zero-initialises the output projection.
    """

    LORA_KERNELS = lora.ATTENTION_KERNELS  # the kernels a LoRA adapter can go on (sora_jax/models/lora.py)

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        context_dim: int | None = None,
        qk_norm: bool = True,
        zero_out: bool = False,
        dtype: Dtype = jnp.float32,
        param_dtype: Dtype = jnp.float32,
        implementation: str | None = None,
        seq_parallel: str = "none",
        rngs: nnx.Rngs,
    ):
        if dim % num_heads:
            raise ValueError(f"width {dim} is not divisible by num_heads {num_heads}")
        K, H = num_heads, dim // num_heads
        cdim = context_dim or dim
        pd = as_dtype(param_dtype)
        binit = zeros_init(("heads", "kv"))
        # xavier over the fused fan-in/fan-out, as torch's Linear(D, D) viewed as [D, K, H]
        xavier = nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=0, out_axis=(1, 2))
        winit = dense_init(("embed", "heads", "kv"), xavier)
        self.wq = nnx.Param(winit(rngs.params(), (dim, K, H), pd))
        self.wk = nnx.Param(winit(rngs.params(), (cdim, K, H), pd))
        self.wv = nnx.Param(winit(rngs.params(), (cdim, K, H), pd))
        self.bq = nnx.Param(binit(rngs.params(), (K, H), pd))
        self.bk = nnx.Param(binit(rngs.params(), (K, H), pd))
        self.bv = nnx.Param(binit(rngs.params(), (K, H), pd))
        oinit = (
            zeros_init(("heads", "kv", "embed"))
            if zero_out
            else dense_init(
                ("heads", "kv", "embed"),
                nnx.initializers.variance_scaling(1.0, "fan_avg", "uniform", in_axis=(0, 1), out_axis=2),
            )
        )
        self.wo = nnx.Param(oinit(rngs.params(), (K, H, dim), pd))
        self.bo = nnx.Param(zeros_init(("embed",))(rngs.params(), (dim,), pd))
        self.q_norm = RMSNorm(H, param_dtype=pd, rngs=rngs) if qk_norm else None
        self.k_norm = RMSNorm(H, param_dtype=pd, rngs=rngs) if qk_norm else None
        self.dtype = as_dtype(dtype)
        self.implementation = implementation
        self.seq_parallel = sequence.check_mode(seq_parallel)

    def __call__(
        self,
        x: jax.Array,
        context: jax.Array | None = None,
        *,
        mask: jax.Array | None = None,
        rope: tuple[jax.Array, jax.Array] | None = None,
    ) -> jax.Array:
        """x ``[B, N, D]``, context ``[B, M, Dc]`` (default x), mask ``[B, M]`` or ``[B, K, N, M]``.

        Returns ``[B, N, D]``.
        """
        dt = self.dtype
        q, k, v = project_qkv(self, x, context, dt)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        q = constrain(q, ("act_batch", "act_seq", "act_heads", "act_kv"))
        kernel = partial(dot_product_attention, mask=mask, implementation=self.implementation)
        if context is None and mask is None and self.seq_parallel != "none":
            out = sequence.attention(q, k, v, mode=self.seq_parallel, kernel=kernel)
        else:
            out = kernel(q, k, v)
        out = checkpoint_name(constrain(out, ("act_batch", "act_seq", "act_heads", "act_kv")), "attn_out")
        return project_out(self, out, dt)


# ---------------------------------------------------------------------------------------------------- RoPE


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Rotary pairs given to (t, h, w): H/2 pairs split in three, h and w equal, t gets the remainder."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    pairs = head_dim // 2
    per = pairs // 3
    if per == 0:
        raise ValueError(f"3D RoPE needs head_dim >= 6, got {head_dim}")
    return pairs - 2 * per, per, per


def _axis_angles(pos: np.ndarray, pairs: int, theta: float) -> np.ndarray:
    """angles [N, pairs] = pos * theta^(-i / pairs), i.e. the 1D RoPE frequencies for a 2*pairs sub-dim."""
    inv_freq = theta ** (-np.arange(pairs, dtype=np.float64) / pairs)
    return pos[:, None].astype(np.float64) * inv_freq[None, :]


def rope_3d_angles(
    grid_t: int, grid_h: int, grid_w: int, head_dim: int, theta: float = 10000.0
) -> tuple[jax.Array, jax.Array]:
    """(cos, sin), float32 ``[N, head_dim/2]`` each, ``N = grid_t*grid_h*grid_w``, (t, h, w) row-major.

    The first pairs rotate by the frame index, the next by the row, the last by the column (``rope_split``).
    Computed from integer positions at trace time; a constant, never a parameter.
    """
    pt, ph, pw = rope_split(head_dim)
    t, h, w = np.meshgrid(np.arange(grid_t), np.arange(grid_h), np.arange(grid_w), indexing="ij")
    ang = np.concatenate(
        [
            _axis_angles(t.reshape(-1), pt, theta),
            _axis_angles(h.reshape(-1), ph, theta),
            _axis_angles(w.reshape(-1), pw, theta),
        ],
        axis=1,
    )
    return jnp.asarray(np.cos(ang), jnp.float32), jnp.asarray(np.sin(ang), jnp.float32)


def rope_1d_angles(n: int, head_dim: int, theta: float = 10000.0) -> tuple[jax.Array, jax.Array]:
    """(cos, sin), each float32 ``[n, head_dim/2]``, for positions 0..n-1 (the text encoder's RoPE)."""
    if head_dim % 2:
        raise ValueError(f"RoPE needs an even head_dim, got {head_dim}")
    ang = _axis_angles(np.arange(n), head_dim // 2, theta)
    return jnp.asarray(np.cos(ang), jnp.float32), jnp.asarray(np.sin(ang), jnp.float32)


def apply_rope(x: jax.Array, cos: jax.Array, sin: jax.Array) -> jax.Array:
    """Rotates x ``[B, N, K, H]`` by angles ``[N, H/2]`` (rotate-half: pairs i, i + H/2); float32 inside."""
    half = x.shape[-1] // 2
    xf = x.astype(jnp.float32)
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    out = jnp.concatenate([x1 * c - x2 * s, x2 * c + x1 * s], axis=-1)
    return out.astype(x.dtype)


# ------------------------------------------------------------------------------------------------ patching


def patchify(x: jax.Array, patch_size: tuple[int, int, int]) -> jax.Array:
    """x ``[B, T, H, W, C]`` -> tokens ``[B, N, pt*ph*pw*C]``, N in (t, h, w) row-major patch order.

    Each token flattens its patch as (pt, ph, pw, C).
    """
    B, T, H, W, C = x.shape
    pt, ph, pw = patch_size
    if T % pt or H % ph or W % pw:
        raise ValueError(
            f"video [T, H, W] = {(T, H, W)} is not divisible by the patch size {tuple(patch_size)}"
        )
    gt, gh, gw = T // pt, H // ph, W // pw
    x = x.reshape(B, gt, pt, gh, ph, gw, pw, C)
    x = jnp.transpose(x, (0, 1, 3, 5, 2, 4, 6, 7))  # B gt gh gw pt ph pw C
    return x.reshape(B, gt * gh * gw, pt * ph * pw * C)


def unpatchify(x: jax.Array, patch_size: tuple[int, int, int], grid: tuple[int, int, int]) -> jax.Array:
    """Inverse of ``patchify``: tokens ``[B, N, pt*ph*pw*C]`` and grid (gt, gh, gw) -> ``[B, T, H, W, C]``."""
    B, N, P = x.shape
    pt, ph, pw = patch_size
    gt, gh, gw = grid
    if gt * gh * gw != N or P % (pt * ph * pw):
        raise ValueError(f"tokens {x.shape} do not match grid {tuple(grid)} and patch {tuple(patch_size)}")
    C = P // (pt * ph * pw)
    x = x.reshape(B, gt, gh, gw, pt, ph, pw, C)
    x = jnp.transpose(x, (0, 1, 4, 2, 5, 3, 6, 7))  # B gt pt gh ph gw pw C
    return x.reshape(B, gt * pt, gh * ph, gw * pw, C)


# ----------------------------------------------------------------------------------------- conditioning


def timestep_embedding(t: jax.Array, dim: int, max_period: float = 10000.0) -> jax.Array:
    """DiT's sinusoidal embedding: t ``[...]`` float -> ``[..., dim]`` float32, ``[cos(t f), sin(t f)]``.

    ``f_i = max_period^(-i / (dim/2))``; an odd ``dim`` gets one zero column at the end.
    """
    half = dim // 2
    freqs = jnp.exp(-math.log(max_period) * jnp.arange(half, dtype=jnp.float32) / half)
    args = jnp.asarray(t, jnp.float32)[..., None] * freqs
    emb = jnp.concatenate([jnp.cos(args), jnp.sin(args)], axis=-1)
    if dim % 2:
        emb = jnp.concatenate([emb, jnp.zeros_like(emb[..., :1])], axis=-1)
    return emb


def sincos_2d(gh: int, gw: int, dim: int) -> jax.Array:
    """DiT's / MAE's fixed 2D position table: ``[gh * gw, dim]`` float32 in (h, w) row-major order; the first
    half of the channels encodes the column w, the second the row h (diffusers' ``get_2d_sincos_pos_embed``
    layout), each as ``[sin(p f), cos(p f)]`` with ``f_i = 10000^(-i / (dim / 4))``. ``dim``: a multiple of 4."""
    if dim % 4:
        raise ValueError(f"sincos_2d: dim {dim} is not a multiple of 4")
    freqs = 1.0 / 10000.0 ** (np.arange(dim // 4, dtype=np.float64) / (dim // 4))

    def axis(n: int) -> np.ndarray:
        a = np.arange(n, dtype=np.float64)[:, None] * freqs
        return np.concatenate([np.sin(a), np.cos(a)], -1)  # [n, dim / 2]

    hh, ww = np.meshgrid(np.arange(gh), np.arange(gw), indexing="ij")
    table = np.concatenate([axis(gw)[ww.ravel()], axis(gh)[hh.ravel()]], -1)
    return jnp.asarray(table, jnp.float32)


def _per_group(x: jax.Array, v: jax.Array) -> tuple[jax.Array, jax.Array]:
    """x ``[B, N, D]`` and a per-sample ``[B, D]`` or per-frame-group ``[B, G, D]`` value -> (x viewed as
    ``[B, N, D]`` or ``[B, G, N/G, D]``, v broadcastable to it). Tokens are in (t, h, w) order, so frame group
    g owns the contiguous tokens ``g*N/G .. (g+1)*N/G - 1``."""
    if v.ndim == 2:
        return x, v[:, None]
    B, N, D = x.shape
    G = v.shape[1]
    return x.reshape(B, G, N // G, D), v[:, :, None]


def modulate(x: jax.Array, shift: jax.Array, scale: jax.Array) -> jax.Array:
    """adaLN modulation ``x * (1 + scale) + shift``: x ``[B, N, D]``; shift/scale ``[B, D]`` (one timestep per
    sample) or ``[B, G, D]`` (one per temporal patch group: per-frame conditioning) -> ``[B, N, D]``."""
    xg, sc = _per_group(x, scale)
    _, sh = _per_group(x, shift)
    return (xg * (1 + sc) + sh).reshape(x.shape)


def gate(g: jax.Array, h: jax.Array) -> jax.Array:
    """adaLN-Zero gate ``g * h``: h ``[B, N, D]``, g ``[B, D]`` or ``[B, G, D]`` (as in ``modulate``)."""
    hg, gg = _per_group(h, g)
    return (gg * hg).reshape(h.shape)
