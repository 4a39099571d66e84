"""Config loading and the typed schema: enums for every choice, validated once at start.

Configs are python files with ``get_config(arg) -> ml_collections.ConfigDict`` (``path.py:arg``). Overrides
come as ``--config.key.sub=value`` strings and go through ConfigDict's type checks; a locked config rejects
unknown keys. Every problem raises ``ConfigError`` with one line that names the key.
"""

from __future__ import annotations

import ast
import enum
import importlib.util
import sys
from collections.abc import Sequence
from pathlib import Path

import ml_collections

from sora_jax.choices import (
    DIT_VARIANTS,
    SAMPLERS,
    VAE_VARIANTS,
    AttentionImpl,
    AutoencoderKind,
    DataContent,
    DType,
    FlowPrediction,
    FlowTimeGrid,
    ModelArch,
    Objective,
    Optimizer,
    PosEmbed,
    Prediction,
    Remat,
    Sampler,
    ScheduleKind,
    SeqParallel,
    Task,
    TextAttention,
    TextEncoderKind,
    TimestepSampling,
    check_probs,
    vae_downsample,
)
from sora_jax.config_safety import (  # noqa: F401  (re-exported: config.policy_json, ...)
    POLICY_BLOCKLIST,
    POLICY_CONCEPTS,
    POLICY_EMBEDDING,
    POLICY_MAX_TOKENS,
    POLICY_REGEXES,
    POLICY_SENTENCE_SPLIT,
    POLICY_STRIDE,
    POLICY_THRESHOLD,
    POLICY_WINDOW,
    _add_safety_defaults,
    _validate_marks,
    _validate_policy,
    policy_defaults,
    policy_json,
    safety_defaults,
)
from sora_jax.errors import ConfigError, UserError  # noqa: F401  (ConfigError: sora_jax.config's)

_ENUM_KEYS: dict[str, type[enum.StrEnum]] = {
    "task": Task,
    "diffusion.objective": Objective,
    "diffusion.prediction": Prediction,
    "diffusion.schedule": ScheduleKind,
    "diffusion.sampler": Sampler,
    "autoencoder.kind": AutoencoderKind,
    "data.content": DataContent,
    "text.encoder": TextEncoderKind,
    "model.arch": ModelArch,
    "model.dtype": DType,
    "model.remat": Remat,
    "model.seq_parallel": SeqParallel,
    "model.pos_embed": PosEmbed,
    "model.text_attention": TextAttention,
    "model.attention_impl": AttentionImpl,
    "diffusion.flow_timestep_sampling": TimestepSampling,
    "diffusion.flow_prediction": FlowPrediction,
    "optim.optimizer": Optimizer,
}


def task(cfg: ml_collections.ConfigDict) -> Task:
    """What a config trains: the text-to-video DiT (``Task.T2V``, the default) or the video VAE."""
    return Task(cfg.get("task", Task.T2V.value))


def _get(cfg: ml_collections.ConfigDict, dotted: str):
    node = cfg
    for part in dotted.split("."):
        node = node[part]
    return node


def load_config(spec: str, overrides: Sequence[str] = ()) -> ml_collections.ConfigDict:
    """Loads ``path.py[:arg]``, applies ``key=value`` overrides, validates. Raises ConfigError."""
    path_str, _, arg = spec.partition(":")
    path = Path(path_str)
    if not path.is_file():
        raise ConfigError(f"config file not found: {path_str}")
    module_name = f"_sora_jax_config_{abs(hash(str(path.resolve())))}"
    try:
        module_spec = importlib.util.spec_from_file_location(module_name, path)
        module = importlib.util.module_from_spec(module_spec)
        sys.modules[module_name] = module
        module_spec.loader.exec_module(module)
    except Exception as e:  # a syntax error in a user's config file is still one line
        raise ConfigError(f"config file {path_str} failed to load: {type(e).__name__}: {e}") from e
    if not hasattr(module, "get_config"):
        raise ConfigError(f"config file {path_str} defines no get_config(arg)")
    try:
        cfg = module.get_config(arg) if arg else module.get_config()
    except ValueError as e:
        raise ConfigError(str(e)) from e
    cfg = ml_collections.ConfigDict(cfg)
    _add_safety_defaults(cfg)
    _add_lora_defaults(cfg)
    cfg.lock()
    apply_overrides(cfg, overrides)
    validate(cfg)
    return cfg


