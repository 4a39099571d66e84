"""LoRA adapters on the attention and MLP projections of a built model (Hu et al. 2021, "LoRA: Low-Rank
Adaptation of Large Language Models").

Owns: ``LoraSpec`` (rank, alpha, target regexes: the models' only LoRA input), ``add_adapters`` (puts
adapters beside the kernels whose parameter path matches) and ``lora_delta`` (what the projections add).

For a kernel ``W`` with input axes ``I`` and output axes ``O`` (``wq/wk/wv [D, K, H]``: I = D; ``wo [K, H, D]``:
I = K, H; an MLP's ``fc1/fc2 kernel [Din, Dout]``)::

    y = x W + (alpha / rank) * (x A) B        A [*I, r] (he-uniform), B [r, *O] (zeros: step 0 == the base)

Stacked blocks: a kernel stored ``[L, *I, *O]`` (the scanned blocks' leading ``"layers"`` axis) gets
``A [L, *I, r]`` and ``B [L, r, *O]``, so the blocks' ``lax.scan`` slices adapters with their kernels. The
adapters carry the kernel's logical names on their I / O / layer axes and ``None`` on the rank axis
(replicated: it is small), so the rules table shards them as it shards the kernel. They are
``nnx.LoRAParam`` variables named ``<kernel>_lora_a`` / ``<kernel>_lora_b`` on the kernel's module, so
``nnx.LoRAParam`` filters them (trainable) from every other ``nnx.Param`` (the frozen base).

Why not ``nnx.LoRA`` / ``nnx.LoRALinear`` or qwix's ``LoraProvider`` (both read, flax 0.12.8 and qwix 0.1.8):
- ``nnx.LoRA`` computes ``x @ A @ B`` on 2D matrices and wraps a module (``base_module``): our attention
  kernels are einsum tensors ``[D, K, H]`` held by the attention module, not ``nnx.Linear``s; wrapping would
  move the base parameters (``fc1/kernel`` -> ``fc1/base_module/kernel``), breaking ``model.init_from``,
  the checkpoints and the diffusers/PyTorch converters; it has no ``alpha``. We keep its variable type,
  ``nnx.LoRAParam``, which is what makes the trainable/frozen split one filter.
- qwix's ``LoraProvider`` intercepts ``dot_general``/``einsum`` calls by module path and creates adapters
  lazily on the first call: here the blocks run inside ``jax.lax.scan`` over ``nnx.split``/``nnx.merge``d
  stacked state, where lazily created parameters would be per-slice, not stacked ``[L, ...]``; it is also a
  dependency for what is a few lines. Quantizing the frozen base (QLoRA, ``config.lora.base_dtype``) lives in
  ``sora_jax.models.quant`` (why not qwix's PTQ there).

Every use site computes its projection with ``project`` (base kernel through ``kernel``: dequantized per layer
inside the blocks' scan when stored int8 / fp8, plus the adapter, DoRA's rescaling, the bias).

DoRA (Liu et al. 2024, "DoRA: Weight-Decomposed Low-Rank Adaptation"; ``LoraSpec.dora``): a magnitude
``m [*L, *O]`` (``nnx.LoRAParam`` ``<kernel>_lora_m``, initialised to ``||W||_I``, the norm of each output
channel over the input axes, so step 0 is the base) rescales the adapted projection::

    y = m / ||W + s A B||_I * (x W + s (x A) B) + b          == x (m (W + s A B) / ||W + s A B||_I) + b

The norm is computed per layer (one kernel-sized float32 temporary inside the scan) and not detached (the paper's
section 4.3 detaches it to save memory; we keep the exact gradient). A trainer whose base comes from a checkpoint
re-initialises m from it (``init_magnitudes``).
"""

from __future__ import annotations

import dataclasses
import math
import re

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax.config import LORA_TARGETS
from sora_jax.models import quant

