"""``sora-jax import``: an exported folder (``sora-jax export``, possibly fine-tuned in PyTorch since) back into
a JAX workdir that ``sora-jax train`` continues and ``sora-jax sample`` samples.

The workdir gets one orbax checkpoint at the exported step: the folder's parameters as ``params`` and
``ema``, a fresh optimizer state, the run's rng, the config the model was trained with, and the data
iterator's position when the export recorded it. A latent model whose VAE workdir is not on this machine gets
the folder's VAE as ``<workdir>/vae``. float32 folders come back bitwise. Bad input (not an exported folder, a
missing or mis-shaped tensor, named) raises ``UserError`` and writes nothing: the workdir is built beside its
final name and renamed when complete.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np

from sora_jax.errors import UserError
from sora_jax.export import names
from sora_jax.export.writer import META, ExportError, read_weights, staged_folder


def _read_meta(src: Path) -> dict:
    for name in ("model_index.json", META):
        if not (src / name).is_file():
            raise ExportError(f"--from {src} is not a folder written by `sora-jax export` (no {name})")
    try:
        return json.loads((src / META).read_text())
    except ValueError as e:
        raise ExportError(f"{src / META} is not valid JSON ({e})") from None


def _params_from(src: Path, component: str, abstract, prefix: str):
    """The JAX parameters under ``prefix`` of ``abstract`` (an nnx.State of ShapeDtypeStructs) read from
    ``src/component`` as {path: float array}."""
    shapes = {tuple(p)[1:]: v.get_value().shape for p, v in abstract.flat_state() if tuple(p)[0] == prefix}
    if not (src / component).is_dir():
        raise ExportError(f"{src} has no {component}/ folder")
    tensors = read_weights(src / component)
    flat = names.from_torch(tensors, shapes, where=f"{src / component}")
    for path, a in flat.items():
        if not np.isfinite(a).all():
            raise ExportError(f"{src / component}: tensor for {'/'.join(map(str, path))} holds NaN/Inf")
    return {(prefix, *p): a for p, a in flat.items()}


def _state(abstract, flat: dict):
    """An nnx.State like ``abstract`` holding the arrays of ``flat`` (cast to each parameter's dtype)."""
    import jax.numpy as jnp
    from flax import nnx

    pairs = []
    for p, var in abstract.flat_state():
        want = var.get_value()
        pairs.append((p, var.replace(jnp.asarray(flat[tuple(p)], want.dtype))))
    return nnx.State.from_flat_path(pairs)


def _save(workdir: Path, step: int, state, cfg, data_iter: dict[str, str]) -> None:
    from sora_jax.train import checkpoint

    mgr = checkpoint.manager(workdir)
    try:
        checkpoint.save(mgr, step, state, cfg, None, force=True)
        mgr.wait_until_finished()
    finally:
        mgr.close()
    if data_iter:
        folder = checkpoint.checkpoint_dir(workdir) / str(step) / "data_iter"
        folder.mkdir()
        for name, text in data_iter.items():
            (folder / name).write_text(text)


def _vae_workdir(src: Path, meta: dict, cfg, tmp: Path, final: Path) -> None:
    """The folder's VAE as a VAE workdir at ``tmp/vae`` (to live at ``final/vae``): checkpoint + latent stats."""
    import jax
    import ml_collections

    from sora_jax import factory, loading
    from sora_jax.models.vae import LATENT_STATS

    if "vae_config" not in meta:
        raise ExportError(f"{src / META} lacks the VAE's config: re-export with this version")
    vcfg = ml_collections.ConfigDict(meta["vae_config"])
    abstract = factory.abstract_state(vcfg, loading.single_device_mesh()).params
    shapes = {tuple(p): v.get_value().shape for p, v in abstract.flat_state()}
    tensors = read_weights(src / "vae")
    flat = names.from_torch(tensors, shapes, where=f"{src / 'vae'}")
    params = _state(abstract, flat)
    step = int(cfg.autoencoder.vae_step)
    state = {"params": params, "ema": jax.tree.map(lambda a: a.copy(), params)}
    _save(tmp / "vae", step, state, vcfg, {})
    stats = {"shift": float(cfg.autoencoder.shift), "scale": float(cfg.autoencoder.scale), "step": step}
    (tmp / "vae" / LATENT_STATS).write_text(json.dumps(stats))
    cfg.autoencoder.path = str(final / "vae")


def import_folder(src: str | Path, workdir: str | Path) -> dict:
    """Writes ``workdir`` from the exported folder ``src``; returns a summary (step, parameters, path)."""
    import jax
    import ml_collections

    from sora_jax import config as config_lib
    from sora_jax import factory, loading
    from sora_jax.choices import AutoencoderKind, TextEncoderKind
    from sora_jax.train.state import make_optimizer

    src, workdir = Path(src), Path(workdir)
    if not src.is_dir():
        raise ExportError(f"--from {src} is not a folder")
    meta = _read_meta(src)
    if workdir.exists() and (not workdir.is_dir() or any(workdir.iterdir())):
        raise ExportError(f"--workdir {workdir} already exists and is not empty: choose a new one")
    cfg = ml_collections.ConfigDict(config_lib.upgrade(meta["config"]))
    config_lib.validate(cfg)
    abstract = factory.abstract_state(cfg, loading.single_device_mesh()).params
    text_component = "text_encoder" if cfg.text.encoder == TextEncoderKind.TRAINABLE else "text_adapter"
    flat = _params_from(src, "transformer", abstract, "dit") | _params_from(
        src, text_component, abstract, "text_encoder"
    )
    params = _state(abstract, flat)

    workdir = workdir.absolute()
    with staged_folder(workdir) as tmp:
        if cfg.autoencoder.kind == AutoencoderKind.VAE and not Path(cfg.autoencoder.get("path", "")).is_dir():
            _vae_workdir(src, meta, cfg, tmp, workdir)
        tx = make_optimizer(cfg)
        state = {
            "step": jax.numpy.asarray(int(meta["step"]), jax.numpy.int32),
            "params": params,
            "opt_state": tx.init(params),
            "ema": jax.tree.map(lambda a: a.copy(), params),
            "rng": jax.random.key_data(jax.random.key(cfg.seed)),
        }
        _save(tmp, int(meta["step"]), state, cfg, meta.get("data_iter", {}))
    n = sum(a.size for a in flat.values())
    return {"workdir": str(workdir), "step": int(meta["step"]), "parameters": n}


__all__ = ["UserError", "import_folder"]
