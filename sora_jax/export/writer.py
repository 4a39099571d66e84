"""``sora-jax export``: a workdir's latest checkpoint as a diffusers-layout folder that runs in plain PyTorch.

    DIR/
      model_index.json                 SoraPipeline and its components (+ the sampling defaults)
      transformer/                     config.json + diffusion_pytorch_model.safetensors (sharded + index above
                                       max_shard_bytes, named as diffusers names them)
      vae/                             the VAE twin (latent models) or the pixel codec (identity / luma)
      scheduler/scheduler_config.json  FlowMatchEulerDiscreteScheduler (flow shift) | DDIMScheduler | DDPMScheduler
      text_encoder/ + tokenizer/       the frozen encoder in its transformers format, or the trainable twin
      text_adapter/                    frozen encoders only: the trained adapter
      sora_torch/                      the twins and SoraPipeline (torch + diffusers, no JAX)
      generate.py                      python DIR/generate.py --prompt "..." --seed 0 --out a.mp4
      policy.json                      the config's prompt policy (safety.policy), applied by SoraPipeline
      watermark.json                   the watermark generate.py puts in its videos (safety.watermark, payload)
      sora_jax.json                    what `sora-jax import` needs: the config, step, data position
      datacard.json                    the training data's card (sora_jax.data.datacard), or the checkpoint's
                                       {hash, summary} of it when the dataset's card changed or is gone;
                                       absent for a checkpoint made before data cards

The folder is written beside ``DIR`` under a temporary name, every tensor is read back and checked (names,
shapes, dtypes, finite), and only then renamed to ``DIR``: a failed export leaves nothing behind.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import time
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from sora_jax.choices import (
    AutoencoderKind,
    ModelArch,
    Objective,
    Prediction,
    ScheduleKind,
    Task,
    TextEncoderKind,
)
from sora_jax.errors import UserError
from sora_jax.export import configs, names

log = logging.getLogger("sora_jax.export")

DTYPES = ("float32", "bfloat16")
WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = WEIGHTS + ".index.json"
META = "sora_jax.json"
POLICY = "policy.json"  # sora_torch/pipeline.py reads it under this name
WATERMARK = "watermark.json"  # generate.py reads it: the watermark its videos carry
MAX_SHARD_BYTES = 10 * 2**30  # diffusers' save_pretrained default ("10GB")
_HF_CLASSES = {  # config.json model_type -> (encoder class, tokenizer class) in transformers
    "bert": ("BertModel", "BertTokenizerFast"),
    "t5": ("T5EncoderModel", "T5TokenizerFast"),
    "mt5": ("MT5EncoderModel", "T5TokenizerFast"),
    "umt5": ("UMT5EncoderModel", "T5TokenizerFast"),
}


class ExportError(UserError):
    """Bad input to export or import (one line)."""


def _torch():
    try:
        import diffusers  # noqa: F401
        import safetensors.torch  # noqa: F401
        import torch
    except ImportError as e:
        raise ExportError(
            f"export needs torch, diffusers and safetensors ({e}): pip install 'sora_jax[torch]'"
        ) from None
    return torch


def check_out(out: str | Path) -> Path:
    """``out`` as a Path; ExportError when it exists and is not an empty folder."""
    out = Path(out)
    if out.exists() and (not out.is_dir() or any(out.iterdir())):
        raise ExportError(f"--out {out} already exists and is not an empty folder: choose a new one")
    return out


@contextlib.contextmanager
def staged_folder(final: str | Path) -> Iterator[Path]:
    """Yields a hidden folder beside ``final`` to write into; when the block ends it becomes ``final`` (absent
    or an empty folder, checked by the caller), when it raises it is removed: a folder appears whole or not at
    all (``video_io.atomic_target`` is the same for one file)."""
    final = Path(final)
    final.parent.mkdir(parents=True, exist_ok=True)
    tmp = (final.parent / f".{final.name}.tmp-{os.getpid()}").absolute()
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    try:
        yield tmp
        if final.exists():
            final.rmdir()  # empty (checked first)
        os.rename(tmp, final)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise


def check_dtype(dtype: str) -> str:
    if dtype not in DTYPES:
        raise ExportError(f"--dtype {dtype!r} unknown: use one of {', '.join(DTYPES)}")
    return dtype


# ------------------------------------------------------------------------------------------ safetensors


def write_weights(
    folder: Path, tensors: dict[str, np.ndarray], dtype: str, max_shard_bytes: int
) -> list[str]:
    """``tensors`` (float32 numpy) as ``dtype`` safetensors in ``folder``: one file, or shards
    ``diffusion_pytorch_model-0000i-of-0000n.safetensors`` + the index when larger than ``max_shard_bytes``.
    Returns the files written."""
    torch = _torch()
    from safetensors.torch import save_file

    tdtype = getattr(torch, dtype)
    itemsize = 2 if dtype == "bfloat16" else 4
    shards, current, size = [], {}, 0
    for name in sorted(tensors):
        nbytes = tensors[name].size * itemsize
        if current and size + nbytes > max_shard_bytes:
            shards.append(current)
            current, size = {}, 0
        current[name] = tensors[name]
        size += nbytes
    shards.append(current)
    folder.mkdir(parents=True, exist_ok=True)
    files, weight_map = [], {}
    for i, shard in enumerate(shards):
        fname = (
            WEIGHTS
            if len(shards) == 1
            else WEIGHTS.replace(".safetensors", f"-{i + 1:05d}-of-{len(shards):05d}.safetensors")
        )
        data = {k: torch.from_numpy(np.array(v, np.float32)).to(tdtype) for k, v in shard.items()}
        save_file(data, str(folder / fname), metadata={"format": "pt"})
        files.append(fname)
        weight_map |= dict.fromkeys(shard, fname)
    if len(shards) > 1:
        total = sum(v.size * itemsize for v in tensors.values())
        index = {"metadata": {"total_size": total}, "weight_map": weight_map}
        (folder / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True))
        files.append(INDEX)
    return files


def weight_files(folder: Path) -> list[str]:
    """The safetensors files of a component folder: the shards its index lists, or the single file;
    ExportError when there is neither."""
    if (folder / INDEX).is_file():
        return sorted(set(json.loads((folder / INDEX).read_text())["weight_map"].values()))
    if (folder / WEIGHTS).is_file():
        return [WEIGHTS]
    raise ExportError(f"{folder} holds no {WEIGHTS} (nor its index)")


def read_weights(folder: Path) -> dict[str, np.ndarray]:
    """A component folder's tensors (single file or sharded with an index) as float32 numpy; ExportError when
    none is there."""
    torch = _torch()
    from safetensors.torch import load_file

    out = {}
    for fname in weight_files(folder):
        path = folder / fname
        if not path.is_file():
            raise ExportError(f"{path} is missing (listed in {folder / INDEX})")
        out |= {k: v.to(torch.float32).numpy() for k, v in load_file(str(path)).items()}
    return out


def verify_weights(folder: Path, expected: dict[str, np.ndarray], dtype: str) -> None:
    """Reads the component back: same names, shapes and dtype as written, every value finite."""
    torch = _torch()
    from safetensors import safe_open

    seen = {}
    for fname in weight_files(folder):
        with safe_open(str(folder / fname), framework="pt") as f:
            for k in f.keys():  # noqa: SIM118 (a safe_open handle is not iterable)
                seen[k] = f.get_tensor(k)
    if set(seen) != set(expected):
        diff = sorted(set(seen) ^ set(expected))
        raise RuntimeError(
            f"export check: {folder.name} tensor names differ from the model's, e.g. {diff[:3]}"
        )
    for k, t in seen.items():
        if tuple(t.shape) != tuple(expected[k].shape) or t.dtype != getattr(torch, dtype):
            raise RuntimeError(f"export check: {folder.name}/{k} is {t.dtype} {list(t.shape)}")
        if not bool(torch.isfinite(t).all()):
            raise UserError(f"the checkpoint's {folder.name} parameter {k} holds NaN/Inf: nothing exported")


def _component(
    folder: Path, class_name: str, config: dict, tensors: dict | None, dtype: str, shard: int
) -> None:
    import diffusers

    folder.mkdir(parents=True)
    cfg = {"_class_name": class_name, "_diffusers_version": diffusers.__version__, **config}
    (folder / "config.json").write_text(json.dumps(cfg, indent=2))
    write_weights(folder, tensors or {}, dtype, shard)
    verify_weights(folder, tensors or {}, dtype)


# ------------------------------------------------------------------------------------------- the parts


def scheduler_for(cfg) -> tuple[str, dict]:
    """(diffusers scheduler class name, its config) matching the trained objective and sampler."""
    from diffusers import DDIMScheduler, DDPMScheduler, FlowMatchEulerDiscreteScheduler

    d = cfg.diffusion
    if Objective(d.objective) is Objective.RECTIFIED_FLOW:
        sched = FlowMatchEulerDiscreteScheduler(num_train_timesteps=1000, shift=float(d.flow_shift))
    else:
        n = int(d.num_timesteps)
        kw = dict(
            num_train_timesteps=n,
            beta_schedule="linear"
            if ScheduleKind(d.schedule) is ScheduleKind.LINEAR
            else "squaredcos_cap_v2",
            beta_start=1e-4 * 1000 / n,
            beta_end=0.02 * 1000 / n,
            prediction_type="epsilon" if Prediction(d.prediction) is Prediction.EPS else "v_prediction",
            clip_sample=True,
            clip_sample_range=1.0,
        )
        if d.sampler == "ddim":
            sched = DDIMScheduler(**kw, set_alpha_to_one=True, steps_offset=0)
        else:
            sched = DDPMScheduler(**kw, variance_type="fixed_small")
    return type(sched).__name__, dict(sched.config)


def _text_parts(tmp: Path, cfg, flat_text: dict, dtype: str, shard: int) -> dict:
    """text_encoder/ + tokenizer/ (+ text_adapter/); returns their model_index.json entries."""
    from sora_jax import factory

    kind = TextEncoderKind(cfg.text.encoder)
    if kind is TextEncoderKind.TRAINABLE:
        tcfg = configs.text_encoder_config(factory.text_config(cfg))
        _component(tmp / "text_encoder", "SoraTextEncoder", tcfg, names.to_torch(flat_text), dtype, shard)
        (tmp / "tokenizer").mkdir()
        tok = {"tokenizer_class": "HashWordTokenizer", "vocab_size": cfg.text.vocab_size}
        (tmp / "tokenizer" / "tokenizer_config.json").write_text(
            json.dumps(tok | {"model_max_length": cfg.text.max_length}, indent=1)
        )
        return {
            "text_encoder": ["sora_torch", "SoraTextEncoder"],
            "tokenizer": [None, None],  # HashWordTokenizer: read by SoraPipeline.from_pretrained
            "text_adapter": [None, None],
        }
    if kind is TextEncoderKind.MINILM:
        from sora_jax.text.minilm import default_model_dir

        src = Path(cfg.text.path) if cfg.text.get("path") else default_model_dir()
    else:
        src = Path(cfg.text.path)
    hf = json.loads((src / "config.json").read_text())
    model_type = hf.get("model_type")
    if model_type not in _HF_CLASSES:
        raise ExportError(f"{src}/config.json: model_type {model_type!r} has no transformers class here")
    enc_cls, tok_cls = _HF_CLASSES[model_type]
    (tmp / "text_encoder").mkdir()
    (tmp / "tokenizer").mkdir()
    weights = [p for p in src.iterdir() if p.name.endswith((".safetensors", ".safetensors.index.json"))]
    if not weights:
        raise ExportError(f"{src} has no safetensors weights to export (convert its .bin files first)")
    for p in [src / "config.json", *weights]:
        shutil.copy2(p, tmp / "text_encoder" / p.name)
    tok_files = (
        "vocab.txt",
        "tokenizer.json",
        "tokenizer_config.json",
        "special_tokens_map.json",
        "spiece.model",
    )
    for name in tok_files:
        if (src / name).is_file():
            shutil.copy2(src / name, tmp / "tokenizer" / name)
    tok_cfg_path = tmp / "tokenizer" / "tokenizer_config.json"
    tok_cfg = json.loads(tok_cfg_path.read_text()) if tok_cfg_path.is_file() else {}
    tok_cfg_path.write_text(json.dumps(tok_cfg | {"model_max_length": cfg.text.max_length}, indent=1))
    in_dim, width = flat_text[("proj", "kernel")].shape
    _component(
        tmp / "text_adapter",
        "SoraTextAdapter",
        {"in_dim": in_dim, "width": width},
        names.to_torch(flat_text),
        dtype,
        shard,
    )
    return {
        "text_encoder": ["transformers", enc_cls],
        "tokenizer": ["transformers", tok_cls],
        "text_adapter": ["sora_torch", "SoraTextAdapter"],
    }


def _flat(state) -> dict:
    return {
        tuple(p): np.asarray(v.get_value() if hasattr(v, "get_value") else v, np.float32)
        for p, v in state.flat_state()
    }


def _data_iter_state(workdir: Path, step: int) -> dict[str, str]:
    """The grain iterator files of checkpoint ``step`` ({name: text}), so an import resumes the data there."""
    from sora_jax.train.checkpoint import checkpoint_dir

    folder = checkpoint_dir(workdir.absolute()) / str(step) / "data_iter"
    if not folder.is_dir():
        return {}
    return {p.name: p.read_text() for p in sorted(folder.iterdir()) if p.is_file() and p.suffix == ".json"}


def write_datacard(folder: Path, workdir: str | Path, step: int, cfg) -> None:
    """``folder/datacard.json``: the card checkpoint ``step`` was trained on (``datacard.write_export_card``)."""
    from sora_jax.data import datacard
    from sora_jax.data.pipeline import dataset_dir
    from sora_jax.train.checkpoint import read_datacard

    datacard.write_export_card(folder, read_datacard(workdir, step), dataset_dir(cfg, workdir))


# ------------------------------------------------------------------------------------------------ export


def _watermark_json(cfg, workdir, step: int) -> dict:
    """``config.safety.watermark`` and the payload's ids (``safety.stamp``: the same as ``sora-jax sample``'s
    videos of this checkpoint carry) for the folder's ``generate.py``."""
    from sora_jax.safety.stamp import model_id, run_id, safety_section

    wm = safety_section(cfg, "watermark")
    return {
        "enabled": bool(wm["enabled"]),
        "strength": float(wm["strength"]),
        "model_id": model_id(cfg),
        "run_id": run_id(workdir, step),
    }


