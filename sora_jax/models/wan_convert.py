"""Diffusers' ``WanTransformer3DModel`` <-> ``sora_jax.models.wan.WanTransformer``: configs, names, layouts.

Owns: ``config_from_diffusers`` / ``config_to_diffusers`` (config.json <-> ``WanConfig``), ``from_state_dict``
(a diffusers state dict -> model), ``to_diffusers_state_dict`` (model -> diffusers' exact keys and layouts),
and ``from_diffusers`` (a diffusers ``transformer/`` folder -> model, read shard by shard with
``safetensors.safe_open``, never the whole checkpoint twice in host memory).

One table (``_entries``) names every parameter both ways. Layouts: torch ``Linear.weight [out, in]`` ->
kernel ``[in, out]``; attention q/k/v ``[K*H, D]`` -> ``[D, K, H]``, output ``[D, K*H]`` -> ``[K, H, D]``,
biases and q/k norms ``[K*H]`` -> ``[K, H]``; ``Conv3d.weight [D, C, pt, ph, pw]`` -> ``[pt*ph*pw*C, D]``
(patchify's order); ``scale_shift_table [1, n, D]`` -> ``[n, D]``; per-block params stacked ``[depth, ...]``.
"""

from __future__ import annotations

import json
from collections.abc import Iterable, Iterator, Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx, traverse_util

from sora_jax.models.wan_transformer import WanConfig, WanTransformer

CLASS_NAME = "WanTransformer3DModel"
SINGLE_FILE = "diffusion_pytorch_model.safetensors"
INDEX_FILE = "diffusion_pytorch_model.safetensors.index.json"

# layout kinds of the name table
_DENSE, _VEC, _QKV, _HEADS, _OUT, _CONV, _TABLE = "dense", "vec", "qkv", "heads", "out", "conv", "table"

# WanTransformer3DModel's defaults, for keys a config.json may leave out
_DIFFUSERS_DEFAULTS = dict(
    patch_size=(1, 2, 2), num_attention_heads=40, attention_head_dim=128, in_channels=16, out_channels=16,
    text_dim=4096, freq_dim=256, ffn_dim=13824, num_layers=40, cross_attn_norm=True, eps=1e-6,
)  # fmt: skip
_TEXT_EMBEDDER = ("text_embedder.linear_1", "text_embedder.linear_2")

# config.json key -> WanConfig field (num_attention_heads * attention_head_dim -> width is handled apart)
_CONFIG_KEYS = {
    "num_layers": "depth",
    "num_attention_heads": "num_heads",
    "ffn_dim": "ffn_dim",
    "text_dim": "text_dim",
    "in_channels": "in_channels",
    "out_channels": "out_channels",
    "patch_size": "patch_size",
    "freq_dim": "freq_dim",
    "eps": "eps",
    "cross_attn_norm": "cross_attn_norm",
}


def config_from_diffusers(config: Mapping, **overrides) -> WanConfig:
    """A diffusers ``WanTransformer3DModel`` config.json (dict) -> ``WanConfig`` (+ field overrides such as
    ``dtype``). Raises on the image-conditioned (I2V / FLF2V) variants, which are not supported."""
    name = config.get("_class_name", CLASS_NAME)
    if name != CLASS_NAME:
        raise ValueError(f"config.json describes a {name}, not a {CLASS_NAME}")
    for key in ("image_dim", "added_kv_proj_dim", "pos_embed_seq_len"):
        if config.get(key) is not None:
            raise ValueError(
                f"config.json sets {key}={config[key]}: an image-conditioned Wan (I2V/FLF2V); only the "
                "text-to-video transformer (image_dim, added_kv_proj_dim, pos_embed_seq_len all null) is supported"
            )
    c = {**_DIFFUSERS_DEFAULTS, **config}
    # qk_norm is not read by diffusers' blocks (their q/k always get an RMSNorm across heads); neither here
    fields = {ours: c[theirs] for theirs, ours in _CONFIG_KEYS.items()}
    fields["out_channels"] = fields["out_channels"] or fields["in_channels"]
    fields["width"] = int(c["num_attention_heads"]) * int(c["attention_head_dim"])
    return WanConfig(**{**fields, **overrides})


