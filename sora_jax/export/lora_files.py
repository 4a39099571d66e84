"""LoRA adapter files: our adapters (``sora_jax/models/lora.py``) to and from the layouts other tools read.

Owns: the name and layout tables between our adapter paths and the files' module names, ``adapter_tensors`` /
``write_adapters`` (a model's LoRAParams -> safetensors + ``adapter_config.json``) and ``read_adapters`` (a file
-> ``lora.Adapters`` for a given model, layout detected from the keys, one-line ``LoraFileError``s).
Pure numpy + safetensors: no torch, no peft. Merging and attaching what was read is ``lora.merge_adapters`` /
``lora.attach_adapters``.

Layouts (A ``[L, *I, r]`` and B ``[L, r, *O]`` here; per layer ``i`` in a file, ``in = prod(I)``, ``out = prod(O)``):

    diffusers / peft   transformer.<module>.lora_A.weight [r, in], transformer.<module>.lora_B.weight [out, r]
                       <module>: Wan ``blocks.{i}.attn1.to_q`` (attn1/attn2 to_q/to_k/to_v/to_out.0,
                       ffn.net.0.proj, ffn.net.2, as diffusers' WanTransformer3DModel); the native DiT its PyTorch
                       twin's (``sora_torch``) modules, ``blocks.{i}.attn.to_q``, ``blocks.{i}.mlp.fc1``, ...
    ComfyUI / Wan      diffusion_model.blocks.{i}.self_attn.q.lora_down.weight [r, in], ``.lora_up.weight``
    (Wan only)         [out, r], ``.alpha`` (scalar): self_attn/cross_attn q, k, v, o; ffn.0, ffn.2 (the original
                       Wan 2.1 module names; what diffusers' ``_convert_non_diffusers_wan_lora_to_diffusers`` reads)
    kohya / musubi     lora_unet_blocks_0_self_attn_q.lora_down.weight, ... (the ComfyUI names flattened): read only

DoRA (a ``<kernel>_lora_m [L, *O]`` magnitude, ``lora.KernelAdapter.m``): the kernel is ``m (W + s A B) /
||W + s A B||_I``, the norm per output channel (peft's convention). Folding ``s`` into B keeps this exact.

    diffusers / peft   transformer.<module>.lora_magnitude_vector [out]: peft's own key (``get_peft_model_state_dict``);
                       diffusers' ``get_peft_kwargs`` sets ``use_dora`` when a key holds ``lora_magnitude_vector``
    ComfyUI            diffusion_model.<module>.dora_scale [out, 1]. ComfyUI's ``weight_decompose``
                       (comfy/weight_adapter/base.py, v0.3.77) takes a dora_scale whose first axis is ``out`` as
                       per output channel but divides by the BASE norm ``||W||_I + eps`` (float32 eps), not by
                       ``||W + s A B||_I``; so the writer stores ``m (||W||_I + eps) / ||W + s A B||_I`` (from the
                       model's base kernel), which ComfyUI turns into exactly our kernel, and the reader inverts it
                       (needs a model with values). A ``[1, in]`` dora_scale (LyCORIS' per-input-column DoRA) is
                       refused. diffusers 0.42's Wan converter (``_convert_non_diffusers_wan_lora_to_diffusers``)
                       does not map dora_scale: it raises on such a file (load the diffusers file there instead).

Scale. The ComfyUI file carries ``alpha = scale * r`` per module. The diffusers file carries no alpha: diffusers
0.42 builds peft's LoraConfig from ``lora_adapter_metadata`` in the safetensors header when there is one, else
with ``lora_alpha = r`` (scale 1) inferred from the tensors; other tools (ComfyUI reading diffusers keys) read
no metadata at all. So the writer folds our ``alpha / rank`` into ``lora_B`` and writes no alpha: every reader
gets the exact product. ``read_adapters`` honours ``.alpha`` tensors and a ``lora_adapter_metadata`` header
(``lora_alpha`` / ``r``, ``use_rslora``) in files written elsewhere. Files are written in float32.
"""

from __future__ import annotations

import dataclasses
import enum
import json
import math
import os
from collections.abc import Mapping
from pathlib import Path

import jax
import numpy as np
from flax import nnx