# the kernels of a module class whose forward adds ``lora_delta``: ``LORA_KERNELS = {"wq": 1, "fc1/kernel": 1,
# ...}`` on the class, attribute path (below the module) -> number of input axes (layers.Attention, layers.Mlp,
# wan_transformer.WanAttention); only those can take an adapter
ATTENTION_KERNELS = {"wq": 1, "wk": 1, "wv": 1, "wo": 2}  # [D, K, H] x 3, [K, H, D]
MLP_KERNELS = {"fc1/kernel": 1, "fc2/kernel": 1}  # nnx.Linear kernels [Din, Dout]
_KERNEL_NDIM = {"wq": 3, "wk": 3, "wv": 3, "wo": 3, "kernel": 2}

DEFAULT_TARGETS = LORA_TARGETS  # the q/k/v/out and MLP kernels of the DiT's and Wan's blocks


@dataclasses.dataclass(frozen=True)
class LoraSpec:
    """Adapters of rank ``rank`` scaled by ``alpha / rank`` on every projection kernel whose "/"-joined
    parameter path (e.g. ``dit/blocks/attn/wq``, ``transformer/blocks/ffn/fc1/kernel``) one of ``targets``
    (regular expressions, ``re.search``) matches."""

    rank: int
    alpha: float
    targets: tuple[str, ...] = DEFAULT_TARGETS
    dora: bool = False  # a DoRA magnitude <kernel>_lora_m beside each adapter

    def __post_init__(self):
        object.__setattr__(self, "targets", tuple(self.targets))
        if isinstance(self.rank, bool) or not isinstance(self.rank, int) or self.rank < 1:
            raise ValueError(f"LoraSpec.rank must be a positive int, got {self.rank!r}")
        if not self.targets:
            raise ValueError("LoraSpec.targets is empty: give regexes over parameter paths")

    @property
    def scale(self) -> float:
        return float(self.alpha) / self.rank


def _candidates(model: nnx.Module) -> dict[str, tuple[nnx.Module, str, int]]:
    """path -> (owning module, attribute, input axes) of every kernel an adapter can go on: those a module
    class lists in its ``LORA_KERNELS``."""
    out = {}
    for path, node in nnx.iter_graph(model):
        for sub, n_in in getattr(type(node), "LORA_KERNELS", {}).items():
            *owners, name = sub.split("/")
            owner = node
            for o in owners:
                owner = getattr(owner, o)
            out["/".join([*map(str, path), sub])] = (owner, name, n_in)
    return out


def add_adapters(model: nnx.Module, spec: LoraSpec, *, seed: int = 0) -> list[str]:
    """Adds ``<kernel>_lora_a`` / ``_lora_b`` (``nnx.LoRAParam``) beside every targeted kernel of ``model``
    (in place) and returns their paths, sorted. ValueError when a target matches a parameter that is not a
    projection kernel, or when no kernel matches."""
    patterns = [re.compile(t) for t in spec.targets]
    hits = lambda p: any(r.search(p) for r in patterns)  # noqa: E731
    kernels = _candidates(model)
    for path, _ in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        joined = "/".join(str(p) for p in path)
        if hits(joined) and joined not in kernels:
            raise ValueError(
                f"LoRA target matches {joined}, which is not an attention or MLP projection kernel "
                f"(adaptable: {', '.join(sorted(kernels)) or 'none'})"
            )
    chosen = sorted(p for p in kernels if hits(p))
    if not chosen:
        raise ValueError(f"LoRA targets {list(spec.targets)} match no projection kernel of the model")
    key = jax.random.key(seed)
    for i, path in enumerate(chosen):
        module, name, n_in = kernels[path]
        kernel = getattr(module, name)
        shape, lead = kernel.value.shape, kernel.value.ndim - _KERNEL_NDIM[name]
        names = tuple(getattr(kernel, "out_sharding", None) or (None,) * len(shape))
        a_shape = (*shape[: lead + n_in], spec.rank)
        b_shape = (*shape[:lead], spec.rank, *shape[lead + n_in :])
        a_names = (*names[: lead + n_in], None)
        b_names = (*names[:lead], None, *names[lead + n_in :])
        init = nnx.initializers.variance_scaling(
            2.0, "fan_in", "uniform", in_axis=tuple(range(lead, lead + n_in)), out_axis=-1,
            batch_axis=tuple(range(lead)),
        )  # fmt: skip
        a = init(jax.random.fold_in(key, i), a_shape, kernel.value.dtype)
        setattr(module, f"{name}_lora_a", nnx.LoRAParam(a, out_sharding=a_names))
        b = jnp.zeros(b_shape, kernel.value.dtype)
        setattr(module, f"{name}_lora_b", nnx.LoRAParam(b, out_sharding=b_names))
        setattr(module, f"{name}_lora_scale", spec.scale)
        if spec.dora:  # m = ||W||_I: step 0 is the base
            m = column_norm(kernel.value, lead, n_in).astype(kernel.value.dtype)
            m_names = (*names[:lead], *names[lead + n_in :])
            setattr(module, f"{name}_lora_m", nnx.LoRAParam(m, out_sharding=m_names))
    return chosen