def config_to_diffusers(cfg: WanConfig) -> dict:
    """``WanConfig`` -> the config.json dict diffusers' ``WanTransformer3DModel`` is built from (T2V)."""
    out = {"_class_name": CLASS_NAME}
    out.update({theirs: getattr(cfg, ours) for theirs, ours in _CONFIG_KEYS.items()})
    out.update(patch_size=list(cfg.patch_size), attention_head_dim=cfg.head_dim)
    out.update(qk_norm="rms_norm_across_heads", image_dim=None, added_kv_proj_dim=None, rope_max_seq_len=1024)
    out.update(pos_embed_seq_len=None)
    return out


# ------------------------------------------------------------------------------------------ the name table


def _entries(cfg: WanConfig) -> tuple[list, list]:
    """(top, per_block): lists of (diffusers name, our path in the pure state dict, layout kind); per-block
    names are relative to ``blocks.{i}.``, their paths hold the stacked ``[depth, ...]`` array."""
    top = [("patch_embedding.weight", ("patch_embedding", "kernel"), _CONV)]
    top.append(("patch_embedding.bias", ("patch_embedding", "bias"), _VEC))
    for mod in ("time_embedder.linear_1", "time_embedder.linear_2", "time_proj", *_TEXT_EMBEDDER):
        path = ("condition_embedder", *mod.split("."))
        top.append((f"condition_embedder.{mod}.weight", (*path, "kernel"), _DENSE))
        top.append((f"condition_embedder.{mod}.bias", (*path, "bias"), _VEC))
    top.append(("proj_out.weight", ("proj_out", "kernel"), _DENSE))
    top.append(("proj_out.bias", ("proj_out", "bias"), _VEC))
    top.append(("scale_shift_table", ("scale_shift_table",), _TABLE))
    block = []
    for a in ("attn1", "attn2"):
        for n in "qkv":
            block.append((f"{a}.to_{n}.weight", ("blocks", a, f"w{n}"), _QKV))
            block.append((f"{a}.to_{n}.bias", ("blocks", a, f"b{n}"), _HEADS))
        block.append((f"{a}.to_out.0.weight", ("blocks", a, "wo"), _OUT))
        block.append((f"{a}.to_out.0.bias", ("blocks", a, "bo"), _VEC))
        block.append((f"{a}.norm_q.weight", ("blocks", a, "norm_q"), _HEADS))
        block.append((f"{a}.norm_k.weight", ("blocks", a, "norm_k"), _HEADS))
    if cfg.cross_attn_norm:
        block.append(("norm2.weight", ("blocks", "norm2_scale"), _VEC))
        block.append(("norm2.bias", ("blocks", "norm2_bias"), _VEC))
    for theirs, ours in (("ffn.net.0.proj", "fc1"), ("ffn.net.2", "fc2")):
        block.append((f"{theirs}.weight", ("blocks", "ffn", ours, "kernel"), _DENSE))
        block.append((f"{theirs}.bias", ("blocks", "ffn", ours, "bias"), _VEC))
    block.append(("scale_shift_table", ("blocks", "scale_shift_table"), _TABLE))
    return top, block


def _name_map(cfg: WanConfig) -> dict[str, tuple[tuple[str, ...], str, int | None]]:
    """Every diffusers key -> (our path, layout kind, block index or None)."""
    top, block = _entries(cfg)
    out = {name: (path, kind, None) for name, path, kind in top}
    for i in range(cfg.depth):
        out.update({f"blocks.{i}.{name}": (path, kind, i) for name, path, kind in block})
    return out


