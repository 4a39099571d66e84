"""Loading what a workdir holds: configs, parameters and frozen VAEs from orbax checkpoints.

The one place above the models that reads checkpoints for use (the trainer resumes through
``train.checkpoint`` itself). Models stay pure: they are built from configs by ``factory``; this module puts
weights into them. Nothing here builds an optimizer or a train step:

    cfg, step, abstract, params = restore(workdir)         # the EMA parameters, onto one device
    cfg, step, abstract, params = restore(workdir, step="best")   # the best step evaluation kept
    base = lora_base(cfg, abstract_base)                   # a LoRA run's frozen base (lora.init_from)
    codec = load_vae_codec("runs/vae")                     # a trained VAE as an Autoencoder, with its weights
    cfg = resolve_autoencoder(cfg)                         # a latent config records its VAE's shape and stats
    ae = load_autoencoder(cfg)                             # the config's autoencoder, weights included
"""

from __future__ import annotations

import dataclasses
import functools
import json
from pathlib import Path

import jax
import jax.numpy as jnp
import ml_collections
from flax import nnx

from sora_jax import config as config_lib
from sora_jax import factory
from sora_jax.choices import AutoencoderKind, Task
from sora_jax.errors import UserError
from sora_jax.models import quant
from sora_jax.models.autoencoder import Autoencoder
from sora_jax.models.vae import LATENT_STATS, VAECodec
from sora_jax.models.wan_t2v import WanVAECodec
from sora_jax.models.wan_vae import WanVAEConfig
from sora_jax.parallel.mesh import make_mesh
from sora_jax.train import checkpoint


def single_device_mesh():
    """A mesh of one local device (every axis 1): where inference places parameters by default."""
    mesh_cfg = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1, "seq": 1})
    return make_mesh(mesh_cfg, jax.local_devices()[:1])


def saved_config(workdir: str | Path, step: int | str | None = None) -> tuple[int, ml_collections.ConfigDict]:
    """(step, config) of the latest (or given, or ``"best"``) checkpoint of ``workdir``: upgraded to today's
    spelling and validated."""
    step, cfg = checkpoint.restore_config(workdir, step)
    cfg = ml_collections.ConfigDict(config_lib.upgrade(cfg.to_dict()))
    config_lib.validate(cfg)
    return step, cfg


def restore(
    workdir: str | Path,
    *,
    step: int | str | None = None,
    use_ema: bool | None = None,
    mesh=None,
    with_base: bool = True,
    **diffusion_overrides,
) -> tuple[ml_collections.ConfigDict, int, factory.AbstractState, nnx.State]:
    """(config, step, abstract state, params) of the latest (or given) checkpoint in ``workdir``; ``step="best"``
    reads the best checkpoint evaluation during training kept (``checkpoints_best/``, ``best.json``).

    Reads the EMA parameters unless ``use_ema`` is False (default: the config's ``sample.use_ema``), and
    nothing else (no optimizer state), onto ``mesh`` (default: one local device) as the rules table places
    them. ``diffusion_overrides`` (``sample_steps``, ``cfg_scale``, ``sampler``) replace the config's values.
    A LoRA workdir's params are its adapters merged with the frozen base of ``lora.init_from``; with
    ``with_base=False`` its adapters alone (``nnx.LoRAParam``s; the base left out, nothing of it read).
    """
    which = step
    step, cfg = saved_config(workdir, which)
    for key, value in diffusion_overrides.items():
        if value is not None:
            cfg.diffusion[key] = value
    config_lib.validate(cfg)
    cfg = resolve_autoencoder(cfg)
    abstract = factory.abstract_state(cfg, mesh or single_device_mesh())
    use_ema = cfg.sample.use_ema if use_ema is None else use_ema
    lora = factory.lora_spec(cfg) is not None  # the checkpoint holds adapters; the base is lora.init_from's
    adapters, base = nnx.split_state(abstract.params, nnx.LoRAParam, ...) if lora else (abstract.params, None)
    step, params = checkpoint.restore_subtree(
        workdir,
        "ema" if use_ema else "params",
        adapters,
        step=which if which == checkpoint.BEST else step,
    )
    if lora and with_base:
        params = nnx.merge_state(lora_base(cfg, base), params)
    return cfg, step, abstract, params


# ------------------------------------------------------------------------------------------------ the VAE