def column_norm(w: jax.Array, lead: int, n_in: int) -> jax.Array:
    """``||w||`` over the input axes, float32: w ``[*L, *I, *O]`` (``lead`` = |L|, ``n_in`` = |I|) -> ``[*L, *O]``."""
    axes = tuple(range(lead, lead + n_in))
    return jnp.sqrt(jnp.sum(jnp.square(w.astype(jnp.float32)), axis=axes))


def init_magnitudes(model: nnx.Module) -> list[str]:
    """Sets every DoRA magnitude ``<kernel>_lora_m`` of ``model`` (in place) to ``||W + s A B||_I`` of its
    current kernel (dequantized) and adapter: the model's output is then its DoRA-free LoRA output (at B = 0:
    the base). For a base that was not the one ``add_adapters`` saw (``lora.init_from``). Returns the paths."""
    done = []
    for path, (module, name, n_in) in _candidates(model).items():
        if getattr(module, f"{name}_lora_m", None) is None:
            continue
        w = merged_kernel(module, name, n_in)
        lead = w.ndim - _KERNEL_NDIM[name]
        m = getattr(module, f"{name}_lora_m")
        m.value = column_norm(w, lead, n_in).astype(m.value.dtype)
        done.append(path)
    return sorted(done)


def kernel(module: nnx.Module, name: str, dtype) -> jax.Array:
    """``module``'s kernel ``name`` in ``dtype``: dequantized (``quant.dequantize``) when the frozen base stores
    it int8 / fp8 (a ``<name>_qscale`` beside it holds a quantized value), else cast."""
    w = getattr(module, name)[...]
    s = getattr(module, name + quant.SCALE, None)
    if s is None or (jnp.issubdtype(w.dtype, jnp.floating) and w.dtype.itemsize > 1):
        return w.astype(dtype)
    return quant.dequantize(w, s[...], dtype)


def merged_kernel(module: nnx.Module, name: str, n_in: int, dtype=jnp.float32) -> jax.Array:
    """``W + s A B`` (``[*L, *I, *O]`` stacked or one layer's ``[*I, *O]``) in ``dtype``; W alone without an
    adapter."""
    w = kernel(module, name, dtype)
    a = getattr(module, f"{name}_lora_a", None)
    if a is None:
        return w
    b = getattr(module, f"{name}_lora_b")[...].astype(dtype)
    a = a[...].astype(dtype)
    lead = a.ndim - n_in - 1
    if lead:  # stacked: contract the rank per layer
        ab = jnp.einsum("lir,lro->lio", a.reshape(a.shape[0], -1, a.shape[-1]), b.reshape(*b.shape[:2], -1))
    else:
        ab = jnp.tensordot(a.reshape(-1, a.shape[-1]), b.reshape(b.shape[0], -1), axes=1)
    scale = jnp.asarray(getattr(module, f"{name}_lora_scale"), dtype)
    return w + scale * ab.reshape(w.shape)