def export(
    workdir: str | Path,
    out: str | Path,
    *,
    dtype: str = "float32",
    raw_params: bool = False,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> dict:
    """Writes the latest checkpoint of the text-to-video ``workdir`` to ``out`` (see the module docstring);
    ``raw_params`` exports the trained parameters instead of their EMA. Returns a summary (seconds, files,
    parameters). Bad input raises ``UserError`` before anything is written."""
    t0 = time.perf_counter()
    check_dtype(dtype)
    out = check_out(out)
    _torch()
    from sora_jax import config as config_lib
    from sora_jax import factory, loading

    step, saved = loading.saved_config(workdir)
    if config_lib.task(saved) is not Task.T2V:
        raise ExportError(f"{workdir} holds a VAE: export the text-to-video workdir that uses it")
    if config_lib.model_arch(saved) is not ModelArch.DIT:
        raise ExportError(f"{workdir} holds a Wan model: export it with --format diffusers")
    if saved.text.get("clauses", False):
        raise ExportError(
            f"{workdir} encodes prompts clause by clause (text.clauses), which the PyTorch pipeline does not: "
            "not exported"
        )
    if saved.text.get("sentences", 0):
        raise ExportError(
            f"{workdir} adds sentence rows to the text (text.sentences), which the PyTorch pipeline does not: "
            "not exported"
        )
    if saved.model.get("text_attention", "cross") != "cross":
        raise ExportError(
            f"{workdir} reads the text by joint attention (model.text_attention), which the PyTorch transformer "
            "does not have: not exported"
        )
    cfg, step, _, params = loading.restore(workdir, use_ema=not raw_params)
    flat = _flat(params)
    # the REPA projector (config.repa) serves the training loss only: the exported model has none
    dit = {p[1:]: a for p, a in flat.items() if p[0] == "dit" and p[1] != "repa_proj"}
    text = {p[1:]: a for p, a in flat.items() if p[0] == "text_encoder"}

    with staged_folder(out) as tmp:
        _component(
            tmp / "transformer",
            "SoraTransformer3DModel",
            configs.transformer_config(factory.model_config(cfg)),
            names.to_torch(dit),
            dtype,
            max_shard_bytes,
        )
        kind = AutoencoderKind(cfg.autoencoder.kind)
        if kind is AutoencoderKind.VAE:
            codec = loading.load_autoencoder(cfg)
            vcfg = configs.vae_config(codec.cfg, codec.shift, codec.scale)
            _component(
                tmp / "vae", "SoraVideoVAE", vcfg, names.to_torch(_flat(codec.params)), dtype, max_shard_bytes
            )
            vae_entry = ["sora_torch", "SoraVideoVAE"]
        else:
            _component(tmp / "vae", "SoraPixelCodec", {"kind": kind.value}, {}, dtype, max_shard_bytes)
            vae_entry = ["sora_torch", "SoraPixelCodec"]
        sched_name, sched_cfg = scheduler_for(cfg)
        (tmp / "scheduler").mkdir()
        (tmp / "scheduler" / "scheduler_config.json").write_text(
            json.dumps(sched_cfg | {"_class_name": sched_name}, indent=2)
        )
        text_entries = _text_parts(tmp, cfg, text, dtype, max_shard_bytes)
        shutil.copytree(
            Path(__file__).parent / "sora_torch",
            tmp / "sora_torch",
            ignore=shutil.ignore_patterns("__pycache__"),
        )
        shutil.copy2(
            Path(__file__).parents[1] / "safety" / "watermark.py", tmp / "sora_torch" / "watermark.py"
        )
        (tmp / "generate.py").write_text(_GENERATE)
        (tmp / WATERMARK).write_text(json.dumps(_watermark_json(cfg, workdir, step), indent=1))
        # the exported pipeline embeds prompts with the MiniLM it carries, else the installed package's
        source = "text_encoder" if TextEncoderKind(cfg.text.encoder) is TextEncoderKind.MINILM else "package"
        policy = config_lib.policy_json(cfg) | {"embedding_source": source}
        (tmp / POLICY).write_text(json.dumps(policy, indent=1))
        index = _model_index(cfg, vae_entry, sched_name, text_entries)
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2))
        meta = {
            "step": int(step),
            "parameters": "params" if raw_params else "ema",
            "dtype": dtype,
            "config": json.loads(cfg.to_json_best_effort()),
            "data_iter": _data_iter_state(Path(workdir), step),
        }
        if kind is AutoencoderKind.VAE:
            _, vae_saved = loading.saved_config(cfg.autoencoder.path, cfg.autoencoder.vae_step)
            meta["vae_config"] = json.loads(vae_saved.to_json_best_effort())
        (tmp / META).write_text(json.dumps(meta, indent=1))
        write_datacard(tmp, workdir, step, cfg)
    files = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file())
    n_params = sum(a.size for a in flat.values())
    return {
        "out": str(out),
        "step": int(step),
        "parameters": n_params,
        "files": len(files),
        "seconds": time.perf_counter() - t0,
    }