def _to_ours(kind: str, w: np.ndarray, cfg: WanConfig) -> np.ndarray:
    """A diffusers tensor -> our layout (views where possible)."""
    K, H, D = cfg.num_heads, cfg.head_dim, cfg.width
    if kind == _DENSE:
        return w.T
    if kind == _QKV:
        return w.T.reshape(D, K, H)
    if kind == _OUT:
        return w.T.reshape(K, H, D)
    if kind == _HEADS:
        return w.reshape(K, H)
    if kind == _CONV:  # [D, C, pt, ph, pw] -> [(pt, ph, pw, C), D]
        return w.transpose(2, 3, 4, 1, 0).reshape(-1, D)
    if kind == _TABLE:
        return w.reshape(w.shape[1:])
    return w


def _to_theirs(kind: str, w: np.ndarray, cfg: WanConfig) -> np.ndarray:
    """Inverse of ``_to_ours``, contiguous."""
    K, H, D = cfg.num_heads, cfg.head_dim, cfg.width
    if kind == _DENSE:
        w = w.T
    elif kind == _QKV:
        w = w.reshape(D, K * H).T
    elif kind == _OUT:
        w = w.reshape(K * H, D).T
    elif kind == _HEADS:
        w = w.reshape(K * H)
    elif kind == _CONV:
        pt, ph, pw = cfg.patch_size
        w = w.reshape(pt, ph, pw, cfg.in_channels, D).transpose(4, 3, 0, 1, 2)
    elif kind == _TABLE:
        w = w[None]
    return np.ascontiguousarray(w)


def _their_shape(kind: str, ours: tuple[int, ...], cfg: WanConfig) -> tuple[int, ...]:
    """The diffusers shape of a parameter whose (per-block) shape here is ``ours``."""
    if kind == _DENSE:
        return ours[::-1]
    if kind == _QKV:
        return (cfg.width, cfg.width)
    if kind == _OUT:
        return (cfg.width, cfg.width)
    if kind == _HEADS:
        return (cfg.width,)
    if kind == _CONV:
        return (cfg.width, cfg.in_channels, *cfg.patch_size)
    if kind == _TABLE:
        return (1, *ours)
    return ours


# ------------------------------------------------------------------------------------------------ loading


def _describe(keys: Iterable[str], limit: int = 8) -> str:
    keys = sorted(keys)
    more = f" and {len(keys) - limit} more" if len(keys) > limit else ""
    return ", ".join(keys[:limit]) + more


def _check_keys(given: Iterable[str], names: Mapping, where: str) -> None:
    given = set(given)
    missing, unexpected = set(names) - given, given - set(names)
    if missing or unexpected:
        parts = [f"missing {len(missing)}: {_describe(missing)}"] if missing else []
        parts += [f"unexpected {len(unexpected)}: {_describe(unexpected)}"] if unexpected else []
        raise ValueError(f"{where} does not match the Wan config: " + "; ".join(parts))


class _Filler:
    """Host buffers in our layout for every parameter, filled one diffusers tensor at a time."""

    def __init__(self, cfg: WanConfig):
        self.cfg = cfg
        abstract = nnx.eval_shape(lambda: WanTransformer(cfg, rngs=nnx.Rngs(0)))
        self.graphdef, self.state = nnx.split(abstract)
        flat = traverse_util.flatten_dict(nnx.to_pure_dict(self.state))
        self.buffers = {path: np.empty(s.shape, s.dtype) for path, s in flat.items()}
        self.names = _name_map(cfg)
        self.filled: set[str] = set()

    def put(self, name: str, w: np.ndarray) -> None:
        """Stores diffusers tensor ``name`` (its layout, any float dtype) into our buffers."""
        path, kind, layer = self.names[name]
        buf = self.buffers[path] if layer is None else self.buffers[path][layer]
        want = _their_shape(kind, buf.shape, self.cfg)
        if tuple(w.shape) != tuple(want):
            raise ValueError(f"diffusers tensor {name} has shape {tuple(w.shape)}; the config wants {want}")
        buf[...] = _to_ours(kind, np.asarray(w), self.cfg).astype(buf.dtype)
        self.filled.add(name)

    def model(self) -> WanTransformer:
        """The filled buffers as a ``WanTransformer`` (host buffers released one by one)."""
        _check_keys(self.filled, self.names, "the diffusers weights")
        arrays = {path: jnp.asarray(self.buffers.pop(path)) for path in list(self.buffers)}
        nnx.replace_by_pure_dict(self.state, traverse_util.unflatten_dict(arrays))
        return nnx.merge(self.graphdef, self.state)