def load_vae_codec(workdir: str | Path, *, step: int | None = None) -> VAECodec:
    """A trained VAE workdir as the ``Autoencoder`` a latent DiT works through: the EMA weights of the
    checkpoint its latent statistics were measured on (``sora-jax eval --workdir W`` writes them), and the
    statistics. ``step`` picks another checkpoint."""
    stats_path = Path(workdir) / LATENT_STATS
    if not stats_path.is_file():
        raise FileNotFoundError(
            f"{stats_path} not found: measure the VAE's latent statistics first with "
            f"`sora-jax eval --workdir {workdir}`"
        )
    stats = json.loads(stats_path.read_text())
    step = stats.get("step") if step is None else step
    return _load_vae_codec(str(workdir), step, stats["shift"], stats["scale"])


@functools.lru_cache(maxsize=4)
def _load_vae_codec(workdir: str, step: int | None, shift: float, scale: float) -> VAECodec:
    _, vcfg = saved_config(workdir, step)
    if config_lib.task(vcfg) is not Task.VAE:
        raise UserError(f"{workdir} holds a {config_lib.task(vcfg).value!r} model, not a VAE")
    _, step, _, params = restore(workdir, step=step)
    codec = factory.vae_codec(factory.vae_config(vcfg), shift, scale, step)
    return codec.with_params(jax.device_get(params))