from sora_jax.errors import UserError
from sora_jax.export import names as torch_names
from sora_jax.models import lora
from sora_jax.models.dit import DiT
from sora_jax.models.wan_transformer import WanTransformer


class Layout(enum.Enum):
    DIFFUSERS = "diffusers"  # peft's lora_A / lora_B under diffusers' module names
    COMFYUI = "comfyui"  # the original Wan names, lora_down / lora_up / alpha (Wan only)
    KOHYA = "kohya"  # musubi-tuner / kohya: lora_unet_ + flattened ComfyUI names (read only)


FILES = {Layout.DIFFUSERS: "pytorch_lora_weights.safetensors", Layout.COMFYUI: "wan_lora_comfyui.safetensors"}
CONFIG_FILE = "adapter_config.json"
PREFIXES = {Layout.DIFFUSERS: "transformer.", Layout.COMFYUI: "diffusion_model.", Layout.KOHYA: "lora_unet_"}

# Wan: our path below ``blocks/`` -> (diffusers module, original Wan / ComfyUI module), per block
WAN_MODULES = {
    **{f"attn1/w{n}": (f"attn1.to_{n}", f"self_attn.{n}") for n in "qkv"},
    "attn1/wo": ("attn1.to_out.0", "self_attn.o"),
    **{f"attn2/w{n}": (f"attn2.to_{n}", f"cross_attn.{n}") for n in "qkv"},
    "attn2/wo": ("attn2.to_out.0", "cross_attn.o"),
    "ffn/fc1/kernel": ("ffn.net.0.proj", "ffn.0"),
    "ffn/fc2/kernel": ("ffn.net.2", "ffn.2"),
}
_DOWN = (".lora_A.weight", ".lora_down.weight")
_UP = (".lora_B.weight", ".lora_up.weight")
_ALPHA = ".alpha"
_MAGNITUDE = {
    Layout.DIFFUSERS: ".lora_magnitude_vector",
    Layout.COMFYUI: ".dora_scale",
    Layout.KOHYA: ".dora_scale",
}
_EPS = float(np.finfo(np.float32).eps)  # ComfyUI's weight_decompose adds it to ||W|| (float32 weights)


class LoraFileError(UserError):
    """A LoRA file that does not fit the model: one line naming the file and the first bad key or shape."""


@dataclasses.dataclass(frozen=True)
class _Target:
    """One adaptable kernel: our path, shapes, and its module name per layer in each layout."""

    path: str
    shape: tuple[int, ...]  # the kernel, [L, *I, *O]
    n_in: int
    modules: dict[Layout, list[str]]  # layout -> module name of layer i (no prefix)

    @property
    def layers(self) -> int:
        return self.shape[0]

    @property
    def io(self) -> tuple[tuple[int, ...], tuple[int, ...]]:
        return self.shape[1 : 1 + self.n_in], self.shape[1 + self.n_in :]


def _root(model: nnx.Module) -> tuple[str, str]:
    """(``"wan"`` or ``"dit"``, the path prefix of that transformer in ``model``, "" or ending in "/")."""
    found = []
    for path, node in nnx.iter_graph(model):
        if isinstance(node, (WanTransformer, DiT)):
            found.append(
                ("wan" if isinstance(node, WanTransformer) else "dit", "".join(f"{p}/" for p in path))
            )
    if len(found) != 1:
        raise ValueError(
            f"{type(model).__name__} holds {len(found)} DiT/WanTransformer models; LoRA files need one"
        )
    return found[0]


def targets(model: nnx.Module) -> tuple[str, dict[str, _Target]]:
    """(model kind ``"wan"``/``"dit"``, our kernel path -> ``_Target``) for every adaptable kernel of ``model``'s
    transformer blocks (a concrete or ``nnx.eval_shape`` model)."""
    kind, prefix = _root(model)
    out = {}
    for path, (module, name, n_in, lead) in lora.adaptable(model).items():
        shape = getattr(module, name).get_value().shape
        rel = path[len(prefix) :] if path.startswith(prefix) else None
        if rel is None or not rel.startswith("blocks/") or lead != 1:
            continue
        L = shape[0]
        if kind == "wan":
            theirs, comfy = WAN_MODULES[rel.removeprefix("blocks/")]
            modules = {Layout.DIFFUSERS: [f"blocks.{i}.{theirs}" for i in range(L)]}
            modules[Layout.COMFYUI] = [f"blocks.{i}.{comfy}" for i in range(L)]
        else:
            per_layer, _, _ = torch_names.torch_names(tuple(rel.split("/")), shape)
            modules = {Layout.DIFFUSERS: [n.removesuffix(".weight") for n in per_layer]}
        base = modules.get(Layout.COMFYUI, modules[Layout.DIFFUSERS])
        modules[Layout.KOHYA] = [m.replace(".", "_") for m in base]
        out[path] = _Target(path, shape, n_in, modules)
    return kind, out


