"""Sequence (context) parallel self-attention over the mesh's ``seq`` axis, written with ``jax.shard_map``.

Long videos give hundreds of thousands of tokens per clip; activations are then split over ``seq`` along the
token axis (``constrain(x, (..., "act_seq", ...))``). Everything in a DiT block is token-local except
self-attention, which needs every key for every query. Two explicit paths, chosen by ``model.seq_parallel``:

``"ulysses"`` (DeepSpeed-Ulysses, Jacobs et al. 2023): q, k, v ``[B, N/s, K, H]`` -> one all-to-all over
    ``seq`` trades the token split for a head split ``[B, N, K/s, H]`` -> full-sequence attention per head
    group (any kernel: XLA, cuDNN flash) -> all-to-all back. Communication: 4 all-to-alls of the activations
    per layer, independent of s; needs the local head count (K / tensor) divisible by s.
``"ring"`` (Liu et al. 2023, "Ring Attention"): queries stay put; key/value blocks travel around the ``seq``
    ring with ``lax.ppermute`` and each step folds one block into a running (max, sum, output) online softmax,
    so no device ever holds the full sequence's keys or more than one block of scores (each step is
    rematerialised in the backward pass). Works for any head count; s steps per layer.

Both are numerically the same attention as the unsharded one (tests compare them to 1e-5 in float32). With
no active mesh, or a mesh whose ``seq`` axis is 1, ``attention`` is the plain kernel.
"""

from __future__ import annotations

from functools import partial

import jax
import jax.numpy as jnp
from jax.sharding import Mesh, PartitionSpec

from sora_jax.choices import SeqParallel
from sora_jax.errors import UserError
from sora_jax.parallel import sharding

SEQ_PARALLEL = tuple(m.value for m in SeqParallel)
SEQ_AXIS = "seq"


class SequenceParallelError(UserError):
    """The attention shapes do not split over the mesh's ``seq`` axis."""


def check_mode(mode: str) -> str:
    if mode not in SEQ_PARALLEL:
        raise ValueError(f"seq_parallel={mode!r} unknown; use one of {SEQ_PARALLEL}")
    return mode


def _spec(shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """[B, N, K, H] -> batch over (data, fsdp) where it divides, tokens over seq, heads over tensor."""
    spec = sharding.fit_spec(PartitionSpec(sharding.BATCH_AXES, SEQ_AXIS, "tensor", None), shape, mesh)
    if spec[1] != SEQ_AXIS:
        raise SequenceParallelError(
            f"sequence parallelism: {shape[1]} tokens do not split over seq={mesh.shape[SEQ_AXIS]}"
        )
    return spec


def _ulysses_local(q, k, v, *, kernel):
    # [b, n/s, k, H] -> [b, n, k/s, H]: split heads across the seq group, gather the tokens
    to_heads = partial(jax.lax.all_to_all, axis_name=SEQ_AXIS, split_axis=2, concat_axis=1, tiled=True)
    out = kernel(to_heads(q), to_heads(k), to_heads(v))
    return jax.lax.all_to_all(out, SEQ_AXIS, split_axis=1, concat_axis=2, tiled=True)


def _ring_local(q, k, v, *, size: int):
    """Online-softmax attention of the local queries against every key/value block, passed around the ring."""
    scale = q.shape[-1] ** -0.5
    qf = q.astype(jnp.float32) * scale
    b, n, heads, _ = q.shape
    m = jnp.full((b, heads, n), -jnp.inf, jnp.float32)
    l = jnp.zeros((b, heads, n), jnp.float32)
    o = jnp.zeros(q.shape, jnp.float32)
    perm = [(i, (i + 1) % size) for i in range(size)]

    def fold(carry, _):
        m, l, o, k, v = carry
        s = jnp.einsum("BNKH,BMKH->BKNM", qf, k.astype(jnp.float32))
        m_new = jnp.maximum(m, s.max(-1))
        p = jnp.exp(s - m_new[..., None])
        corr = jnp.exp(m - m_new)
        l = l * corr + p.sum(-1)
        o = o * jnp.moveaxis(corr, 1, 2)[..., None] + jnp.einsum("BKNM,BMKH->BNKH", p, v.astype(jnp.float32))
        k, v = jax.lax.ppermute(k, SEQ_AXIS, perm), jax.lax.ppermute(v, SEQ_AXIS, perm)
        return (m_new, l, o, k, v), None

    # checkpointed: the backward pass recomputes each block's scores instead of keeping s of them
    (m, l, o, _, _), _ = jax.lax.scan(jax.checkpoint(fold), (m, l, o, k, v), None, length=size)
    return (o / jnp.moveaxis(l, 1, 2)[..., None]).astype(q.dtype)


def attention(
    q: jax.Array,
    k: jax.Array,
    v: jax.Array,
    *,
    mode: str,
    kernel,
    mesh: Mesh | None = None,
) -> jax.Array:
    """Self-attention q, k, v ``[B, N, K, H]`` -> ``[B, N, K, H]``, sequence-parallel over ``seq`` when asked.

    ``kernel(q, k, v)`` is the local attention (the ulysses path and the unsharded fallback call it).
    ``mesh`` defaults to the active ``sharding.activation_sharding`` mesh. No masks: DiT self-attention
    attends everywhere (padding of variable-length videos is handled by packing, later).
    """
    check_mode(mode)
    mesh = mesh if mesh is not None else sharding.active_mesh()
    if mode == "none" or mesh is None or mesh.shape.get(SEQ_AXIS, 1) == 1:
        return kernel(q, k, v)
    size = mesh.shape[SEQ_AXIS]
    spec = _spec(q.shape, mesh)
    if mode == "ulysses":
        local_heads = q.shape[2] // (mesh.shape["tensor"] if spec[2] == "tensor" else 1)
        if local_heads % size:
            raise SequenceParallelError(
                f"ulysses attention: {local_heads} heads per tensor shard do not split over seq={size}; "
                "use model.seq_parallel='ring' or a head count divisible by seq"
            )
        local = partial(_ulysses_local, kernel=kernel)
    else:
        local = partial(_ring_local, size=size)
    fn = jax.shard_map(local, mesh=mesh, in_specs=(spec, spec, spec), out_specs=spec, check_vma=False)
    return fn(q, k, v)