def _parse_value(text: str, current):
    if isinstance(current, str):
        return text
    try:
        value = ast.literal_eval(text)
    except (ValueError, SyntaxError):
        value = text
    if isinstance(current, float) and isinstance(value, int) and not isinstance(value, bool):
        value = float(value)
    if isinstance(current, tuple) and isinstance(value, list):
        value = tuple(value)
    return value


def apply_overrides(cfg: ml_collections.ConfigDict, overrides: Sequence[str]) -> None:
    """Applies ``a.b=value`` overrides in place (type-checked by ConfigDict)."""
    for item in overrides:
        key, sep, text = item.partition("=")
        key = key.removeprefix("--").removeprefix("config.")
        if not sep:
            raise ConfigError(f"override {item!r} is not of the form --config.key=value")
        parent_key, _, leaf = key.rpartition(".")
        try:
            parent = _get(cfg, parent_key) if parent_key else cfg
            current = parent[leaf]
        except (KeyError, AttributeError, TypeError):
            raise ConfigError(f"unknown config key: {key}") from None
        try:
            parent[leaf] = _parse_value(text, current)
        except (TypeError, ValueError, KeyError) as e:
            raise ConfigError(f"config key {key}: cannot set {text!r}: {e}") from None


def _validate_vae(cfg: ml_collections.ConfigDict) -> None:
    if cfg.vae.variant not in VAE_VARIANTS:
        raise ConfigError(f"config.vae.variant = {cfg.vae.variant!r} is not one of {sorted(VAE_VARIANTS)}")
    f, s = vae_downsample(cfg.vae.variant)
    if (cfg.data.num_frames - 1) % f:
        raise ConfigError(
            f"config.data.num_frames = {cfg.data.num_frames}: the causal VAE wants 1 + {f}k frames"
        )
    if cfg.data.height % s or cfg.data.width % s:
        raise ConfigError(f"config.data.height/width must be divisible by the VAE's spatial factor {s}")


def model_arch(cfg: ml_collections.ConfigDict) -> ModelArch:
    """The text-to-video network of a config: ``config.model.arch`` (absent in DiT configs: the DiT)."""
    return ModelArch(cfg.model.get("arch", ModelArch.DIT.value))


# the WanConfig fields a Wan config holds in config.model.wan (patch_size is config.model.patch_size)
WAN_MODEL_KEYS = (
    "width", "depth", "num_heads", "ffn_dim", "text_dim", "in_channels", "out_channels", "freq_dim", "eps",
    "cross_attn_norm", "rope_theta",
)  # fmt: skip


def _validate_wan(cfg: ml_collections.ConfigDict) -> None:
    """A Wan 2.1 config (``sora-jax import-diffusers`` writes them): its sizes, the Wan VAE, UMT5 text, flow."""
    wan = cfg.model.get("wan")
    missing = [k for k in WAN_MODEL_KEYS if wan is None or k not in wan]
    if missing:
        raise ConfigError(
            f"config.model.arch = 'wan' needs config.model.wan.{missing[0]} (and {missing[1:]})"
        )
    wan_vae = AutoencoderKind(cfg.autoencoder.kind) is AutoencoderKind.WAN_VAE and cfg.autoencoder.get(
        "wan_vae"
    )
    if not wan_vae:
        raise ConfigError(
            "config.model.arch = 'wan' needs config.autoencoder.kind = 'wan_vae' and autoencoder.wan_vae"
        )
    if TextEncoderKind(cfg.text.encoder) is not TextEncoderKind.T5:
        raise ConfigError("config.model.arch = 'wan' needs config.text.encoder = 't5' (its UMT5 folder)")
    flow = Objective(cfg.diffusion.objective) is Objective.RECTIFIED_FLOW
    if not flow or cfg.diffusion.flow_prediction != "v":
        raise ConfigError(
            "config.model.arch = 'wan': Wan 2.1 predicts the flow velocity: diffusion.objective = "
            "'rectified_flow' with diffusion.flow_prediction = 'v'"
        )