# ------------------------------------------------------------------------------------------------- writing


def _adapters_of(model: nnx.Module) -> tuple[str, dict[str, _Target], lora.Adapters]:
    kind, table = targets(model)
    adapters = lora.model_adapters(model)
    if not adapters.kernels:
        raise LoraFileError(f"the {type(model).__name__} has no LoRA adapters to write (config.lora off?)")
    for path in adapters.kernels:
        if path not in table:
            raise LoraFileError(
                f"adapter on {path}: only the transformer blocks' kernels can go in a LoRA file"
            )
    return kind, table, adapters


def adapter_tensors(model: nnx.Module, layout: Layout) -> dict[str, np.ndarray]:
    """The adapters ``model`` carries as a file's tensors (float32 numpy, contiguous) in ``layout``
    (``DIFFUSERS``: scale folded into ``lora_B``, DoRA ``lora_magnitude_vector [out]``; ``COMFYUI``: Wan only,
    ``alpha = scale * r`` per module, DoRA ``dora_scale [out, 1]`` in ComfyUI's convention, see the module doc)."""
    layout = Layout(layout)
    kind, table, adapters = _adapters_of(model)
    owners = lora.adaptable(model)
    if layout == Layout.KOHYA or (layout == Layout.COMFYUI and kind != "wan"):
        raise LoraFileError(
            f"LoRA files are written in the {layout.value} layout for Wan models only, not kohya"
        )
    prefix, out = PREFIXES[layout], {}
    for path, ka in adapters.kernels.items():
        t = table[path]
        a = np.asarray(ka.a, np.float32)
        b = np.asarray(ka.b, np.float32)
        r = ka.rank
        m = None if ka.m is None else np.asarray(ka.m, np.float32).reshape(t.layers, -1)  # [L, out]
        if m is not None and layout == Layout.COMFYUI:  # ComfyUI divides by ||W|| + eps, not ||W + s A B||
            module_, name, n_in, _ = owners[path]
            base = np.asarray(lora.kernel(module_, name, np.float32)).reshape(
                t.layers, math.prod(t.io[0]), -1
            )
            merged = np.asarray(lora.merged_kernel(module_, name, n_in)).reshape(base.shape)
            m = m * (np.linalg.norm(base, axis=1) + np.float32(_EPS)) / np.linalg.norm(merged, axis=1)
        for i, module in enumerate(t.modules[layout]):
            down = np.ascontiguousarray(a[i].reshape(-1, r).T)  # [r, in]
            up = np.ascontiguousarray(b[i].reshape(r, -1).T)  # [out, r]
            if layout == Layout.DIFFUSERS:
                out[f"{prefix}{module}.lora_A.weight"] = down
                out[f"{prefix}{module}.lora_B.weight"] = up * np.float32(ka.scale)
                if m is not None:
                    out[f"{prefix}{module}{_MAGNITUDE[layout]}"] = np.ascontiguousarray(m[i])
            else:
                out[f"{prefix}{module}.lora_down.weight"] = down
                out[f"{prefix}{module}.lora_up.weight"] = up
                out[f"{prefix}{module}.alpha"] = np.asarray(ka.scale * r, np.float32)
                if m is not None:
                    out[f"{prefix}{module}{_MAGNITUDE[layout]}"] = np.ascontiguousarray(m[i][:, None])
    return out


def _atomic_write(path: Path, write) -> None:
    tmp = path.with_name(f".{path.name}.tmp")
    write(tmp)
    os.replace(tmp, path)