def _model_index(cfg, vae_entry, sched_name, text_entries) -> dict:
    import diffusers

    d = cfg.diffusion
    flow = Objective(d.objective) is Objective.RECTIFIED_FLOW
    return {
        "_class_name": "SoraPipeline",
        "_diffusers_version": diffusers.__version__,
        "transformer": ["sora_torch", "SoraTransformer3DModel"],
        "vae": vae_entry,
        "scheduler": ["diffusers", sched_name],
        **text_entries,
        "prediction_type": d.flow_prediction if flow else d.prediction,
        "sampler": d.sampler,
        "num_frames": cfg.data.num_frames,
        "height": cfg.data.height,
        "width": cfg.data.width,
        "fps": float(cfg.data.fps),
        "max_text_length": cfg.text.max_length,
        "default_num_inference_steps": d.sample_steps,
        "default_guidance_scale": float(d.cfg_scale),
        "sample_jitter": float(d.get("sample_jitter", 0.0)),
    }


_GENERATE = '''"""Generate a video with this exported sora_jax model, in plain PyTorch + diffusers:

    python generate.py --prompt "a 3 moves left" --seed 0 --out a.mp4
"""

import os
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, HERE)

from sora_torch.generate import main  # noqa: E402

if __name__ == "__main__":
    sys.exit(main(folder=HERE))
'''