# config.lora (sora_jax/models/lora.py): adapters on the attention q/k/v/out and MLP projections, by regexes
# over "/"-joined parameter paths; off unless a config switches it on (configs/finetune_lora.py)
LORA_TARGETS = (
    r"^(dit|transformer)/blocks/(attn|cross_attn|attn1|attn2)/w[qkvo]$",
    r"^(dit|transformer)/blocks/(mlp|ffn)/fc[12]/kernel$",
)


# config.lora.base_dtype: how the frozen base is stored (sora_jax/models/quant.py); "" = the model's param_dtype
LORA_BASE_DTYPES = ("", "bfloat16", "int8", "float8_e4m3fn")


def lora_defaults() -> ml_collections.ConfigDict:
    """``config.lora``: ``enabled`` (False), ``rank``, ``alpha`` (the update is scaled by alpha / rank),
    ``targets`` (regexes, ``re.search`` over paths such as ``dit/blocks/attn/wq``), ``dora`` (DoRA magnitudes),
    ``init_from`` (the trained workdir whose parameters are the frozen base), ``base_dtype`` (the frozen base's
    storage: ``LORA_BASE_DTYPES``; int8 / fp8 with a per-output-channel scale, computed in ``model.dtype``)."""
    return ml_collections.ConfigDict(
        {
            "enabled": False,
            "rank": 8,
            "alpha": 8.0,
            "targets": LORA_TARGETS,
            "dora": False,
            "init_from": "",
            "base_dtype": "",
        }
    )


def _add_lora_defaults(config: dict | ml_collections.ConfigDict) -> None:
    """Adds ``config.lora`` (off) to a config file's or a saved config's dict that lacks it, and the keys a
    ``config.lora`` written before them lacks (``base_dtype``)."""
    d = lora_defaults()
    if config.get("lora") is None:
        config["lora"] = d if isinstance(config, ml_collections.ConfigDict) else d.to_dict()
        return
    for key in d:
        if key not in config["lora"]:
            config["lora"][key] = d[key]


def _validate_lora(cfg: ml_collections.ConfigDict) -> None:
    """``config.lora``: types and ranges, the targets compile, a known ``base_dtype``, LoRA only on a
    text-to-video model, its base from ``lora.init_from`` (not ``model.init_from``)."""
    import re

    lo = cfg.lora
    for key in ("enabled", "dora"):
        if not isinstance(lo.get(key), bool):
            raise ConfigError(f"config.lora.{key} must be True or False, got {lo.get(key)!r}")
    r = lo.get("rank")
    if isinstance(r, bool) or not isinstance(r, int) or r < 1:
        raise ConfigError(f"config.lora.rank must be a positive integer, got {r!r}")
    a = lo.get("alpha")
    if isinstance(a, bool) or not isinstance(a, (int, float)) or a <= 0:
        raise ConfigError(f"config.lora.alpha must be a positive number (scale = alpha / rank), got {a!r}")
    t = lo.get("targets")
    if isinstance(t, str) or not isinstance(t, (tuple, list)) or not t:
        raise ConfigError(f"config.lora.targets must be a non-empty tuple of regexes, got {t!r}")
    for pattern in t:
        try:
            re.compile(pattern)
        except (re.error, TypeError) as e:
            raise ConfigError(f"config.lora.targets: {pattern!r} is not a regular expression ({e})") from None
    if not isinstance(lo.get("init_from"), str):
        raise ConfigError(f"config.lora.init_from must be a workdir path or '', got {lo.get('init_from')!r}")
    if lo.get("base_dtype", "") not in LORA_BASE_DTYPES:
        raise ConfigError(
            f"config.lora.base_dtype = {lo.get('base_dtype')!r}: use one of "
            f"{', '.join(repr(v) for v in LORA_BASE_DTYPES)} ('' keeps model.param_dtype)"
        )
    if lo.enabled and task(cfg) is not Task.T2V:
        raise ConfigError(
            f"config.lora.enabled: LoRA adapts text-to-video models, not task {task(cfg).value!r}"
        )
    if lo.enabled and cfg.model.get("init_from", ""):
        raise ConfigError(
            "config.lora.enabled: name the base workdir in config.lora.init_from, not config.model.init_from"
        )


