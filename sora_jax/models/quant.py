"""The frozen base of a LoRA run stored small (QLoRA-style, Dettmers et al. 2023; weight-only): ``config.lora.
base_dtype`` = ``bfloat16``, ``int8`` or ``float8_e4m3fn``, computed in the model's dtype (bfloat16).

Owns: ``add_scales`` (puts a ``<kernel>_qscale`` parameter beside the block projection kernels of a built
model, ``lora.adaptable``), ``store_base`` / ``stored_abstract`` (a full-precision base state -> the stored one, or its shapes),
``quantize`` / ``dequantize`` (one kernel) and ``is_scale`` (the filter of the scales).

int8 / fp8: each kernel ``W [*L, *I, *O]`` that has a ``<kernel>_qscale`` (every attention q/k/v/out and MLP
kernel of the blocks, adapted or not: ``lora.MLP_KERNELS`` / ``ATTENTION_KERNELS`` on the module classes) is
stored as ``q = round(W / s)`` (int8, clipped to +-127) or ``W / s`` cast to float8_e4m3fn, with one float32 scale
per output channel (and layer), symmetric absmax over the input axes::

    s [*L, 1 x |I|, *O] = max_I |W| / qmax          (qmax 127 for int8, 448 for e4m3fn; s = 1 where W = 0)
    W ~ q * s                                         (dequantize: float32 product cast to the compute dtype)

The scale keeps the kernel's rank (ones on the input axes, as qwix's ``QArray.scale``), so dequantizing is one
broadcast product and the blocks' ``lax.scan`` slices ``q`` and ``s`` together: the step dequantizes one layer's
kernels at a time (``lora.kernel`` at every use site) and never holds the whole base in bfloat16. Every other
floating parameter of the base (biases, norms, embedders, the DiT's adaLN kernels, Wan's float32 tables) is stored
in bfloat16 too. ``bfloat16``: every floating parameter in bfloat16, no scales.

Why not qwix (0.1.8, read: ``PtqProvider``, ``quantize_params``, ``QArray``): its PTQ mode intercepts the
model's ``dot_general`` / ``einsum`` calls by module path and swaps an ``nnx.Param``'s value for a ``QArray``
pytree (qvalue + scale) on the first call. Here the blocks run as ``lax.scan`` over ``nnx.split`` stacked state,
the frozen base is a step argument restored by orbax onto shardings derived from each ``nnx.Param``'s logical
names, and the forward already has one helper per use site (``lora.kernel``); a ``QArray`` leaf would need
its own sharding rules and checkpoint handling. We keep its layout (a scale of the kernel's rank) and do
weight-only absmax in ~60 lines.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from flax import nnx

from sora_jax.config import LORA_BASE_DTYPES

SCALE = "_qscale"  # <kernel>_qscale beside a quantized kernel
QUANTIZED = {"int8": (jnp.int8, 127.0), "float8_e4m3fn": (jnp.float8_e4m3fn, 448.0)}  # storage, qmax
assert set(QUANTIZED) | {"", "bfloat16"} == set(LORA_BASE_DTYPES)


def is_scale(path, _value=None) -> bool:
    """nnx filter: the ``<kernel>_qscale`` parameters."""
    return str(path[-1]).endswith(SCALE)


def add_scales(kernels: dict) -> list[str]:
    """Adds ``<kernel>_qscale`` (``nnx.Param`` float32 ``[*L, 1 x |I|, *O]``, ones: ``store_base`` computes it)
    beside every kernel of ``kernels`` (``lora.adaptable(model)``: path -> (module, name, |I|, |L|)), in place;
    returns their paths, sorted."""
    for module, name, n_in, lead in kernels.values():
        kernel = getattr(module, name)
        shape = kernel.value.shape
        names = tuple(getattr(kernel, "out_sharding", None) or (None,) * len(shape))
        keep = range(lead, lead + n_in)
        s_shape = tuple(1 if i in keep else d for i, d in enumerate(shape))
        s_names = tuple(None if i in keep else n for i, n in enumerate(names))
        setattr(module, name + SCALE, nnx.Param(jnp.ones(s_shape, jnp.float32), out_sharding=s_names))
    return sorted(kernels)


def quantize(w: jax.Array, scale_shape: tuple[int, ...], dtype: str) -> tuple[jax.Array, jax.Array]:
    """(q, s): ``w [*L, *I, *O]`` stored as ``dtype`` (int8 / float8_e4m3fn) with an absmax float32 scale of
    ``scale_shape`` (w's shape with ones on the axes reduced over)."""
    store, qmax = QUANTIZED[dtype]
    axes = tuple(i for i, d in enumerate(scale_shape) if d == 1)
    wf = w.astype(jnp.float32)
    amax = jnp.max(jnp.abs(wf), axis=axes, keepdims=True)
    s = jnp.where(amax > 0, amax / qmax, 1.0)
    x = wf / s
    q = jnp.clip(jnp.round(x), -qmax, qmax) if store == jnp.int8 else jnp.clip(x, -qmax, qmax)
    return q.astype(store), s


def dequantize(q: jax.Array, s: jax.Array, dtype) -> jax.Array:
    """``q * s`` (float32 product) in ``dtype``: q ``[..., *I, *O]``, s ``[..., 1 x |I|, *O]``."""
    return (q.astype(jnp.float32) * s.astype(jnp.float32)).astype(dtype)


def store_base(base: nnx.State, base_dtype: str) -> nnx.State:
    """The frozen base as ``config.lora.base_dtype`` stores it: ``base`` (full precision; its scales, if any,
    are placeholders) with the kernels that have a scale quantized and their scales computed (int8 / fp8) and
    every other floating leaf in bfloat16. ``""``: ``base`` unchanged."""
    if not base_dtype:
        return base
    flat = dict(nnx.to_flat_state(base))
    out = {}
    for path, var in flat.items():
        if is_scale(path):
            continue
        value = var.value
        scale = flat.get((*path[:-1], str(path[-1]) + SCALE))
        if scale is not None and base_dtype in QUANTIZED:
            q, s = quantize(value, scale.value.shape, base_dtype)
            out[path] = var.replace(q)
            out[(*path[:-1], str(path[-1]) + SCALE)] = scale.replace(s)
        elif jnp.issubdtype(value.dtype, jnp.floating):
            out[path] = var.replace(value.astype(jnp.bfloat16))
        else:
            out[path] = var
    for path, var in flat.items():  # scales of a bfloat16 base: unused ones, kept so the graph merges
        out.setdefault(path, var)
    return nnx.from_flat_state(out)


def stored_abstract(abstract: nnx.State, base_dtype: str) -> nnx.State:
    """``store_base``'s shapes and dtypes for an abstract base (``ShapeDtypeStruct``s), shardings kept."""
    if not base_dtype:
        return abstract
    shapes = jax.eval_shape(lambda b: store_base(b, base_dtype), abstract)
    return jax.tree.map(
        lambda s, a: jax.ShapeDtypeStruct(s.shape, s.dtype, sharding=getattr(a, "sharding", None)),
        shapes,
        abstract,
    )


def nbytes(tree) -> int:
    """Bytes of a tree's arrays (or ``ShapeDtypeStruct``s), all of them."""
    return sum(x.size * jnp.dtype(x.dtype).itemsize for x in jax.tree.leaves(tree))