def resolve_autoencoder(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A latent-diffusion config (``autoencoder.kind = vae``) with its VAE written in: the VAE's architecture
    (``autoencoder.vae``), latent statistics and checkpoint step, read once from ``autoencoder.path``. From
    then on shapes come from the config alone (``factory``), and a checkpoint's config names the exact VAE
    it was trained with. Other configs are returned as they are."""
    if cfg.autoencoder.kind != AutoencoderKind.VAE or cfg.autoencoder.get("vae"):
        return cfg
    if not cfg.autoencoder.get("path"):
        raise config_lib.ConfigError(
            "config.autoencoder.kind = 'vae' needs config.autoencoder.path (a VAE workdir)"
        )
    codec = load_vae_codec(cfg.autoencoder.path)
    out = ml_collections.ConfigDict(cfg.to_dict())
    out.autoencoder.vae = dataclasses.asdict(codec.cfg)
    out.autoencoder.shift, out.autoencoder.scale, out.autoencoder.vae_step = (
        codec.shift,
        codec.scale,
        codec.step,
    )
    return out


def load_autoencoder(cfg: ml_collections.ConfigDict) -> Autoencoder:
    """The config's autoencoder with its weights (a trained VAE's from ``autoencoder.path``; the pixel codecs
    have none)."""
    if cfg.autoencoder.kind == AutoencoderKind.WAN_VAE:
        return load_wan_vae(cfg.autoencoder.path, factory.wan_vae_config(cfg))
    if cfg.autoencoder.kind != AutoencoderKind.VAE:
        return factory.make_autoencoder(cfg)
    cfg = resolve_autoencoder(cfg)
    return load_vae_codec(cfg.autoencoder.path, step=cfg.autoencoder.vae_step)


@functools.lru_cache(maxsize=2)
def load_wan_vae(path: str, vcfg: WanVAEConfig) -> WanVAECodec:
    """Wan 2.1's VAE from a diffusers ``AutoencoderKLWan`` folder (a Wan workdir's ``vae/``) as the
    ``WanVAECodec`` of ``vcfg`` (the config the workdir recorded), host weights. UserError when the folder
    is gone or holds another VAE."""
    from sora_jax.models import wan_vae_convert

    if not Path(path).is_dir():
        raise UserError(f"the Wan VAE folder {path} (config.autoencoder.path) does not exist")
    model = wan_vae_convert.from_diffusers(path, vcfg.dtype, param_dtype=vcfg.param_dtype)
    if model.cfg != vcfg:
        raise UserError(
            f"the Wan VAE in {path} is not the one the config records (config.autoencoder.wan_vae)"
        )
    graphdef, params = nnx.split(model)
    return WanVAECodec(graphdef, jax.device_get(params), vcfg)


# ------------------------------------------------------------------------------ fine-tuning from a workdir

# what a fine-tune takes from its source workdir when the config leaves it empty (the frozen parts' files)
_INIT_PATHS = ("text.path", "text.tokenizer_path", "autoencoder.path", "model.source")
# what must be equal for the source's parameters to fit the config's model
_INIT_SAME = ("model.arch", "model.wan", "model.patch_size", "autoencoder.kind", "autoencoder.wan_vae")


def _dotted(cfg: ml_collections.ConfigDict, key: str):
    node = cfg
    for part in key.split("."):
        node = node.get(part) if hasattr(node, "get") else None
    return node.to_dict() if isinstance(node, ml_collections.ConfigDict) else node


def resolve_init(cfg: ml_collections.ConfigDict) -> ml_collections.ConfigDict:
    """A config with ``model.init_from`` (a workdir to fine-tune, e.g. one ``sora-jax import-diffusers``
    wrote) or, with LoRA, ``lora.init_from`` (its frozen base) with the source's file paths written in where
    it leaves them empty (``text.path``, ``text.tokenizer_path``, ``autoencoder.path``, ``model.source``).
    UserError when the source is not a workdir, is itself a LoRA run, or holds another model (the first
    differing key named). Other configs are returned as they are."""
    name, source = "config.model.init_from", cfg.model.get("init_from", "")
    lora = cfg.get("lora")
    if not source and lora is not None and lora.enabled and lora.init_from:  # a LoRA run's frozen base
        name, source = "config.lora.init_from", lora.init_from
    if not source:
        return cfg
    try:
        _, src = saved_config(source)
    except (checkpoint.CheckpointError, OSError) as e:
        raise UserError(f"{name} = {source!r}: {str(e).splitlines()[0]}") from None
    if src.get("lora") is not None and src.lora.enabled:
        raise UserError(f"{name} = {source!r} is a LoRA run; start from the workdir of its base")
    for key in _INIT_SAME:
        mine, theirs = _dotted(cfg, key), _dotted(src, key)
        if key == "autoencoder.wan_vae" and mine and theirs:  # WanVAEConfig's defaults fill what is absent
            mine, theirs = factory.wan_vae_config(cfg), factory.wan_vae_config(src)
        else:  # tuples and the lists a saved config holds compare equal
            mine, theirs = json.loads(json.dumps(mine)), json.loads(json.dumps(theirs))
        if mine != theirs:
            raise UserError(
                f"{name} = {source!r} holds another model: config.{key} is {mine!r} here, {theirs!r} there"
            )
    out = ml_collections.ConfigDict(cfg.to_dict())
    for key in _INIT_PATHS:
        group, leaf = key.split(".")
        if group in out and leaf in out[group] and not out[group][leaf] and _dotted(src, key):
            out[group][leaf] = _dotted(src, key)
    return out


def init_params(
    source: str | Path, abstract: nnx.State, *, key: str = "config.model.init_from"
) -> tuple[int, nnx.State]:
    """(step, parameters) of the latest checkpoint of the workdir ``source``: its ``params`` (the trained
    weights, not the EMA: an imported workdir has no EMA) onto the shardings and dtypes of ``abstract``
    (the train state's params, or a LoRA run's base: ``ShapeDtypeStruct``s); orbax casts a float32 source
    to bfloat16 storage and back. UserError (naming ``key``) when the shapes differ."""
    try:
        return checkpoint.restore_subtree(source, "params", abstract)
    except checkpoint.CheckpointError as e:
        raise UserError(f"{key} = {str(source)!r}: {str(e).splitlines()[0]}") from None


def lora_base(cfg: ml_collections.ConfigDict, abstract_base: nnx.State) -> nnx.State:
    """A LoRA run's frozen base (every ``nnx.Param`` but the adapters) onto ``abstract_base``'s shardings: the
    ``params`` of ``config.lora.init_from``'s latest checkpoint, or (no source) the model's initialisation
    from ``config.seed``, as training had it; stored as ``config.lora.base_dtype`` says (``quant.store_base``:
    the full-precision base passes through the device once, then only the stored one is kept)."""
    source, stored = cfg.lora.init_from, cfg.lora.get("base_dtype", "")
    shardings = lambda tree: jax.tree.map(lambda a: a.sharding, tree)  # noqa: E731
    out = shardings(quant.stored_abstract(abstract_base, stored))
    if source:  # the checkpoint holds no scales: they are computed from its kernels
        scales, plain = nnx.split_state(abstract_base, quant.is_scale, ...)
        params = init_params(source, plain, key="config.lora.init_from")[1]
        store = lambda p, s: quant.store_base(nnx.merge_state(p, s), stored)  # noqa: E731
        return jax.jit(store, out_shardings=out)(params, _placeholders(scales))

    def init() -> nnx.State:
        params = nnx.state(factory.make_module(cfg, cfg.seed), nnx.Param)
        return quant.store_base(nnx.split_state(params, nnx.LoRAParam, ...)[1], stored)

    return jax.jit(init, out_shardings=out)()


def _placeholders(abstract: nnx.State) -> nnx.State:
    """Ones of ``abstract``'s shapes (a quantized base's scales before ``quant.store_base`` computes them)."""
    return jax.tree.map(lambda a: jnp.ones(a.shape, a.dtype), abstract)