# config.eval (evaluation during training, sora_jax/eval/in_training.py) of a config saved before the group
# existed: off
EVAL_DEFAULTS = {
    "every_steps": 0,
    "metrics": "adherence",
    "num_videos": 32,
    "prompts": "test",
    "seed": 0,
    "grid_videos": 8,
    "best_metric": "",
}


def upgrade(config: dict) -> dict:
    """A config dict saved by an older version, in today's spelling (``model.remat`` was a bool; no
    ``eval`` group; no ``safety`` sections)."""
    model = config.get("model", {})
    if isinstance(model.get("remat"), bool):
        model["remat"] = "full" if model["remat"] else "none"
    if config.get("task", "t2v") == "t2v" and "conditioning" not in config:  # before frame conditioning
        config["conditioning"] = {"probs": {"none": 1.0}, "max_frames": 1}
    if "eval" not in config:
        config["eval"] = dict(EVAL_DEFAULTS)
    _add_safety_defaults(config)  # before the safeguards: on, with today's defaults
    _add_lora_defaults(config)  # before LoRA: off
    return config


def eval_metric_names(cfg: ml_collections.ConfigDict) -> list[str]:
    """The names in ``config.eval.metrics`` (a comma-separated string), in order."""
    return [m.strip() for m in str(cfg.eval.metrics).split(",") if m.strip()]


def _validate_eval(cfg: ml_collections.ConfigDict) -> None:
    """``config.eval``'s values (the metric names are checked against the metrics suite when training
    starts: ``sora_jax.eval.in_training.check_config``)."""
    e = cfg.eval
    for key in ("every_steps", "num_videos", "grid_videos", "seed"):
        if not isinstance(e[key], int) or isinstance(e[key], bool):
            raise ConfigError(f"config.eval.{key} must be an integer, got {e[key]!r}")
    if e.every_steps < 0:
        raise ConfigError(f"config.eval.every_steps must be >= 0 (0: off), got {e.every_steps}")
    if e.every_steps and task(cfg) is not Task.T2V:
        raise ConfigError(
            f"config.eval.every_steps = {e.every_steps}: evaluation during training samples text-to-video "
            f"models; set it to 0 for task {task(cfg).value!r}"
        )
    names = eval_metric_names(cfg)
    if not isinstance(e.metrics, str) or not names:
        raise ConfigError(
            f"config.eval.metrics = {e.metrics!r}: give comma-separated names, e.g. 'adherence'"
        )
    if e.num_videos < 1:
        raise ConfigError(f"config.eval.num_videos must be >= 1, got {e.num_videos}")
    if not 0 <= e.grid_videos <= e.num_videos:
        raise ConfigError(
            f"config.eval.grid_videos must be in [0, eval.num_videos = {e.num_videos}], got {e.grid_videos}"
        )
    prompts = e.prompts
    if isinstance(prompts, str):
        ok = bool(prompts.strip())
    else:
        ok = isinstance(prompts, (tuple, list)) and bool(prompts)
        ok = ok and all(isinstance(p, str) and p.strip() for p in prompts)
    if not ok:
        raise ConfigError(
            f"config.eval.prompts = {prompts!r}: give a split of the dataset (e.g. 'test') or a tuple of "
            "non-empty prompts"
        )
    if e.best_metric and e.best_metric not in names:
        raise ConfigError(
            f"config.eval.best_metric = {e.best_metric!r} is not one of config.eval.metrics {names} "
            "('' keeps no best checkpoint)"
        )