def project(
    module: nnx.Module, name: str, x: jax.Array, n_in: int, dtype, bias: jax.Array | None = None
) -> jax.Array:
    """A projection with everything LoRA adds: x ``[..., *I]`` through ``module``'s kernel ``name``
    ``[*I, *O]`` (``kernel``: dequantized when stored quantized), plus ``lora_delta``, rescaled by DoRA's
    ``m / ||W + s A B||_I`` when it has a magnitude, plus ``bias [*O]`` -> ``[..., *O]`` in ``dtype``."""
    x = x.astype(dtype)
    y = jnp.tensordot(x, kernel(module, name, dtype), axes=n_in)
    delta = lora_delta(module, name, x, n_in, dtype)
    m = getattr(module, f"{name}_lora_m", None)
    if m is not None:
        norm = column_norm(merged_kernel(module, name, n_in), 0, n_in)  # [*O], float32
        y = (plus(y, delta) * (m[...].astype(jnp.float32) / norm)).astype(dtype)
    else:
        y = plus(y, delta)
    return y if bias is None else y + bias.astype(dtype)


def lora_delta(module: nnx.Module, name: str, x: jax.Array, n_in: int, dtype) -> jax.Array | None:
    """``scale * (x A) B`` for ``module``'s kernel ``name``, or None when it has no adapter: x ``[..., *I]``
    (its last ``n_in`` axes contract with A ``[*I, r]``), B ``[r, *O]`` -> ``[..., *O]``, in ``dtype``."""
    a = getattr(module, f"{name}_lora_a", None)
    if a is None:
        return None
    b = getattr(module, f"{name}_lora_b")
    h = jnp.tensordot(x.astype(dtype), a[...].astype(dtype), axes=n_in)  # [..., r]
    out = jnp.tensordot(h, b[...].astype(dtype), axes=1)  # [..., *O]
    return out * jnp.asarray(getattr(module, f"{name}_lora_scale"), dtype)


def adaptable(model: nnx.Module) -> dict[str, tuple[nnx.Module, str, int, int]]:
    """path -> (owning module, attribute, input axes |I|, leading stacked axes |L|) of every kernel of ``model``
    an adapter (or ``quant.add_scales``' scale) can go on: those its module classes list in ``LORA_KERNELS``."""
    out = {}
    for path, (module, name, n_in) in _candidates(model).items():
        out[path] = (module, name, n_in, getattr(module, name).value.ndim - _KERNEL_NDIM[name])
    return out


def plus(y: jax.Array, delta: jax.Array | None) -> jax.Array:
    """``y + delta`` (``y`` itself when there is no adapter)."""
    return y if delta is None else y + delta.astype(y.dtype)


# ------------------------------------------------------------------------- adapters from files: merge / attach
# ``Adapters`` (adapters apart from a model: read from a file by sora_jax/export/lora_files.py, or taken from a
# model by ``model_adapters``) go into a model merged (``merge_adapters``: W += w * scale * A B, or DoRA's
# m (W + w s A B) / ||W + w s A B||_I; the forward costs nothing more) or unmerged (``attach_adapters``:
# concatenated along the rank axis, exact, reversible).


@dataclasses.dataclass(frozen=True)
class KernelAdapter:
    """One kernel's adapter, stacked like the kernel: ``a [L, *I, r]``, ``b [L, r, *O]`` (no ``L`` for an
    unstacked kernel); the kernel gets ``scale * x a b``.

    ``m [L, *O]`` (optional): DoRA magnitudes (peft's ``lora_magnitude_vector``, per output channel): the kernel
    becomes ``m (W + scale a b) / ||W + scale a b||_I``. A NaN row is a layer without a magnitude (a file that
    gives DoRA for some layers only): plain LoRA there. Folding ``scale`` into ``b`` changes nothing (the
    normalisation sees the same ``W + scale a b``)."""

    a: np.ndarray | jax.Array
    b: np.ndarray | jax.Array
    scale: float = 1.0
    m: np.ndarray | jax.Array | None = None

    @property
    def rank(self) -> int:
        return int(self.a.shape[-1])


