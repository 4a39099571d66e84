"""Diffusers Wan 2.1 folders in and out: ``sora-jax import-diffusers`` and ``sora-jax export --format diffusers``.

    import_diffusers("Wan2.1-T2V-1.3B-Diffusers", "runs/wan", dtype="bfloat16")   # -> a workdir
    export_diffusers("runs/wan", "wan_out")            # -> WanPipeline.from_pretrained("wan_out") loads it

A diffusers Wan folder (what ``WanPipeline.save_pretrained`` writes)::

    model_index.json   transformer/ (WanTransformer3DModel)   vae/ (AutoencoderKLWan)
    text_encoder/ (UMT5EncoderModel)   tokenizer/   scheduler/ (UniPC / FlowMatchEuler, flow_shift)
    datacard.json (export only, for a checkpoint trained here: the training data's card, sora_jax.data.datacard)

The workdir (``sora_jax.loading`` reads it as any other): ``checkpoints/0/`` an orbax checkpoint whose state is
``{"params": ...}`` (the transformer, under ``transformer``; no optimizer state or EMA, so ``sample.use_ema``
is off) and whose config is ``workdir_config`` filled from the folder (``model.arch = wan``); ``vae/`` a copy
of the folder's VAE (127M parameters at Wan's size, float32). The frozen UMT5 encoder, its tokenizer and the scheduler stay in the source folder, which the config records
(``text.path``, ``text.tokenizer_path``, ``model.source``). The transformer is read shard by shard into its
parameters (``wan_convert.from_diffusers``) and written tensor by tensor: the model is never twice in host
memory. Both directions build their output beside its final name and rename it when complete; bad input
raises ``UserError`` (one line) before anything is written.

Sampling convention (``sora_jax/models/wan_t2v.py``): Wan predicts the velocity noise - x0 at model time
1000 t, which is our rectified flow's (``diffusion.flow_prediction = v``); the shift is the scheduler's
``flow_shift``; the sampler the scheduler's (UniPC or Euler). Fine-tuning starts from such a workdir through
``config.model.init_from`` (``configs/wan_t2v_1_3b.py``: fresh optimizer state, EMA = the imported weights).
Not yet: frame conditioning (Wan 2.1 T2V takes one time per sample), the digits evaluators.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from pathlib import Path

import ml_collections

from sora_jax.errors import UserError
from sora_jax.export.writer import staged_folder

PIPELINE = "WanPipeline"
COMPONENTS = ("transformer", "vae", "text_encoder", "tokenizer", "scheduler")
WEIGHTS = "diffusion_pytorch_model.safetensors"
INDEX = WEIGHTS + ".index.json"
MAX_SHARD_BYTES = 5 * 2**30  # diffusers' WanTransformer3DModel releases use 5 GB shards
DTYPES = ("float32", "bfloat16")


class DiffusersIOError(UserError):
    """Bad input to import-diffusers / export --format diffusers (one line)."""


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as e:
        raise DiffusersIOError(f"{path} cannot be read as JSON ({type(e).__name__}: {e})") from None


def check_wan_folder(src: str | Path) -> tuple[Path, dict]:
    """(folder, model_index) of a diffusers Wan 2.1 text-to-video folder; DiffusersIOError naming what is
    missing or different."""
    src = Path(src)
    if not src.is_dir():
        raise DiffusersIOError(f"--from {src} is not a folder (want a diffusers Wan 2.1 pipeline folder)")
    if not (src / "model_index.json").is_file():
        raise DiffusersIOError(f"--from {src} has no model_index.json: not a diffusers pipeline folder")
    index = _read_json(src / "model_index.json")
    if index.get("_class_name") != PIPELINE:
        raise DiffusersIOError(
            f"--from {src} holds a {index.get('_class_name')!r}, not a {PIPELINE} (Wan 2.1 text-to-video)"
        )
    for name in COMPONENTS:
        if not (src / name).is_dir():
            raise DiffusersIOError(
                f"--from {src} has no {name}/ folder (a {PIPELINE} needs {', '.join(COMPONENTS)})"
            )
    if index.get("transformer_2") not in (None, [None, None]):
        raise DiffusersIOError(f"--from {src} is a two-expert Wan 2.2 pipeline; only Wan 2.1 is supported")
    for name in ("transformer", "vae", "text_encoder"):
        if not (src / name / "config.json").is_file():
            raise DiffusersIOError(f"--from {src}: {name}/ has no config.json")
    return src, index


def _scheduler(src: Path) -> tuple[str, float]:
    """Our sampler and the flow shift for ``scheduler/scheduler_config.json``: UniPC (``flow_shift``) ->
    "unipc" (``sora_jax/diffusion/unipc.py``, the scheduler's own time grid), FlowMatchEuler (``shift``) ->
    "euler"."""
    conf = _read_json(src / "scheduler" / "scheduler_config.json")
    if conf.get("prediction_type", "flow_prediction") != "flow_prediction":
        raise DiffusersIOError(
            f"{src}/scheduler: prediction_type {conf['prediction_type']!r}; Wan's is 'flow_prediction'"
        )
    sampler = "unipc" if conf.get("_class_name", "") == "UniPCMultistepScheduler" else "euler"
    return sampler, float(conf.get("flow_shift", conf.get("shift", 1.0)))


def workdir_config() -> ml_collections.ConfigDict:
    """The config of a Wan 2.1 workdir before the folder fills it in (``wan_config``): WanPipeline's defaults
    (81 frames of 480 x 832 at 16 fps, 50 steps, guidance 5, 512 text tokens), the 1.3B release's sizes, the
    other groups (data, optim, train, mesh, eval) as ``configs/quickstart.py`` has them."""
    from configs import quickstart

    c = quickstart.get_config()
    c.data.num_frames, c.data.height, c.data.width, c.data.fps = 81, 480, 832, 16
    c.data.speed = ()
    c.data.batch_size = 1

    c.model = ml_collections.ConfigDict()
    c.model.arch = "wan"
    c.model.variant = "wan2.1-t2v"  # a label; the sizes are model.wan
    # WanConfig fields (sora_jax/models/wan.py), from transformer/config.json; the 1.3B release's here
    c.model.wan = ml_collections.ConfigDict(
        dict(width=1536, depth=30, num_heads=12, ffn_dim=8960, text_dim=4096, in_channels=16,
             out_channels=16, freq_dim=256, eps=1e-6, cross_attn_norm=True, rope_theta=10000.0)
    )  # fmt: skip
    c.model.patch_size = (1, 2, 2)
    c.model.dtype = "bfloat16"  # compute
    c.model.param_dtype = "bfloat16"  # storage (the time MLP, modulation tables and affine norm stay float32)
    c.model.remat = "full"
    c.model.seq_parallel = "none"
    c.model.attention_impl = "xla"
    c.model.source = ""  # the diffusers folder it was imported from (export copies text/tokenizer/scheduler)

    c.autoencoder = ml_collections.ConfigDict()
    c.autoencoder.kind = "wan_vae"
    c.autoencoder.path = ""  # a diffusers AutoencoderKLWan folder: the workdir's copy, <workdir>/vae
    c.autoencoder.wan_vae = ml_collections.ConfigDict()  # WanVAEConfig fields, from vae/config.json

    c.text.encoder = "t5"  # frozen UMT5-XXL
    c.text.path = ""  # text_encoder/ of the source folder
    c.text.tokenizer_path = ""  # tokenizer/ of the source folder
    c.text.dtype = "bfloat16"
    c.text.max_length = 512  # WanPipeline's max_sequence_length: features zero-padded to it
    c.text.width = 4096

    c.diffusion.flow_timestep_sampling = "uniform"
    c.diffusion.flow_shift = 3.0  # scheduler_config.json flow_shift (3 for 480p, 5 for 720p)
    c.diffusion.flow_prediction = "v"  # Wan predicts the velocity noise - x0
    c.diffusion.sampler = "unipc"  # the folder's scheduler: UniPCMultistepScheduler, or "euler"
    c.diffusion.time_grid = "diffusers"  # and its time grid: sampling reproduces WanPipeline's
    c.diffusion.sample_steps = 50
    c.diffusion.cfg_scale = 5.0
    c.diffusion.sample_jitter = 0.0  # the quickstart's patch-grid jitter off: WanPipeline's sampling

    c.conditioning.probs = ml_collections.ConfigDict({"none": 1.0})  # Wan 2.1 T2V: one time per sample
    c.conditioning.max_frames = 1
    c.optim.lr = 1e-5
    c.optim.ema_decay = 0.0
    c.sample.prompts = ("a cat walks on the grass, realistic",)
    c.sample.use_ema = False  # the imported checkpoint holds the release's weights as params alone
    return c


def wan_config(
    src: Path, *, dtype: str, num_frames: int | None, height: int | None, width: int | None, vae_path: str
):
    """``workdir_config`` filled from the folder ``src``: the transformer's and VAE's sizes, the text
    encoder's folders, the scheduler's shift; ``dtype`` computes and stores the transformer and UMT5."""
    import dataclasses

    from sora_jax import config as config_lib
    from sora_jax.models import wan_convert, wan_vae_convert

    try:
        wcfg = wan_convert.config_from_diffusers(_read_json(src / "transformer" / "config.json"))
        vcfg = wan_vae_convert.config_from_diffusers(_read_json(src / "vae" / "config.json"))
    except ValueError as e:
        raise DiffusersIOError(f"--from {src}: {str(e).splitlines()[0]}") from None
    text = _read_json(src / "text_encoder" / "config.json")
    if text.get("model_type") not in ("umt5", "t5", "mt5"):
        raise DiffusersIOError(f"--from {src}: text_encoder/ is a {text.get('model_type')!r}, not UMT5")
    if int(text.get("d_model", -1)) != wcfg.text_dim:
        raise DiffusersIOError(
            f"--from {src}: text_encoder d_model {text.get('d_model')} != transformer text_dim {wcfg.text_dim}"
        )
    cfg = workdir_config()
    cfg.model.wan = ml_collections.ConfigDict({k: getattr(wcfg, k) for k in config_lib.WAN_MODEL_KEYS})
    cfg.model.patch_size = wcfg.patch_size
    cfg.model.dtype = cfg.model.param_dtype = cfg.text.dtype = dtype
    cfg.model.source = str(src.absolute())
    cfg.autoencoder.path = vae_path
    cfg.autoencoder.wan_vae = ml_collections.ConfigDict(dataclasses.asdict(vcfg))
    cfg.text.path = str((src / "text_encoder").absolute())
    cfg.text.tokenizer_path = str((src / "tokenizer").absolute())
    cfg.text.width = wcfg.text_dim
    cfg.diffusion.sampler, cfg.diffusion.flow_shift = _scheduler(src)
    for key, value in (("num_frames", num_frames), ("height", height), ("width", width)):
        if value is not None:
            cfg.data[key] = int(value)
    config_lib.validate(cfg)
    from sora_jax import factory

    try:
        factory.tokens_per_clip(cfg, cfg.data.num_frames, cfg.data.height, cfg.data.width)
    except ValueError as e:
        raise DiffusersIOError(f"--num_frames/--height/--width: {str(e).splitlines()[0]}") from None
    return cfg


def _check_new(path: Path, flag: str) -> Path:
    if path.exists() and (not path.is_dir() or any(path.iterdir())):
        raise DiffusersIOError(f"{flag} {path} already exists and is not empty: choose a new one")
    return path


def import_diffusers(
    src: str | Path,
    workdir: str | Path,
    *,
    dtype: str = "float32",
    num_frames: int | None = None,
    height: int | None = None,
    width: int | None = None,
) -> dict:
    """``sora-jax import-diffusers``: the diffusers Wan 2.1 folder ``src`` as the new ``workdir`` (see the
    module docstring). ``dtype`` (float32 | bfloat16) computes and stores the transformer and UMT5;
    ``num_frames`` / ``height`` / ``width``: the video ``sora-jax sample`` makes (default WanPipeline's
    81 x 480 x 832). Returns a summary: workdir, step, parameters, seconds."""
    import jax
    from flax import nnx

    from sora_jax import factory, loading
    from sora_jax.models import wan_convert
    from sora_jax.train import checkpoint

    t0 = time.perf_counter()
    if dtype not in DTYPES:
        raise DiffusersIOError(f"--dtype {dtype!r} unknown: use one of {', '.join(DTYPES)}")
    src, _ = check_wan_folder(src)
    workdir = _check_new(Path(workdir), "--workdir").absolute()
    cfg = wan_config(
        src, dtype=dtype, num_frames=num_frames, height=height, width=width, vae_path=str(workdir / "vae")
    )
    abstract = factory.abstract_state(cfg, loading.single_device_mesh())
    try:
        transformer = wan_convert.from_diffusers(src / "transformer", dtype=dtype, param_dtype=dtype)
    except (ValueError, FileNotFoundError) as e:
        raise DiffusersIOError(f"--from {src}/transformer: {str(e).splitlines()[0]}") from None
    model = nnx.eval_shape(lambda: factory.make_model(cfg))
    model.transformer = transformer
    params = nnx.state(model, nnx.Param)
    have = jax.tree.map(lambda a: (a.shape, a.dtype), params)
    want = jax.tree.map(lambda a: (a.shape, a.dtype), abstract.params)
    if have != want:  # a bug: the config the importer wrote builds another model
        raise RuntimeError("import-diffusers: the converted transformer differs from the config's model")

    with staged_folder(workdir) as tmp:
        shutil.copytree(src / "vae", tmp / "vae")
        mgr = checkpoint.manager(tmp)
        try:
            checkpoint.save(mgr, 0, {"params": params}, cfg, None, force=True)
            mgr.wait_until_finished()
        finally:
            mgr.close()
    n = sum(int(a.size) for a in jax.tree.leaves(params))
    return {"workdir": str(workdir), "step": 0, "parameters": n, "seconds": time.perf_counter() - t0}


# ------------------------------------------------------------------------------------------------ export


def _write_streamed(folder: Path, tensors, dtype: str, max_shard_bytes: int) -> list[str]:
    """Safetensors of the (name, numpy array) stream ``tensors`` in ``folder``, cast to ``dtype``:
    ``diffusion_pytorch_model.safetensors``, or shards ``-0000i-of-0000n`` + the index when larger
    than ``max_shard_bytes``, as diffusers' ``save_pretrained`` names them. One shard in memory at a time."""
    import numpy as np
    import torch
    from safetensors.torch import save_file

    def to_torch(a: np.ndarray) -> torch.Tensor:
        if str(a.dtype) == "bfloat16":  # numpy has no bfloat16: its bits, viewed as torch's
            t = torch.from_numpy(np.array(a).view(np.uint16)).view(torch.bfloat16)
        else:
            t = torch.from_numpy(np.array(a))  # a writable copy of one tensor
        return t.to(getattr(torch, dtype))

    folder.mkdir(parents=True, exist_ok=True)
    parts, shard, size, total, weight_map = [], {}, 0, 0, {}

    def flush():
        name = f"part-{len(parts):05d}.safetensors"
        save_file(shard, str(folder / name), metadata={"format": "pt"})
        parts.append((name, list(shard)))

    for name, a in tensors:
        t = to_torch(a)
        nbytes = t.numel() * t.element_size()
        if shard and size + nbytes > max_shard_bytes:
            flush()
            shard, size = {}, 0
        shard[name], size, total = t, size + nbytes, total + nbytes
    flush()
    if len(parts) == 1:
        os.rename(folder / parts[0][0], folder / WEIGHTS)
        return [WEIGHTS]
    files = []
    for i, (tmp_name, keys) in enumerate(parts):
        fname = WEIGHTS.replace(".safetensors", f"-{i + 1:05d}-of-{len(parts):05d}.safetensors")
        os.rename(folder / tmp_name, folder / fname)
        weight_map |= dict.fromkeys(keys, fname)
        files.append(fname)
    index = {"metadata": {"total_size": total}, "weight_map": dict(sorted(weight_map.items()))}
    (folder / INDEX).write_text(json.dumps(index, indent=2) + "\n")
    return [*files, INDEX]


def export_diffusers(
    workdir: str | Path,
    out: str | Path,
    *,
    dtype: str | None = None,
    max_shard_bytes: int = MAX_SHARD_BYTES,
) -> dict:
    """``sora-jax export --format diffusers``: the latest checkpoint of the Wan workdir ``workdir`` as a
    folder ``WanPipeline.from_pretrained(out)`` loads: transformer/ (diffusers' keys, ``dtype``: float32 |
    bfloat16, default the checkpoint's), vae/ (float32), and copies of the source folder's text_encoder/,
    tokenizer/, scheduler/ and model_index.json. Returns a summary (out, step, parameters, files, seconds)."""
    import diffusers

    from sora_jax import loading
    from sora_jax.choices import ModelArch
    from sora_jax.config import model_arch
    from sora_jax.models import wan_convert, wan_vae_convert

    t0 = time.perf_counter()
    if dtype is not None and dtype not in DTYPES:
        raise DiffusersIOError(f"--dtype {dtype!r} unknown: use one of {', '.join(DTYPES)}")
    out = _check_new(Path(out), "--out")
    _, saved = loading.saved_config(workdir)
    if model_arch(saved) is not ModelArch.WAN:
        raise DiffusersIOError(
            f"--format diffusers writes Wan workdirs (sora-jax import-diffusers); {workdir} holds a "
            f"{model_arch(saved).value!r} model: use --format torch"
        )
    source = Path(saved.model.source)
    for name in ("text_encoder", "tokenizer", "scheduler", "model_index.json"):
        if not (source / name).exists():
            raise DiffusersIOError(
                f"the source folder {source} the workdir was imported from lacks {name}: export copies it"
            )
    cfg, step, abstract, params = loading.restore(workdir)
    dtype = dtype or cfg.model.param_dtype  # as diffusers saves a model of that dtype: every tensor in it
    from flax import nnx

    transformer = nnx.merge(abstract.graphdef, params).transformer
    vae = loading.load_autoencoder(cfg)

    with staged_folder(out) as tmp:
        files = _write_streamed(
            tmp / "transformer", wan_convert.iter_diffusers_tensors(transformer), dtype, max_shard_bytes
        )
        tconf = wan_convert.config_to_diffusers(transformer.cfg) | {
            "_diffusers_version": diffusers.__version__
        }
        (tmp / "transformer" / "config.json").write_text(json.dumps(tconf, indent=2) + "\n")
        wan_vae_convert.save_diffusers(nnx.merge(vae.graphdef, vae.params), tmp / "vae", "float32")
        for name in ("text_encoder", "tokenizer", "scheduler"):
            shutil.copytree(source / name, tmp / name)
        index = _read_json(source / "model_index.json")
        index |= {
            "transformer": ["diffusers", "WanTransformer3DModel"],
            "vae": ["diffusers", "AutoencoderKLWan"],
        }
        (tmp / "model_index.json").write_text(json.dumps(index, indent=2) + "\n")
        from sora_jax.export.writer import write_datacard

        write_datacard(tmp, workdir, step, cfg)
    import jax

    n = sum(int(a.size) for a in jax.tree.leaves(params))
    count = sum(1 for p in out.rglob("*") if p.is_file())
    return {
        "out": str(out),
        "step": int(step),
        "parameters": n,
        "files": count,
        "transformer_files": files,
        "seconds": time.perf_counter() - t0,
    }