# REPA's class term (config.repa.classes, sora_jax/train/repa.py): the projector's extra outputs, one per digit
# class of the bundled digit reader plus background
REPA_CLASS_CHANNELS = 11
# REPA's motion term (config.repa.motion): one projector output per shift (dy, dx) in [-r, r]^2 of a token's content
REPA_MOTION_RADIUS = 3
REPA_MOTION_CHANNELS = (2 * REPA_MOTION_RADIUS + 1) ** 2


def _validate_repa(cfg: ml_collections.ConfigDict) -> None:
    """``config.repa`` (REPA, ``sora_jax/train/repa.py``): the aligned block exists, the weight is positive."""
    r = cfg.get("repa")
    if (
        r is None
        or not r.get("layer", 0)
        or task(cfg) is not Task.T2V
        or model_arch(cfg) is not ModelArch.DIT
    ):
        return  # REPA is a term of the DiT's text-to-video loss: the VAE task and Wan leave config.repa unused
    depth = cfg.model.get("depth", 0) or DIT_VARIANTS[cfg.model.variant].depth
    if not isinstance(r.layer, int) or not 1 <= r.layer <= depth:
        raise ConfigError(f"config.repa.layer must be in [0, depth = {depth}], got {r.layer!r}")
    if (
        not isinstance(r.dim, int)
        or r.dim < 1
        or not r.weight > 0
        or not r.get("classes", 0.0) >= 0
        or not r.get("motion", 0.0) >= 0
    ):
        raise ConfigError(
            f"config.repa: dim must be a positive int, weight > 0, classes >= 0 and motion >= 0, got "
            f"{r.dim!r}, {r.weight!r}, {r.get('classes', 0.0)!r}, {r.get('motion', 0.0)!r}"
        )
    if r.get("precompute", False) and cfg.data.get("buckets"):
        raise ConfigError(
            "config.repa.precompute: targets per train clip need the clips as stored; buckets resize them "
            "(set config.repa.precompute=False or config.data.buckets='')"
        )


