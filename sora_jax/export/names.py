"""JAX <-> PyTorch parameter names and layouts, in one place (pure numpy: used by the writer and the importer).

A JAX parameter is a path tuple of an NNX state (``("blocks", "attn", "wq")``) and an array; its twin in
``sora_torch`` is a dotted name (``blocks.3.attn.to_q.weight``). Rules, by the path's last element:

    kernel [in, out]            -> weight [out, in]                  (nnx.Linear -> torch Linear)
    kernel [kt, kh, kw, Ci, Co] -> weight [Co, Ci, kt, kh, kw]       (CausalConv3d)
    wq / wk / wv [D, K, H]      -> to_q / to_k / to_v.weight [K*H, D]
    bq / bk / bv [K, H]         -> to_q / to_k / to_v.bias [K*H]
    wo [K, H, D], bo [D]        -> to_out.weight [D, K*H], to_out.bias
    scale, embedding            -> weight;  bias -> bias

Blocks stored stacked in JAX (``blocks`` / ``layers`` followed by a name, leading axis = depth) become one
torch module per layer (``blocks.0``, ``blocks.1``, ...). Every rule is a transpose or a reshape, so both
directions are exact (bitwise for the same dtype).
"""

from __future__ import annotations

from collections.abc import Mapping

import numpy as np

from sora_jax.errors import UserError

Path = tuple  # an NNX state path: strings and ints

STACKED = ("blocks", "layers")
_ATTN = {"q": "to_q", "k": "to_k", "v": "to_v", "o": "to_out"}


class TensorMismatchError(UserError):
    """An exported folder's tensors do not fit the model: one named tensor missing, extra or mis-shaped."""


def _leaf_rule(name: str, ndim: int) -> tuple[str, str]:
    """(torch leaf name, layout kind) of a JAX leaf ``name`` whose per-layer array has ``ndim`` axes."""
    if name == "kernel":
        return "weight", ("conv" if ndim == 5 else "linear")
    if name in ("scale", "embedding"):
        return "weight", "same"
    if name == "bias":
        return "bias", "same"
    if len(name) == 2 and name[0] in "wb" and name[1] in _ATTN:
        proj = _ATTN[name[1]]
        if name[0] == "b":
            return f"{proj}.bias", "flat"
        return f"{proj}.weight", ("out" if name[1] == "o" else "qkv")
    raise ValueError(f"no torch name rule for a parameter called {name!r}")


def _to_torch_layout(a: np.ndarray, kind: str) -> np.ndarray:
    if kind == "linear":
        return a.T
    if kind == "conv":
        return a.transpose(4, 3, 0, 1, 2)
    if kind == "qkv":
        return a.reshape(a.shape[0], -1).T
    if kind == "out":
        return a.reshape(-1, a.shape[-1]).T
    if kind == "flat":
        return a.reshape(-1)
    return a


def _from_torch_layout(t: np.ndarray, kind: str, shape: tuple[int, ...]) -> np.ndarray:
    if kind == "linear":
        out = t.T
    elif kind == "conv":
        out = t.transpose(2, 3, 4, 1, 0)
    elif kind in ("qkv", "out"):
        out = t.T.reshape(shape)
    else:
        out = t.reshape(shape)
    return np.ascontiguousarray(out)


def _stacked_at(path: Path) -> int | None:
    """Index of the stacked-blocks element of ``path`` (followed by a name, not a list index), or None."""
    for i, part in enumerate(path[:-1]):
        if part in STACKED and isinstance(path[i + 1], str):
            return i
    return None


def torch_names(path: Path, shape: tuple[int, ...]) -> tuple[list[str], str, tuple[int, ...]]:
    """(torch names: one, or one per stacked layer; layout kind; the per-layer JAX shape) of a JAX leaf."""
    at = _stacked_at(path)
    per_layer = tuple(shape[1:]) if at is not None else tuple(shape)
    leaf, kind = _leaf_rule(str(path[-1]), len(per_layer))
    parts = [str(p) for p in path[:-1]]
    if at is None:
        return [".".join([*parts, leaf])], kind, per_layer
    names = [".".join([*parts[: at + 1], str(i), *parts[at + 1 :], leaf]) for i in range(shape[0])]
    return names, kind, per_layer


def to_torch(flat: Mapping[Path, np.ndarray]) -> dict[str, np.ndarray]:
    """JAX parameters {path: array} -> the twin's state dict {name: array} (contiguous numpy)."""
    out: dict[str, np.ndarray] = {}
    for path, array in flat.items():
        array = np.asarray(array)
        names, kind, _ = torch_names(path, array.shape)
        slices = [array] if len(names) == 1 and _stacked_at(path) is None else list(array)
        for name, a in zip(names, slices):
            out[name] = np.ascontiguousarray(_to_torch_layout(a, kind))
    return out


def from_torch(
    tensors: Mapping[str, np.ndarray], shapes: Mapping[Path, tuple[int, ...]], *, where: str = "the folder"
) -> dict[Path, np.ndarray]:
    """The twin's state dict -> JAX parameters {path: array} of the given JAX ``shapes``.

    Raises ``TensorMismatchError`` naming the first missing, mis-shaped or unexpected tensor (``where``
    names the file or folder in the message)."""
    out: dict[Path, np.ndarray] = {}
    used: set[str] = set()
    for path, shape in shapes.items():
        names, kind, per_layer = torch_names(path, tuple(shape))
        want = _to_torch_layout(np.empty(per_layer, np.uint8), kind).shape
        slices = []
        for name in names:
            if name not in tensors:
                raise TensorMismatchError(f"{where}: tensor {name!r} is missing (want shape {list(want)})")
            t = np.asarray(tensors[name])
            if tuple(t.shape) != tuple(want):
                raise TensorMismatchError(
                    f"{where}: tensor {name!r} has shape {list(t.shape)}, the model wants {list(want)}"
                )
            slices.append(_from_torch_layout(t, kind, per_layer))
            used.add(name)
        out[path] = np.stack(slices) if _stacked_at(path) is not None else slices[0]
    extra = sorted(set(tensors) - used)
    if extra:
        raise TensorMismatchError(f"{where}: unexpected tensor {extra[0]!r} ({len(extra)} not in the model)")
    return out