@dataclasses.dataclass(frozen=True)
class Adapters:
    """A set of adapters read from a file (``sora_jax.export.lora_files.read_adapters``) or a model: our kernel
    path (as in the model it was read for, e.g. ``transformer/blocks/attn1/wq``) -> ``KernelAdapter``;
    ``source`` names the file (or model) for messages."""

    kernels: dict[str, KernelAdapter]
    source: str = ""


def model_adapters(model: nnx.Module) -> Adapters:
    """The adapters ``model`` carries (its ``<kernel>_lora_a/_lora_b`` LoRAParams, scales and DoRA magnitudes
    ``_lora_m``), as ``Adapters``."""
    out = {}
    for path, (module, name, _) in sorted(_candidates(model).items()):
        a = getattr(module, f"{name}_lora_a", None)
        if a is not None:
            b = getattr(module, f"{name}_lora_b")
            m = getattr(module, f"{name}_lora_m", None)
            scale = float(getattr(module, f"{name}_lora_scale"))
            out[path] = KernelAdapter(a[...], b[...], scale, None if m is None else m[...])
    return Adapters(out, source=type(model).__name__)


def _checked(kernels: dict[str, tuple[nnx.Module, str, int]], adapters: Adapters) -> None:
    """ValueError naming the first adapter of ``adapters`` that is not on one of ``kernels`` or misfits it."""
    for path, ka in adapters.kernels.items():
        if path not in kernels:
            raise ValueError(
                f"adapter for {path} ({adapters.source}): the model has no such adaptable kernel"
            )
        module, name, n_in = kernels[path]
        shape = getattr(module, name).get_value().shape
        lead = len(shape) - _KERNEL_NDIM[name]
        want_a, want_b = (*shape[: lead + n_in], ka.rank), (*shape[:lead], ka.rank, *shape[lead + n_in :])
        if tuple(ka.a.shape) != want_a or tuple(ka.b.shape) != want_b:
            raise ValueError(
                f"adapter for {path} ({adapters.source}): A {tuple(ka.a.shape)}, B {tuple(ka.b.shape)}; the "
                f"kernel {tuple(shape)} wants A {want_a}, B {want_b}"
            )
        want_m = (*shape[:lead], *shape[lead + n_in :])
        if ka.m is not None and tuple(ka.m.shape) != want_m:
            raise ValueError(
                f"adapter for {path} ({adapters.source}): DoRA magnitude {tuple(ka.m.shape)}; the kernel "
                f"{tuple(shape)} wants {want_m}"
            )


def _rescaled(w: jax.Array, m: jax.Array) -> jax.Array:
    """DoRA: ``m w / ||w||_I`` for w ``[L, I, O]`` float32, m ``[L, O]`` (NaN entries: ``w`` unchanged)."""
    norm = jnp.sqrt(jnp.sum(jnp.square(w), axis=1))  # [L, O]
    m = m.astype(jnp.float32)
    return w * jnp.where(jnp.isnan(m), 1.0, m / norm)[:, None, :]


@jax.jit
def _merged(w: jax.Array, factors: list) -> jax.Array:
    """Each factor applied in turn to ``w`` in float32, cast back: w ``[L, I, O]``, factors ``[(A [L, I, r],
    B [L, r, O], s, m [L, O] or None)]``: ``w += s A @ B``, then for DoRA (m given) ``w = m w / ||w||_I``; one
    jitted expression per kernel, so the float32 product is not kept beside it."""
    acc = w.astype(jnp.float32)
    for a, b, s, m in factors:
        acc = acc + s * jnp.einsum("lir,lro->lio", a.astype(jnp.float32), b.astype(jnp.float32))
        if m is not None:
            acc = _rescaled(acc, m)
    return acc.astype(w.dtype)