def validate(cfg: ml_collections.ConfigDict) -> None:
    """Checks enums, sizes and cross-field constraints once, at start."""
    for key, kind in _ENUM_KEYS.items():
        try:
            value = _get(cfg, key)
        except (KeyError, AttributeError):
            continue
        allowed = [m.value for m in kind]
        if value not in allowed:
            raise ConfigError(f"config.{key} = {value!r} is not one of {allowed}")
    objective, sampler = Objective(cfg.diffusion.objective), Sampler(cfg.diffusion.sampler)
    if sampler not in SAMPLERS[objective]:
        ok = [s.value for s in SAMPLERS[objective]]
        raise ConfigError(
            f"config.diffusion.sampler = {sampler.value!r} does not fit objective {objective.value!r}: use {ok}"
        )
    grid = cfg.diffusion.get("time_grid", "")
    if grid:
        allowed = [g.value for g in FlowTimeGrid]
        if grid not in allowed:
            raise ConfigError(f"config.diffusion.time_grid = {grid!r} is not one of {['', *allowed]}")
        if objective is not Objective.RECTIFIED_FLOW:
            raise ConfigError("config.diffusion.time_grid is for objective 'rectified_flow'; leave it ''")
        if grid == FlowTimeGrid.DIFFUSERS and sampler not in (Sampler.EULER, Sampler.UNIPC):
            raise ConfigError(
                f"config.diffusion.time_grid = 'diffusers' has no {sampler.value!r} sampler: use euler or unipc"
            )
    for key in ("data.batch_size", "data.num_frames", "data.height", "data.width", "train.num_steps"):
        if _get(cfg, key) <= 0:
            raise ConfigError(f"config.{key} must be positive, got {_get(cfg, key)}")
    if task(cfg) is Task.VAE:
        _validate_vae(cfg)
    elif model_arch(cfg) is ModelArch.WAN:
        _validate_wan(cfg)
    elif cfg.model.variant not in DIT_VARIANTS:
        raise ConfigError(f"config.model.variant = {cfg.model.variant!r} is not one of {list(DIT_VARIANTS)}")
    latent = AutoencoderKind(cfg.autoencoder.kind) in (AutoencoderKind.VAE, AutoencoderKind.WAN_VAE)
    if DataContent(cfg.data.get("content", "video")) is DataContent.LATENTS and not latent:
        raise ConfigError(
            "config.data.content = 'latents' needs config.autoencoder.kind = 'vae' (and its path)"
        )
    pt, ph, pw = cfg.model.patch_size
    # with a VAE the patch divides the latent video: checked when it is known
    for name, size, p in (
        ()
        if latent
        else (
            ("num_frames", cfg.data.num_frames, pt),
            ("height", cfg.data.height, ph),
            ("width", cfg.data.width, pw),
        )
    ):
        if size % p:
            raise ConfigError(
                f"config.data.{name} = {size} is not divisible by the patch size {p} (config.model.patch_size)"
            )
    if cfg.get("conditioning") is not None:
        try:
            check_probs(dict(cfg.conditioning.probs))
        except ValueError as e:
            raise ConfigError(f"config.conditioning.probs: {e}") from None
        if cfg.conditioning.max_frames < 1:
            raise ConfigError(
                f"config.conditioning.max_frames must be >= 1, got {cfg.conditioning.max_frames}"
            )
    if cfg.get("eval") is not None:
        _validate_eval(cfg)
    if cfg.get("safety") is not None and cfg.safety.get("policy") is not None:
        _validate_policy(cfg.safety.policy)
        _validate_marks(cfg.safety)
    if cfg.get("lora") is not None:
        _validate_lora(cfg)
    _validate_repa(cfg)
    if not 0.0 <= cfg.text.caption_dropout < 1.0:
        raise ConfigError(f"config.text.caption_dropout must be in [0, 1), got {cfg.text.caption_dropout}")
    if cfg.text.get("clauses", False) and TextEncoderKind(cfg.text.encoder) is TextEncoderKind.TRAINABLE:
        raise ConfigError("config.text.clauses needs a frozen text encoder (text.encoder = minilm or t5)")
    if cfg.text.get("sentences", 0) and TextEncoderKind(cfg.text.encoder) is TextEncoderKind.TRAINABLE:
        raise ConfigError("config.text.sentences needs a frozen text encoder (text.encoder = minilm or t5)")
    if not isinstance(cfg.text.get("sentences", 0), int) or cfg.text.get("sentences", 0) < 0:
        raise ConfigError(f"config.text.sentences must be an integer >= 0, got {cfg.text.sentences!r}")
    if not isinstance(cfg.model.get("scan_layers", True), bool):
        raise ConfigError(f"config.model.scan_layers must be True or False, got {cfg.model.scan_layers!r}")
    out_conv = cfg.model.get("out_conv", 0)
    if isinstance(out_conv, bool) or not isinstance(out_conv, int) or out_conv < 0:
        raise ConfigError(f"config.model.out_conv must be an integer >= 0 (channels), got {out_conv!r}")
    if not 0.0 <= cfg.data.get("two_digit_fraction", 0.5) <= 1.0:
        raise ConfigError(
            f"config.data.two_digit_fraction must be in [0, 1], got {cfg.data.two_digit_fraction}"
        )
    if not 0.0 <= cfg.data.get("two_digit_gap", 0.0) <= min(cfg.data.height, cfg.data.width):
        raise ConfigError(
            f"config.data.two_digit_gap must be in [0, min(height, width)] px, got {cfg.data.two_digit_gap}"
        )
    if not isinstance(cfg.data.get("two_digit_left_to_right", False), bool):
        raise ConfigError(
            f"config.data.two_digit_left_to_right must be True or False, got {cfg.data.two_digit_left_to_right!r}"
        )
    for axis in ("data", "fsdp", "tensor", "seq"):
        v = cfg.mesh[axis]
        if v == 0 or v < -1:
            raise ConfigError(f"config.mesh.{axis} must be a positive size or -1 (fill), got {v}")
        dcn = cfg.mesh.get("dcn", {}).get(axis, 1)
        if dcn < 1 or (v > 0 and v % dcn):
            raise ConfigError(
                f"config.mesh.dcn.{axis} = {dcn} must be a positive divisor of mesh.{axis} = {v}"
            )
