"""Data cards: what a dataset holds by license, source and split, and what its captions say.

A card is written into the dataset folder as ``datacard.json`` (the record) and ``datacard.md`` (a page for
people) by ``sora-jax ingest`` and by the bundled moving-digits builder; ``data_pipelines/encode_latents.py``
copies its source's card into a latent dataset. The trainer records the card's ``{hash, summary}`` with every
checkpoint (``sora_jax.train.checkpoint``), ``sora-jax checkpoints`` lists them, and exports carry the card.

Fields of ``datacard.json``::

    format      "sora_jax.datacard/1"
    generator   "ingest" | "moving_digits"; params: the generator's options that decide the content
    totals      {"clips", "hours"}
    by_license  {license: {"clips", "hours", "splits": {split: clips}}}    "(unspecified)" when a row has none
    by_source   {source: {...the same...}}
    splits      {split: {"clips", "hours", "by_license": {license: {"clips", "hours"}}, "by_source": {...},
                         "captions": caption statistics}}
    captions    caption statistics over all clips: {"words": {"mean", "min", "max", "histogram": {"edges",
                "counts"}}, "vocabulary": {"size", "top": [[word, clips-weighted count], ...]}}
    labels      generator labels, when it has them (moving digits: per split the objects' digits, initial
                directions, and objects per clip)
    notes       free text (where the license comes from)
    summary     one line: clips, hours, splits, licenses, sources, captions
    hash        sha256 of the canonical JSON (sorted keys, no spaces, UTF-8) of every other field

The hash is of content alone (no paths, no dates), so the same data gives the same card and hash wherever it
is built. Statistics count clips (what the model sees): a caption cut into three clips counts three times.
"""

from __future__ import annotations

import collections
import dataclasses
import hashlib
import json
import os
import pathlib
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

from sora_jax.errors import UserError

FORMAT = "sora_jax.datacard/1"
CARD_FILE = "datacard.json"
CARD_PAGE = "datacard.md"
UNSPECIFIED = "(unspecified)"
TOP_WORDS = 20
HISTOGRAM_BINS = 10
_WORD_RE = re.compile(r"[a-z0-9]+(?:['-][a-z0-9]+)*")

__all__ = [
    "CARD_FILE",
    "SplitClips",
    "card_hash",
    "find_card",
    "make_card",
    "read_card",
    "reference",
    "write_card",
    "write_export_card",
]


@dataclasses.dataclass(frozen=True)
class SplitClips:
    """The clips of one split, one entry each: ``seconds`` float [N], ``licenses`` and ``sources`` (None:
    unspecified) and ``captions``, all of length N."""

    seconds: np.ndarray
    licenses: Sequence[str | None]
    sources: Sequence[str | None]
    captions: Sequence[str]

    def __post_init__(self):
        n = len(self.seconds)
        if not len(self.licenses) == len(self.sources) == len(self.captions) == n:
            raise ValueError(
                f"SplitClips: seconds ({n}), licenses ({len(self.licenses)}), sources ({len(self.sources)}) "
                f"and captions ({len(self.captions)}) must have one entry per clip"
            )


def words(caption: str) -> list[str]:
    """The lower-cased words of a caption (letters/digits, inner ' or - kept)."""
    return _WORD_RE.findall(caption.lower())


def _hours(seconds: float) -> float:
    return round(float(seconds) / 3600.0, 6)


def _group(keys: Sequence[str | None], seconds: np.ndarray) -> dict[str, dict[str, Any]]:
    """{key: {"clips", "hours"}} in descending clips (ties by key); None counts as UNSPECIFIED."""
    clips: collections.Counter = collections.Counter()
    secs: dict[str, float] = collections.defaultdict(float)
    for k, s in zip(keys, seconds.tolist()):
        k = UNSPECIFIED if k is None else k
        clips[k] += 1
        secs[k] += s
    order = sorted(clips, key=lambda k: (-clips[k], k))
    return {k: {"clips": clips[k], "hours": _hours(secs[k])} for k in order}