def write_adapters(model: nnx.Module, out_dir, *, metadata: Mapping[str, str] | None = None) -> list[Path]:
    """Writes ``model``'s adapters to ``out_dir``: ``pytorch_lora_weights.safetensors`` (diffusers/peft; what
    ``WanPipeline.load_lora_weights`` and the twin's ``SoraTransformer3DModel.load_lora_weights`` load), for a
    Wan model also ``wan_lora_comfyui.safetensors`` (ComfyUI / original Wan names), and ``adapter_config.json``
    (rank, alpha, targets, the DoRA targets, base model, layouts written, ``metadata``). ``metadata`` (str -> str)
    also goes into each safetensors header. Returns the paths written (each one replaced atomically)."""
    from safetensors.numpy import save_file

    kind, table, adapters = _adapters_of(model)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    header = {"format": "pt", **{str(k): str(v) for k, v in (metadata or {}).items()}}
    layouts = [Layout.DIFFUSERS, Layout.COMFYUI] if kind == "wan" else [Layout.DIFFUSERS]
    written = []
    for layout in layouts:
        tensors = adapter_tensors(model, layout)
        path = out_dir / FILES[layout]
        _atomic_write(path, lambda p, t=tensors: save_file(t, str(p), metadata=header))
        written.append(path)
    _, prefix = _root(model)
    ranks = {p.removeprefix(prefix): ka.rank for p, ka in adapters.kernels.items()}
    scales = {p.removeprefix(prefix): ka.scale for p, ka in adapters.kernels.items()}
    uniform = len(set(ranks.values())) == 1 and len(set(scales.values())) == 1
    rank = max(ranks.values())
    cfg = next(n.cfg for _, n in nnx.iter_graph(model) if isinstance(n, (WanTransformer, DiT)))
    config = {
        "format": "sora_jax.lora/1",
        "base_model": kind,
        "base_config": dataclasses.asdict(cfg) if dataclasses.is_dataclass(cfg) else None,
        "rank": rank,
        "alpha": scales[next(iter(scales))] * rank if uniform else None,
        "targets": sorted(ranks),
        "ranks": ranks,
        "scales": scales,
        "layouts": {layout.value: FILES[layout] for layout in layouts},
        "diffusers_scale_folded_into_lora_B": True,
        "dora": sorted(p.removeprefix(prefix) for p, ka in adapters.kernels.items() if ka.m is not None),
        "metadata": dict(header),
    }
    path = out_dir / CONFIG_FILE
    text = json.dumps(config, indent=2, sort_keys=True, default=str) + "\n"
    _atomic_write(path, lambda p: p.write_text(text))
    return [*written, path]


# ------------------------------------------------------------------------------------------------- reading


def _file_of(path: Path) -> Path:
    if path.is_file():
        return path
    if not path.is_dir():
        raise LoraFileError(f"{path}: no such LoRA file or folder")
    for layout in (Layout.DIFFUSERS, Layout.COMFYUI):
        if (path / FILES[layout]).is_file():
            return path / FILES[layout]
    found = sorted(path.glob("*.safetensors"))
    if len(found) != 1:
        raise LoraFileError(
            f"{path}: {len(found)} .safetensors files and no {FILES[Layout.DIFFUSERS]}; name one"
        )
    return found[0]


def _load(file: Path) -> tuple[dict[str, np.ndarray], dict[str, str]]:
    """(tensors as float32 numpy, safetensors header metadata); bfloat16 files read through JAX."""
    from safetensors import SafetensorError, safe_open

    try:
        with safe_open(str(file), framework="flax") as st:
            meta = st.metadata() or {}
            tensors = {k: np.asarray(st.get_tensor(k).astype("float32")) for k in st.keys()}  # noqa: SIM118
    except SafetensorError as e:
        raise LoraFileError(f"{file}: not a readable safetensors file ({e})") from None
    return tensors, meta


def _detect(keys: list[str], file: Path) -> Layout:
    if not keys:
        raise LoraFileError(f"{file}: holds no tensors")
    for layout in (Layout.KOHYA, Layout.COMFYUI):
        if any(k.startswith(PREFIXES[layout]) for k in keys):
            bad = next((k for k in keys if not k.startswith(PREFIXES[layout])), None)
            if bad is not None:
                raise LoraFileError(
                    f"{file}: key {bad!r} lacks the {PREFIXES[layout]!r} prefix the others have"
                )
            return layout
    if not any(k.endswith(_DOWN + _UP) for k in keys):
        raise LoraFileError(
            f"{file}: no lora_A/lora_B or lora_down/lora_up tensors (first key {sorted(keys)[0]!r})"
        )
    return Layout.DIFFUSERS


