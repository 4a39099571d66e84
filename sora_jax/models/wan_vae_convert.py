"""diffusers' ``AutoencoderKLWan`` folders <-> ``WanVAE`` (``wan_vae.py``), offline.

Owns: ``config_from_diffusers`` / ``config_to_diffusers`` (config.json), ``from_diffusers`` (a folder ->
``WanVAE``, every tensor read through ``safetensors.safe_open``), ``from_diffusers_state_dict``,
``to_diffusers_state_dict`` (diffusers' exact keys and layouts; the round trip is bitwise in float32) and
``save_diffusers`` (a folder ``AutoencoderKLWan.from_pretrained`` loads).

Names: our parameter paths are diffusers' module paths (``encoder.down_blocks.3.conv1``,
``decoder.up_blocks.0.upsamplers.0.time_conv``, ...), ``kernel`` for ``weight``, except the spatial conv of a
resample, ``resample`` here and ``resample.1`` there (index 1 of an ``nn.Sequential``). Layouts: Conv3d
``[O, I, kt, kh, kw]`` <-> ``[kt, kh, kw, I, O]``; Conv2d ``[O, I, kh, kw]`` <-> ``[kh, kw, I, O]``; RMS
gammas ``[C, 1, 1, 1]`` (``[C, 1, 1]`` in attention blocks) <-> ``[C]``.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax.models.layers import as_dtype
from sora_jax.models.wan_vae import WanVAE, WanVAEConfig

WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = "diffusion_pytorch_model.safetensors.index.json"
# config.json keys that do not change the computation here
_IGNORED = {"dropout", "scale_factor_temporal", "scale_factor_spatial", "clip_output"}
_ARCH = ("base_dim", "decoder_base_dim", "z_dim", "dim_mult", "num_res_blocks", "attn_scales")
_ARCH += ("temperal_downsample", "in_channels", "out_channels", "latents_mean", "latents_std")


def config_from_diffusers(d: Mapping, *, dtype="float32", param_dtype=None) -> WanVAEConfig:
    """An ``AutoencoderKLWan`` config.json dict -> ``WanVAEConfig`` (diffusers' defaults where keys are
    missing). Wan 2.2's VAE (``is_residual``, ``patch_size``) and unknown keys raise."""
    if d.get("is_residual"):
        raise ValueError("config.json: is_residual=true is Wan 2.2's VAE; only Wan 2.1's is implemented")
    if d.get("patch_size") is not None:
        raise ValueError(f"config.json: patch_size={d['patch_size']} (Wan 2.2) is not implemented")
    unknown = sorted(k for k in d if not k.startswith("_") and k not in (*_ARCH, *_IGNORED, "is_residual"))
    unknown = [k for k in unknown if k != "patch_size"]
    if unknown:
        raise ValueError(f"config.json: unknown AutoencoderKLWan keys {unknown}")
    kw = {k: tuple(d[k]) if isinstance(d[k], list) else d[k] for k in _ARCH if k in d}
    return WanVAEConfig(**kw, dtype=str(as_dtype(dtype)), param_dtype=str(as_dtype(param_dtype or dtype)))


def config_to_diffusers(cfg: WanVAEConfig) -> dict:
    """``WanVAEConfig`` -> an ``AutoencoderKLWan`` config.json dict."""
    d = {k: getattr(cfg, k) for k in _ARCH}
    d = {k: list(v) if isinstance(v, tuple) else v for k, v in d.items()}
    s, t = cfg.spatial_downsample, cfg.temporal_downsample
    extra = dict(
        dropout=0.0, is_residual=False, patch_size=None, scale_factor_spatial=s, scale_factor_temporal=t
    )
    return {"_class_name": "AutoencoderKLWan", **d, **extra}


# --------------------------------------------------------------------------------------------- names