_QUANTIZED = (jnp.dtype(jnp.int8), jnp.dtype(jnp.float8_e4m3fn))


def _touched(model: nnx.Module, adapters_and_weights) -> tuple[list, dict, list[str]]:
    """(the ``(Adapters, w)`` pairs as a list, the model's adaptable kernels, the kernel paths the adapters
    touch, sorted), every adapter checked against the model first."""
    pairs, kernels = list(adapters_and_weights), _candidates(model)
    for adapters, _ in pairs:
        _checked(kernels, adapters)
    return pairs, kernels, sorted({p for adapters, _ in pairs for p in adapters.kernels})


def merge_adapters(model: nnx.Module, adapters_and_weights) -> list[str]:
    """Merges adapters into the base kernels of ``model``, in place, and returns the kernel paths changed:
    ``W += w * scale * A @ B`` for each ``(Adapters, w)`` in ``adapters_and_weights`` (float32 accumulation,
    cast back to W's dtype once, kernel by kernel).

    DoRA (a ``KernelAdapter`` with magnitudes ``m``): ``W = m (W + w s A B) / ||W + w s A B||_I``, as peft merges
    a DoRA adapter whose scaling was multiplied by ``w`` (diffusers' ``set_adapters(weights)``): the weight scales
    the low-rank direction only; the magnitude is applied in full (``w = 0`` gives ``m W / ||W||_I``, not W).
    With several adapters each is applied in the order given (a DoRA one normalises what the earlier ones left).

    W ``[L, *I, *O]``, A ``[L, *I, r]``, B ``[L, r, *O]``, m ``[L, *O]`` (``L`` absent for unstacked kernels); the
    product contracts r per layer. The model's own adapters (a LoRA workdir), if any, stay as they are (live).
    A quantized kernel (``config.lora.base_dtype`` int8 / fp8) is merged in float32 and quantized again (new
    per-channel scales)."""
    pairs, kernels, touched = _touched(model, adapters_and_weights)
    for path in touched:
        module, name, _ = kernels[path]
        kernel = getattr(module, name)
        w0 = kernel.get_value()
        shape, lead = w0.shape, w0.ndim - _KERNEL_NDIM[name]
        n_lead, n_io = math.prod(shape[:lead]), math.prod(shape[lead:])
        factors = []
        for adapters, w in pairs:
            ka = adapters.kernels.get(path)
            if ka is not None:
                a = jnp.asarray(ka.a).reshape(n_lead, -1, ka.rank)  # [L, I, r]
                b = jnp.asarray(ka.b).reshape(n_lead, ka.rank, -1)  # [L, r, O]
                m = None if ka.m is None else jnp.asarray(ka.m).reshape(n_lead, -1)  # [L, O]
                factors.append((a, b, jnp.float32(float(w) * ka.scale), m))
        qs = getattr(module, name + quant.SCALE, None)  # an int8 / fp8 base: merge, then quantize again
        full = quant.dequantize(w0, qs.get_value(), jnp.float32) if w0.dtype in _QUANTIZED else w0
        merged = _merged(full.reshape(n_lead, a.shape[1], n_io // a.shape[1]), factors).reshape(shape)
        if w0.dtype in _QUANTIZED:
            q, scale = quant.quantize(merged, qs.get_value().shape, str(w0.dtype))
            kernel.set_value(q)
            qs.set_value(scale)
        else:
            kernel.set_value(merged)
    return touched


def attach_adapters(model: nnx.Module, adapters_and_weights) -> list[str]:
    """Attaches adapters to ``model`` unmerged, in place, and returns the kernel paths that changed.

    Per kernel, the adapters of every ``(Adapters, w)`` (and the kernel's own adapter, when the model has one:
    a LoRA workdir) are concatenated along the rank axis: A ``[L, *I, sum r]``, B ``[L, sum r, *O]`` with each
    one's ``w * scale`` folded into its B rows, and ``<kernel>_lora_scale = 1.0``; so the kernel adds exactly
    the sum of the deltas. The new LoRAParams keep the kernel's logical axis names (rank replicated) and its
    dtype. Their rank differs from a trained workdir's: for inference, not to resume training.

    DoRA: a kernel whose only adapter (no other one given, none of its own) has magnitudes gets them as its
    ``<kernel>_lora_m`` (NaN rows filled with ``||W + w s A B||_I``: plain LoRA there), exactly
    ``merge_adapters``' result. Mixing a DoRA adapter with any other on one kernel has no exact unmerged form
    (one normalisation over the sum is not the sequence of them): ValueError, naming the kernel; merge instead."""
    pairs, kernels, touched = _touched(model, adapters_and_weights)
    for path in touched:
        module, name, n_in = kernels[path]
        given = [(adapters, ka, w) for adapters, w in pairs if (ka := adapters.kernels.get(path)) is not None]
        own = getattr(module, f"{name}_lora_a", None)
        own_m = getattr(module, f"{name}_lora_m", None)
        dora = [a.source for a, ka, _ in given if ka.m is not None] + (
            ["the model's own"] if own_m is not None else []
        )
        if dora and len(given) + (own is not None) > 1:
            raise ValueError(
                f"attach_adapters: {path} has a DoRA adapter ({dora[0]}) and others; DoRA cannot be mixed "
                f"exactly unmerged: merge them (merge_adapters) or attach the DoRA adapter alone"
            )
    for path in touched:
        module, name, n_in = kernels[path]
        kernel = getattr(module, name)
        dtype, shape = kernel.get_value().dtype, kernel.get_value().shape
        if dtype in _QUANTIZED:  # an int8 / fp8 base: the adapters keep a float dtype (their own, or float32)
            own_a = getattr(module, f"{name}_lora_a", None)
            dtype = own_a.get_value().dtype if own_a is not None else jnp.dtype(jnp.float32)
        lead = len(shape) - _KERNEL_NDIM[name]
        parts = []
        own = getattr(module, f"{name}_lora_a", None)
        if own is not None:
            own_b = getattr(module, f"{name}_lora_b")[...]
            parts.append((own[...], own_b, float(getattr(module, f"{name}_lora_scale")), None))
        for adapters, w in pairs:
            ka = adapters.kernels.get(path)
            if ka is not None:
                parts.append((ka.a, ka.b, float(w) * ka.scale, ka.m))
        a = jnp.concatenate([jnp.asarray(p[0], dtype) for p in parts], axis=-1)
        b = jnp.concatenate(
            [(jnp.asarray(p[1], jnp.float32) * p[2]).astype(dtype) for p in parts], axis=lead
        )  # fmt: skip
        names = tuple(getattr(kernel, "out_sharding", None) or (None,) * len(shape))
        a_names = (*names[: lead + n_in], None)
        b_names = (*names[:lead], None, *names[lead + n_in :])
        setattr(module, f"{name}_lora_a", nnx.LoRAParam(a, out_sharding=a_names))
        setattr(module, f"{name}_lora_b", nnx.LoRAParam(b, out_sharding=b_names))
        setattr(module, f"{name}_lora_scale", 1.0)
        m = parts[-1][3]
        if m is not None:  # the kernel's one adapter is DoRA (checked above)
            norm = column_norm(merged_kernel(module, name, n_in), lead, n_in)  # [*L, *O]
            m = jnp.asarray(m, jnp.float32)
            m = jnp.where(jnp.isnan(m), norm, m).astype(dtype)
            m_names = (*names[:lead], *names[lead + n_in :])
            setattr(module, f"{name}_lora_m", nnx.LoRAParam(m, out_sharding=m_names))
    return touched