def _peft_scale(meta: Mapping[str, str], file: Path):
    """rank -> scale from a diffusers/peft ``lora_adapter_metadata`` header, or None when there is none."""
    raw = meta.get("lora_adapter_metadata")
    if not raw:
        return None
    try:
        conf = json.loads(raw)
    except json.JSONDecodeError:
        raise LoraFileError(f"{file}: its lora_adapter_metadata header is not JSON") from None
    conf = {k.removeprefix("transformer."): v for k, v in conf.items()}
    if conf.get("alpha_pattern") or conf.get("rank_pattern"):
        raise LoraFileError(
            f"{file}: per-module alpha_pattern/rank_pattern in lora_adapter_metadata is not supported"
        )
    alpha = conf.get("lora_alpha")
    if alpha is None:
        return None
    root = math.sqrt if conf.get("use_rslora") else (lambda r: r)
    return lambda r: float(alpha) / root(r)


def read_adapters(path, model: nnx.Module) -> lora.Adapters:
    """A LoRA file (or a folder holding one) -> ``lora.Adapters`` for ``model`` (concrete or
    ``nnx.eval_shape``): per kernel path of ``model``, A ``[L, *I, r]``, B ``[L, r, *O]`` (float32) and scale.

    The layout is detected from the keys (diffusers/peft ``lora_A``/``lora_B`` with a ``transformer.`` prefix
    or none; ComfyUI ``diffusion_model.`` + ``lora_down``/``lora_up``/``alpha``; kohya ``lora_unet_``). Scale:
    a module's ``.alpha`` / r, else a ``lora_adapter_metadata`` header's ``lora_alpha`` / r, else 1. Layers the
    file leaves out get zeros (no change); layers of different ranks are zero-padded to the largest (exact);
    per-layer scales that differ are folded into B. ``LoraFileError`` (one line) for a key naming no kernel of
    the model, a missing lora_A/lora_B partner, or a shape or rank that does not fit."""
    file = _file_of(Path(path))
    tensors, meta = _load(file)
    layout = _detect(list(tensors), file)
    kind, table = targets(model)
    by_module = {m: (t.path, i) for t in table.values() for i, m in enumerate(t.modules.get(layout, []))}
    strip = ("base_model.model.", "transformer.") if layout == Layout.DIFFUSERS else (PREFIXES[layout],)
    parts: dict[tuple[str, int], dict[str, tuple[str, np.ndarray]]] = {}
    for key, value in tensors.items():
        name = key
        for p in strip:
            name = name.removeprefix(p)
        kinds = (("down", _DOWN), ("up", _UP), ("alpha", (_ALPHA,)), ("m", (_MAGNITUDE[layout],)))
        part = next((s for s, ends in kinds if name.endswith(ends)), None)
        if part is None:
            raise LoraFileError(
                f"{file}: tensor {key!r} is not a LoRA down/up weight, alpha or DoRA magnitude (unsupported)"
            )
        module = name.removesuffix(next(e for _, ends in kinds for e in ends if name.endswith(e)))
        if module not in by_module:
            raise LoraFileError(
                f"{file}: {key!r} names no adaptable kernel of this {kind} model ({layout.value} layout; "
                f"e.g. {next(iter(by_module), 'none')!r})"
            )
        parts.setdefault(by_module[module], {})[part] = (key, value)
    scale_of = _peft_scale(meta, file) if layout == Layout.DIFFUSERS else None
    found: dict[str, dict[int, tuple[np.ndarray, np.ndarray, float]]] = {}
    magnitudes: dict[str, dict[int, np.ndarray]] = {}  # as in the file: ComfyUI's convention there
    for (kpath, i), got in parts.items():
        t = table[kpath]
        if "down" not in got or "up" not in got:
            have = next(iter(got.values()))[0]
            raise LoraFileError(
                f"{file}: {have!r} has no lora_{'up/B' if 'up' not in got else 'down/A'} partner"
            )
        (dkey, down), (ukey, up) = got["down"], got["up"]
        I, O = t.io
        if down.ndim != 2 or down.shape[1] != math.prod(I):
            raise LoraFileError(
                f"{file}: {dkey!r} has shape {list(down.shape)}; the model wants [r, {math.prod(I)}]"
            )
        r = down.shape[0]
        if up.shape != (math.prod(O), r):
            raise LoraFileError(
                f"{file}: {ukey!r} has shape {list(up.shape)}; the model wants [{math.prod(O)}, {r}] "
                f"(rank {r} from {dkey!r})"
            )
        if "alpha" in got:
            scale = float(np.asarray(got["alpha"][1]).reshape(())) / r
        else:
            scale = scale_of(r) if scale_of else 1.0
        found.setdefault(kpath, {})[i] = (down.T.reshape(*I, r), up.T.reshape(r, *O), scale)
        if "m" in got:
            mkey, m = got["m"]
            want = (math.prod(O),) if layout == Layout.DIFFUSERS else (math.prod(O), 1)
            if m.shape != want:
                raise LoraFileError(
                    f"{file}: DoRA magnitude {mkey!r} has shape {list(m.shape)}; the model wants {list(want)} "
                    f"(per output channel; a per-input-column [1, in] DoRA is not supported)"
                )
            magnitudes.setdefault(kpath, {})[i] = m.reshape(O)
    if not found:
        raise LoraFileError(f"{file}: no LoRA weights for this {kind} model")
    out = {}
    for kpath, layers in sorted(found.items()):
        t = table[kpath]
        I, O = t.io
        rank = max(a.shape[-1] for a, _, _ in layers.values())
        scales = {s for _, _, s in layers.values()}
        one = scales.pop() if len(scales) == 1 else None
        A = np.zeros((t.layers, *I, rank), np.float32)
        B = np.zeros((t.layers, rank, *O), np.float32)
        for i, (a, b, s) in layers.items():
            A[i, ..., : a.shape[-1]] = a
            B[i, : b.shape[0]] = b if one is not None else b * np.float32(s)
        M = None
        if kpath in magnitudes:
            M = np.full((t.layers, *O), np.nan, np.float32)  # NaN: a layer without a magnitude
            base = None if layout == Layout.DIFFUSERS else _base_kernel(model, t, file)  # [L, in, out]
            for i, m in magnitudes[kpath].items():
                M[i] = m if base is None else _from_comfy(m, base[i], layers[i])
        out[kpath] = lora.KernelAdapter(A, B, one if one is not None else 1.0, M)
    return lora.Adapters(out, source=str(file))