def diffusers_key(path: tuple) -> str:
    """Our parameter path (``("encoder", "down_blocks", 0, "conv1", "kernel")``) -> diffusers' key."""
    parts = [str(p) for p in path]
    parts[-1] = {"kernel": "weight"}.get(parts[-1], parts[-1])
    if len(parts) >= 2 and parts[-2] == "resample":
        parts.insert(len(parts) - 1, "1")
    return ".".join(parts)


def _to_torch_layout(key: str, w: np.ndarray) -> np.ndarray:
    if w.ndim == 5:
        return w.transpose(4, 3, 0, 1, 2)
    if w.ndim == 4:
        return w.transpose(3, 2, 0, 1)
    if key.endswith(".gamma"):
        return w.reshape(w.shape[0], *((1, 1) if key.endswith(".norm.gamma") else (1, 1, 1)))
    return w


def _to_our_layout(w: np.ndarray, ours: tuple[int, ...]) -> np.ndarray:
    if w.ndim == 5:
        w = w.transpose(2, 3, 4, 1, 0)
    elif w.ndim == 4 and len(ours) == 4:
        w = w.transpose(2, 3, 1, 0)
    elif len(ours) == 1 and w.ndim > 1 and all(n == 1 for n in w.shape[1:]):
        w = w.reshape(w.shape[0])
    return w


# ------------------------------------------------------------------------------------ state dicts


def _abstract(cfg: WanVAEConfig):
    return nnx.split(nnx.eval_shape(lambda: WanVAE(cfg, rngs=nnx.Rngs(0))))


def from_diffusers_state_dict(state_dict: Mapping[str, np.ndarray], cfg: WanVAEConfig) -> WanVAE:
    """diffusers' state dict (numpy arrays, its layouts) -> ``WanVAE`` in ``cfg.param_dtype``. Missing,
    unexpected or misshapen tensors raise, naming them."""
    graphdef, abs_state = _abstract(cfg)
    flat = list(nnx.to_flat_state(abs_state))
    wanted = {diffusers_key(p): v.get_value().shape for p, v in flat}
    missing = sorted(set(wanted) - set(state_dict))
    unexpected = sorted(set(state_dict) - set(wanted))
    if missing or unexpected:
        raise ValueError(
            f"Wan VAE weights do not match the config: missing {missing[:8]}"
            f"{' ...' if len(missing) > 8 else ''} ({len(missing)}), unexpected {unexpected[:8]}"
            f"{' ...' if len(unexpected) > 8 else ''} ({len(unexpected)})"
        )
    pd = as_dtype(cfg.param_dtype)
    out = []
    for path, var in flat:
        key = diffusers_key(path)
        w = _to_our_layout(np.asarray(state_dict[key]), wanted[key])
        if w.shape != wanted[key]:
            raise ValueError(
                f"Wan VAE tensor {key} has shape {tuple(np.shape(state_dict[key]))}; the config implies "
                f"{_to_torch_layout(key, np.zeros(wanted[key], np.float32)).shape}"
            )
        out.append((path, var.replace(jnp.asarray(w.astype(pd)))))
    return nnx.merge(graphdef, nnx.from_flat_state(out))


def to_diffusers_state_dict(model: WanVAE) -> dict[str, np.ndarray]:
    """``WanVAE`` -> diffusers' state dict: its keys, its layouts (numpy, the parameters' dtype)."""
    return {
        diffusers_key(p): np.ascontiguousarray(_to_torch_layout(diffusers_key(p), np.asarray(v.get_value())))
        for p, v in nnx.to_flat_state(nnx.state(model, nnx.Param))
    }


# ------------------------------------------------------------------------------------------- folders

_SAFETENSORS_DTYPES = {"BF16": "bfloat16", "F16": "float16", "F32": "float32", "F64": "float64"}