def from_state_dict(state_dict: Mapping[str, np.ndarray], cfg: WanConfig) -> WanTransformer:
    """A diffusers ``WanTransformer3DModel`` state dict (numpy arrays, any float dtype) -> ``WanTransformer``.

    Raises a ``ValueError`` naming the missing and unexpected keys, or the first key whose shape is wrong.
    """
    filler = _Filler(cfg)
    _check_keys(state_dict, filler.names, "the state dict")
    for name, w in state_dict.items():
        filler.put(name, w)
    return filler.model()


def to_diffusers_state_dict(model: WanTransformer) -> dict[str, np.ndarray]:
    """``WanTransformer`` -> diffusers' state dict: exact keys, layouts and shapes, the params' dtypes."""
    return dict(iter_diffusers_tensors(model))


def iter_diffusers_tensors(model: WanTransformer) -> Iterator[tuple[str, np.ndarray]]:
    """``to_diffusers_state_dict`` one (name, tensor) at a time, in diffusers' layout and the params' dtypes:
    a writer that streams them holds the model plus the tensors of one shard, never the model twice."""
    cfg = model.cfg
    flat = traverse_util.flatten_dict(nnx.to_pure_dict(nnx.state(model, nnx.Param)))
    for name, (path, kind, layer) in _name_map(cfg).items():
        host = np.asarray(jax.device_get(flat[path] if layer is None else flat[path][layer]))
        yield name, _to_theirs(kind, host, cfg)


def _shard_files(folder: Path) -> list[Path]:
    index = folder / INDEX_FILE
    if index.is_file():
        weight_map = json.loads(index.read_text())["weight_map"]
        files = [folder / f for f in sorted(set(weight_map.values()))]
        absent = [f.name for f in files if not f.is_file()]
        if absent:
            raise FileNotFoundError(f"{index} names shard(s) not in {folder}: {', '.join(absent)}")
        return files
    if (folder / SINGLE_FILE).is_file():
        return [folder / SINGLE_FILE]
    raise FileNotFoundError(
        f"no {SINGLE_FILE} or {INDEX_FILE} in {folder} (a diffusers Wan transformer/ folder, safetensors only)"
    )


def from_diffusers(path: str | Path, *, dtype="float32", param_dtype=None, **overrides) -> WanTransformer:
    """Reads a diffusers ``WanTransformer3DModel`` folder (``transformer/`` or a pipeline folder holding one):
    config.json plus one safetensors file or index-listed shards (float32/bf16/fp16 on disk), offline.

    ``dtype`` is the compute dtype, ``param_dtype`` the storage dtype (default: ``dtype``); ``overrides`` go
    to ``WanConfig`` (e.g. ``attention_impl``, ``remat``). Shards are streamed one at a time into host
    buffers in our layout; every key is checked before any tensor is read.
    """
    folder = Path(path)
    if not (folder / "config.json").is_file() and (folder / "transformer" / "config.json").is_file():
        folder = folder / "transformer"
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"no config.json in {folder}: not a diffusers WanTransformer3DModel folder")
    from safetensors import safe_open

    config = json.loads((folder / "config.json").read_text())
    cfg = config_from_diffusers(config, dtype=dtype, param_dtype=param_dtype or dtype, **overrides)
    files = _shard_files(folder)
    filler = _Filler(cfg)
    keys = []
    for f in files:
        with safe_open(f, framework="numpy") as st:
            keys += list(st.keys())
    if len(keys) != len(set(keys)):
        raise ValueError(f"{folder}: a tensor name appears in more than one shard")
    _check_keys(keys, filler.names, f"the weights in {folder}")
    for f in files:
        with safe_open(f, framework="numpy") as st:
            for name in st.keys():  # noqa: SIM118 (safe_open handles are not iterable)
                filler.put(name, st.get_tensor(name))
    return filler.model()