def _base_kernel(model: nnx.Module, t: _Target, file: Path) -> np.ndarray:
    """``t``'s base kernel of ``model`` (dequantized) as float32 ``[L, in, out]``; a ComfyUI ``dora_scale`` needs it."""
    module, name, _, _ = lora.adaptable(model)[t.path]
    if isinstance(getattr(module, name).get_value(), jax.ShapeDtypeStruct):
        raise LoraFileError(
            f"{file}: a ComfyUI DoRA file (dora_scale) needs the model's base weights to be read: pass a "
            f"model with values, not an abstract (eval_shape) one"
        )
    return np.asarray(lora.kernel(module, name, np.float32)).reshape(t.layers, math.prod(t.io[0]), -1)


def _from_comfy(dora_scale: np.ndarray, w: np.ndarray, layer) -> np.ndarray:
    """ComfyUI's per-output-channel ``dora_scale [*O]`` of one layer -> our magnitude ``m [*O]``: ComfyUI's kernel
    is ``dora_scale (W + s A B) / (||W||_I + eps)``, ours ``m (W + s A B) / ||W + s A B||_I``; ``w`` is the
    layer's base kernel ``[in, out]``, ``layer`` its ``(A [*I, r], B [r, *O], s)`` from the file."""
    a, b, s = layer
    merged = w + np.float32(s) * (a.reshape(w.shape[0], -1) @ b.reshape(b.shape[0], -1))
    ratio = np.linalg.norm(merged, axis=0) / (np.linalg.norm(w, axis=0) + np.float32(_EPS))
    return dora_scale * ratio.reshape(dora_scale.shape)