def _read_tensor(file: Path, name: str) -> np.ndarray:
    from safetensors import safe_open

    with safe_open(str(file), framework="np") as f:
        dtype = f.get_slice(name).get_dtype()
        if dtype != "BF16":
            return f.get_tensor(name)
    with open(file, "rb") as f:  # numpy has no bfloat16, so safe_open cannot: read the layout itself
        n = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(n))[name]
        start, end = meta["data_offsets"]
        f.seek(8 + n + start)
        buf = f.read(end - start)
    return np.frombuffer(buf, jnp.dtype(_SAFETENSORS_DTYPES[dtype])).reshape(meta["shape"])


def _vae_folder(vae_dir: str | Path) -> Path:
    folder = Path(vae_dir)
    if (folder / "vae" / "config.json").is_file() and not (folder / "config.json").is_file():
        folder = folder / "vae"  # a whole pipeline folder
    if not (folder / "config.json").is_file():
        raise FileNotFoundError(f"{folder} has no config.json (want diffusers' AutoencoderKLWan folder)")
    return folder


def _weight_files(folder: Path) -> dict[str, Path]:
    from safetensors import safe_open

    if (folder / INDEX).is_file():
        weight_map = json.loads((folder / INDEX).read_text())["weight_map"]
        files = {k: folder / v for k, v in weight_map.items()}
    elif (folder / WEIGHTS).is_file():
        with safe_open(str(folder / WEIGHTS), framework="np") as f:
            files = {k: folder / WEIGHTS for k in f.keys()}  # noqa: SIM118 (a safe_open handle is not iterable)
    else:
        raise FileNotFoundError(f"no weights in {folder}: want {WEIGHTS} or {INDEX}")
    for f in set(files.values()):
        if not f.is_file():
            raise FileNotFoundError(f"weight file {f} (named in {INDEX}) does not exist")
    return files


def from_diffusers(vae_dir: str | Path, dtype="float32", *, param_dtype=None) -> WanVAE:
    """diffusers' ``AutoencoderKLWan`` folder (``config.json`` + safetensors, sharded or not; or a pipeline
    folder holding ``vae/``) -> ``WanVAE``. ``dtype``: compute; ``param_dtype``: storage (default ``dtype``).
    Offline; raises naming missing / unexpected / misshapen tensors."""
    folder = _vae_folder(vae_dir)
    cfg = config_from_diffusers(
        json.loads((folder / "config.json").read_text()), dtype=dtype, param_dtype=param_dtype
    )
    files = _weight_files(folder)
    return from_diffusers_state_dict(_LazyTensors(files), cfg)


class _LazyTensors(Mapping):
    """Key -> tensor read on access (one at a time, so peak host memory is one tensor plus the model)."""

    def __init__(self, files: dict[str, Path]):
        self.files = files

    def __getitem__(self, key: str) -> np.ndarray:
        return _read_tensor(self.files[key], key)

    def __iter__(self):
        return iter(self.files)

    def __len__(self) -> int:
        return len(self.files)


def save_diffusers(model: WanVAE, out_dir: str | Path, dtype="float32") -> Path:
    """Writes ``config.json`` + ``diffusion_pytorch_model.safetensors`` (tensors cast to ``dtype``: float32
    or float16) that ``AutoencoderKLWan.from_pretrained(out_dir)`` loads. Returns the folder."""
    from safetensors.numpy import save_file

    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    np_dtype = np.dtype(str(as_dtype(dtype)))
    if np_dtype not in (np.float32, np.float16):
        raise ValueError(f"save_diffusers writes float32 or float16, not {dtype}")
    sd = {k: np.ascontiguousarray(v.astype(np_dtype)) for k, v in to_diffusers_state_dict(model).items()}
    save_file(sd, str(out / WEIGHTS), metadata={"format": "pt"})
    cfg = config_to_diffusers(model.cfg)
    (out / "config.json").write_text(json.dumps(cfg, indent=2) + "\n")
    return out


def param_count(cfg: WanVAEConfig) -> int:
    """Parameters of the VAE ``cfg`` describes, counted without allocating them."""
    _, state = _abstract(cfg)
    return sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state))