def caption_stats(captions: Sequence[str]) -> dict[str, Any]:
    """Word counts (mean/min/max and an integer-binned histogram) and vocabulary (size, top words)."""
    counts = np.asarray([len(words(c)) for c in captions], np.int64)
    vocab: collections.Counter = collections.Counter(w for c in captions for w in words(c))
    if counts.size == 0:
        return {"words": None, "vocabulary": {"size": 0, "top": []}}
    lo, hi = int(counts.min()), int(counts.max())
    width = -(-(hi - lo + 1) // HISTOGRAM_BINS)  # integer bins [edge, next edge): at most HISTOGRAM_BINS
    edges = list(range(lo, hi + width + 1, width))
    hist = np.histogram(counts, bins=np.asarray(edges) - 0.5)[0]
    top = sorted(vocab.items(), key=lambda kv: (-kv[1], kv[0]))[:TOP_WORDS]
    return {
        "words": {
            "mean": round(float(counts.mean()), 4),
            "min": lo,
            "max": hi,
            "histogram": {"edges": edges, "counts": [int(c) for c in hist]},
        },
        "vocabulary": {"size": len(vocab), "top": [[w, n] for w, n in top]},
    }


def card_hash(card: dict[str, Any]) -> str:
    """sha256 (hex) of the canonical JSON of ``card`` without its ``hash`` field."""
    body = {k: v for k, v in card.items() if k != "hash"}
    text = json.dumps(body, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def _share(groups: dict[str, dict[str, Any]], total: int, most: int = 3) -> str:
    parts = [f"{k} {100.0 * v['clips'] / total:.0f}%" for k, v in list(groups.items())[:most]]
    if len(groups) > most:
        parts.append(f"+{len(groups) - most} more")
    return ", ".join(parts)


def _summary(card: dict[str, Any]) -> str:
    t = card["totals"]
    splits = ", ".join(f"{k} {v['clips']}" for k, v in card["splits"].items())
    line = f"{card['generator']}: {t['clips']} clips, {t['hours']:.3g} h ({splits})"
    if t["clips"]:
        line += f"; license {_share(card['by_license'], t['clips'])}"
        n = len(card["by_source"])
        line += f"; {n} source{'s' if n != 1 else ''}"
    w = card["captions"]["words"]
    if w is not None:
        line += (
            f"; captions {w['min']}-{w['max']} words (mean {w['mean']:.1f}), "
            f"{card['captions']['vocabulary']['size']}-word vocabulary"
        )
    return line


def make_card(
    generator: str,
    splits: dict[str, SplitClips],
    *,
    params: dict[str, Any] | None = None,
    labels: dict[str, Any] | None = None,
    notes: str = "",
) -> dict[str, Any]:
    """The card of a dataset whose clips are ``splits`` (see the module docstring), summary and hash set."""
    all_seconds = np.concatenate(
        [np.asarray(s.seconds, np.float64) for s in splits.values()] or [np.zeros(0)]
    )
    all_lic = [x for s in splits.values() for x in s.licenses]
    all_src = [x for s in splits.values() for x in s.sources]
    per_split = {}
    for split, s in splits.items():
        secs = np.asarray(s.seconds, np.float64)
        per_split[split] = {
            "clips": len(secs),
            "hours": _hours(secs.sum()),
            "by_license": _group(s.licenses, secs),
            "by_source": _group(s.sources, secs),
            "captions": caption_stats(s.captions),
        }
    by = {"by_license": _group(all_lic, all_seconds), "by_source": _group(all_src, all_seconds)}
    for name, groups in by.items():
        for k, v in groups.items():
            v["splits"] = {split: p[name][k]["clips"] for split, p in per_split.items() if k in p[name]}
    card: dict[str, Any] = {
        "format": FORMAT,
        "generator": generator,
        "params": params or {},
        "totals": {"clips": len(all_seconds), "hours": _hours(all_seconds.sum())},
        "by_license": by["by_license"],
        "by_source": by["by_source"],
        "splits": per_split,
        "captions": caption_stats([c for s in splits.values() for c in s.captions]),
    }
    if labels is not None:
        card["labels"] = labels
    card["notes"] = notes
    card["summary"] = _summary(card)
    card["hash"] = card_hash(card)
    return card


def reference(card: dict[str, Any]) -> dict[str, str]:
    """What checkpoints and exports carry of a card: {"hash", "summary"}."""
    return {"hash": card["hash"], "summary": card["summary"]}


# ----------------------------------------------------------------------------------------------------------
# Files


def _write_atomic(path: pathlib.Path, text: str) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    tmp.write_text(text, encoding="utf-8")
    os.replace(tmp, path)


def to_markdown(card: dict[str, Any]) -> str:
    """A short page for people: the summary, clips and hours per license / source / split, captions."""

    def table(title: str, groups: dict[str, dict[str, Any]]) -> list[str]:
        rows = [f"| {title} | clips | hours |", "|---|---:|---:|"]
        rows += [f"| {k} | {v['clips']} | {v['hours']:.4g} |" for k, v in groups.items()]
        return [*rows, ""]

    lines = [f"# Data card ({card['generator']})", "", card["summary"], ""]
    lines += table("license", card["by_license"]) + table("source", card["by_source"])
    lines += table("split", card["splits"])
    w, v = card["captions"]["words"], card["captions"]["vocabulary"]
    if w is not None:
        lines += [
            f"Captions: {w['min']}-{w['max']} words, mean {w['mean']:.2f}; vocabulary {v['size']} words; top: "
            + ", ".join(f"{word} ({n})" for word, n in v["top"][:10]),
            "",
        ]
    for split, lab in (card.get("labels") or {}).items():
        counts = "; ".join(f"{k} " + ", ".join(f"{a}: {b}" for a, b in d.items()) for k, d in lab.items())
        lines.append(f"Labels ({split}): {counts}")
    if card.get("labels"):
        lines.append("")
    if card.get("notes"):
        lines += [card["notes"], ""]
    lines += [f"sha256 of datacard.json's content: `{card['hash']}`", ""]
    return "\n".join(lines)


def write_card(folder: str | os.PathLike, card: dict[str, Any]) -> pathlib.Path:
    """Writes ``datacard.json`` and ``datacard.md`` into ``folder`` (each atomically); returns the json's
    path."""
    folder = pathlib.Path(folder)
    _write_atomic(folder / CARD_PAGE, to_markdown(card))
    path = folder / CARD_FILE
    _write_atomic(path, json.dumps(card, indent=1, ensure_ascii=False) + "\n")
    return path


def read_card(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The card in ``folder``, or None when it has none. UserError when the file is unreadable or its hash
    does not match its content (edited by hand: rebuild the dataset's card)."""
    path = pathlib.Path(folder) / CARD_FILE
    if not path.is_file():
        return None
    try:
        card = json.loads(path.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(
            f"{path} is not a readable data card ({e}); delete it and rebuild the dataset"
        ) from None
    if not isinstance(card, dict) or card.get("format") != FORMAT or card.get("hash") != card_hash(card):
        raise UserError(
            f"{path} is not an intact {FORMAT} card (its hash does not match its content); delete it and "
            "rebuild the dataset (rerun sora-jax ingest, or remove the moving-digits folder)"
        )
    return card


def find_card(folder: str | os.PathLike) -> dict[str, Any] | None:
    """The card of dataset ``folder``: its own, else (a latent dataset, metadata ``source``) its source's;
    None when there is none (or no such folder)."""
    folder = pathlib.Path(folder).absolute()
    seen: set[pathlib.Path] = set()
    while folder not in seen:
        seen.add(folder)
        card = read_card(folder)
        if card is not None:
            return card
        try:
            meta = json.loads((folder / "metadata.json").read_text())
        except (OSError, json.JSONDecodeError):
            return None
        source = meta.get("source") if isinstance(meta, dict) else None
        if not isinstance(source, str) or not source:
            return None
        folder = pathlib.Path(source).absolute()
    return None


def write_export_card(
    out: str | os.PathLike, ref: dict[str, str] | None, dataset: str | os.PathLike | None
) -> dict[str, Any] | None:
    """Writes ``out/datacard.json`` for an export whose checkpoint carries ``ref`` ({hash, summary}): the full
    card of ``dataset`` when it still has that hash, else ``ref`` itself. Nothing when ``ref`` is None (a
    checkpoint made before data cards). Returns what it wrote."""
    if ref is None:
        return None
    try:
        card = find_card(dataset) if dataset is not None else None
    except UserError:
        card = None  # a damaged card in the dataset: the checkpoint's reference still stands
    written = card if card is not None and card.get("hash") == ref.get("hash") else dict(ref)
    path = pathlib.Path(out) / CARD_FILE
    path.write_text(json.dumps(written, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    return written
