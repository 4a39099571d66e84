"""Logical axis names -> mesh axes: the one rules table, activation constraints, and parameter shardings.

Models name axes logically (``("embed", "mlp")`` on a kernel, ``("act_batch", "act_seq", "act_embed")`` on
an activation). This module maps those names onto the mesh axes ``data``, ``fsdp``, ``tensor``, ``seq``.
Outside an ``activation_sharding(mesh)`` context, ``constrain`` is a no-op, so models run unchanged on one
device, under ``jax.eval_shape`` and in tests.
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator, Sequence

import jax
import jax.numpy as jnp
from flax import nnx
from jax.sharding import Mesh, NamedSharding, PartitionSpec

MESH_AXES = ("data", "fsdp", "tensor", "seq")
BATCH_AXES = ("data", "fsdp")

# Logical name -> mesh axis (or tuple of axes, or None = replicated). One table for the whole codebase.
RULES: tuple[tuple[str, str | tuple[str, ...] | None], ...] = (
    # activations
    ("act_batch", BATCH_AXES),
    ("act_seq", "seq"),
    ("act_text", None),
    ("act_embed", None),
    ("act_heads", "tensor"),
    ("act_kv", None),
    ("act_mlp", "tensor"),
    # parameters
    ("embed", "fsdp"),
    ("mlp", "tensor"),
    ("heads", "tensor"),
    ("kv", None),
    ("vocab", None),
    ("patch", None),
    ("layers", None),
    ("norm", None),
    ("conv_in", None),  # 3D conv kernels [kt, kh, kw, in, out]: FSDP over the output channels
    ("conv_out", "fsdp"),
    ("cond", "tensor"),  # adaLN and conditioning projections: their output (6D) splits like an MLP
)

_ACTIVE_MESH: contextvars.ContextVar[Mesh | None] = contextvars.ContextVar("sora_jax_mesh", default=None)


def logical_to_spec(names: Sequence[str | None] | None, rules=RULES) -> PartitionSpec:
    """Maps logical axis names to a PartitionSpec; a mesh axis is used at most once per spec."""
    if names is None:
        return PartitionSpec()
    table = dict(rules)
    used: set[str] = set()
    out = []
    for name in names:
        axes = table.get(name) if name is not None else None
        if name is not None and name not in table:
            raise KeyError(f"logical axis {name!r} has no rule in sora_jax.parallel.sharding.RULES")
        if axes is None:
            out.append(None)
            continue
        axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
        axes_t = tuple(a for a in axes_t if a not in used)
        used.update(axes_t)
        out.append(axes_t[0] if len(axes_t) == 1 else (axes_t or None))
    return PartitionSpec(*out)


@contextlib.contextmanager
def activation_sharding(mesh: Mesh | None) -> Iterator[None]:
    """Within this context (at trace time), ``constrain`` pins activations onto ``mesh``."""
    token = _ACTIVE_MESH.set(mesh)
    try:
        yield
    finally:
        _ACTIVE_MESH.reset(token)


def constrain(x: jax.Array, names: Sequence[str | None]) -> jax.Array:
    """Sharding constraint by logical names; a no-op without an active mesh or on a single device."""
    mesh = _ACTIVE_MESH.get()
    if mesh is None or mesh.size == 1:
        return x
    return jax.lax.with_sharding_constraint(
        x, NamedSharding(mesh, fit_spec(logical_to_spec(names), x.shape, mesh))
    )


def active_mesh() -> Mesh | None:
    """The mesh of the enclosing ``activation_sharding`` context (None outside one)."""
    return _ACTIVE_MESH.get()


def fit_spec(spec: PartitionSpec, shape: tuple[int, ...], mesh: Mesh) -> PartitionSpec:
    """Drops mesh axes that do not divide the dimension they would shard (small models, odd sizes)."""
    out = []
    for dim, axes in zip(shape, tuple(spec) + (None,) * (len(shape) - len(spec))):
        if axes is None:
            out.append(None)
            continue
        axes_t = (axes,) if isinstance(axes, str) else tuple(axes)
        kept, size = [], 1
        for a in axes_t:
            if dim % (size * mesh.shape[a]) == 0:
                kept.append(a)
                size *= mesh.shape[a]
        out.append(None if not kept else kept[0] if len(kept) == 1 else tuple(kept))
    return PartitionSpec(*out)


def state_shardings(state: nnx.State, mesh: Mesh) -> nnx.State:
    """NamedShardings for every leaf of an (abstract) pytree of NNX variables and arrays, from each variable's
    ``out_sharding`` logical names (arrays without names are replicated). Same tree structure as ``state``."""

    def one(var):
        if isinstance(var, nnx.Variable):
            if not hasattr(var.value, "shape"):  # no array: e.g. optax's MaskedNode (Muon's AdamW half)
                return var
            spec = fit_spec(logical_to_spec(getattr(var, "out_sharding", None)), var.value.shape, mesh)
            return var.replace(NamedSharding(mesh, spec))
        return NamedSharding(mesh, PartitionSpec())

    return jax.tree.map(one, state, is_leaf=lambda x: isinstance(x, nnx.Variable))


def batch_sharding(mesh: Mesh, ndim: int) -> NamedSharding:
    """Leading axis over the batch axes (data, fsdp); the rest replicated."""
    return NamedSharding(mesh, PartitionSpec(BATCH_AXES, *([None] * (ndim - 1))))


def replicated(mesh: Mesh) -> NamedSharding:
    return NamedSharding(mesh, PartitionSpec())


# ------------------------------------------------------------------------------------- memory per device


def _leaf_bytes(x) -> tuple[int, int]:
    """(total bytes, bytes on the most loaded device) of an array or ShapeDtypeStruct with a sharding."""
    total = math.prod(x.shape) * jnp.dtype(x.dtype).itemsize
    shard = getattr(x, "sharding", None)
    if shard is None:
        return total, total
    local = math.prod(shard.shard_shape(x.shape)) * jnp.dtype(x.dtype).itemsize
    return total, local


def bytes_per_device(tree) -> tuple[int, int]:
    """(total bytes, bytes per device) of a pytree of sharded arrays / ShapeDtypeStructs (replicas counted
    once in the total, fully on every device that holds them)."""
    total = local = 0
    for leaf in jax.tree.leaves(tree):
        if hasattr(leaf, "shape") and hasattr(leaf, "dtype"):
            t, d = _leaf_bytes(leaf)
            total, local = total + t, local + d
    return total, local


class ShardingError(ValueError):
    """Parameters are not sharded as the mesh promises."""


def check_sufficiently_sharded(
    tree, mesh: Mesh, *, axes: Sequence[str] = ("fsdp", "tensor"), tolerance: float = 0.02
) -> float:
    """Raises ``ShardingError`` unless bytes per device <= total / prod(mesh[axes]) * (1 + tolerance).

    The FSDP promise (MaxText's ``assert_params_sufficiently_sharded``): with fsdp=8 each device holds about
    an eighth of the parameters. Small leaves that do not divide (biases, norms) cost the tolerance; a big
    kernel left replicated by a missing rule fails, and the message names the largest replicated leaves.
    Returns the measured fraction per device.
    """
    shards = math.prod(mesh.shape[a] for a in axes)
    total, local = bytes_per_device(tree)
    frac = local / max(total, 1)
    if frac > (1.0 + tolerance) / shards:
        flat = jax.tree_util.tree_flatten_with_path(tree)[0]
        worst = sorted(
            ((_leaf_bytes(x)[1], jax.tree_util.keystr(p)) for p, x in flat if hasattr(x, "shape")),
            reverse=True,
        )[:3]
        raise ShardingError(
            f"parameters are not sharded over {dict((a, mesh.shape[a]) for a in axes)}: {frac:.3f} of "
            f"{total / 2**20:.1f} MiB per device (want <= {(1 + tolerance) / shards:.3f}); largest per device: "
            + ", ".join(f"{name} {b / 2**20:.1f} MiB" for b, name in worst)
        )
    return frac
