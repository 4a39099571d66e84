"""Prompt adherence on moving digits: compare what the digit reader sees with what the prompt asked for.

``score(readings, intended)`` gives, over a batch of videos:
  digit_accuracy      fraction of videos whose set of read digits equals the prompt's set;
  direction_accuracy  fraction of intended objects whose digit is read with the intended direction;
  both_accuracy       fraction of videos whose full {(digit, direction)} set equals the prompt's;
  count_accuracy      fraction of videos with the intended number of digits;
  count, num_objects  how many videos / intended objects were scored;
  chance_*            what guessing achieves, for reference: knowing how many digits a prompt names, a
                      uniform guess of the digit set (1 / C(10, n)), of one direction (1/8), of the full set
                      (1 / (C(10, n) * 8^n)), averaged over the videos.
``evaluate_prompts(videos, prompts)`` reads the videos, parses the prompts and returns (metrics, per-video
rows); ``write_report`` writes both as JSON plus a short markdown table, atomically.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sora_jax.eval.digit_reader import DIRECTIONS, DigitReader, read_videos

__all__ = ["Confusion", "adherence_confusion", "evaluate_prompts", "score", "write_report"]

Reading = Sequence[tuple[int, "str | int"]]


def _direction_id(direction: str | int) -> int:
    if isinstance(direction, str):
        if direction not in DIRECTIONS:
            raise ValueError(f"unknown direction {direction!r}; expected one of {DIRECTIONS}")
        return DIRECTIONS.index(direction)
    return int(direction)


def _pairs(objects: Reading) -> set[tuple[int, int]]:
    return {(int(d), _direction_id(r)) for d, r in objects}


def score(readings: Sequence[Reading], intended: Sequence[Reading], num_digits: int = 10) -> dict:
    """Adherence metrics (see the module docstring) for per-video readings against per-video intentions.

    readings: per video [(digit, direction name or id), ...] (what ``read_videos`` returns).
    intended: per video [(digit, direction id or name), ...] (what ``parse_prompt`` returns).
    """
    if len(readings) != len(intended):
        raise ValueError(f"got {len(readings)} readings for {len(intended)} intended prompts")
    n = len(intended)
    digits_ok = both_ok = count_ok = objects = objects_ok = 0
    chance_digit = chance_both = 0.0
    for read, want in zip(readings, intended):
        got, need = _pairs(read), _pairs(want)
        got_dirs: dict[int, set[int]] = {}
        for d, r in got:
            got_dirs.setdefault(d, set()).add(r)
        digits_ok += {d for d, _ in got} == {d for d, _ in need}
        both_ok += got == need
        count_ok += len(got_dirs) == len({d for d, _ in need})
        objects += len(need)
        objects_ok += sum(r in got_dirs.get(d, ()) for d, r in need)
        k = len({d for d, _ in need})
        combos = math.comb(num_digits, k) if k <= num_digits else 1
        chance_digit += 1.0 / combos
        chance_both += 1.0 / (combos * len(DIRECTIONS) ** len(need))
    frac = lambda a, b: float(a) / b if b else float("nan")
    return {
        "digit_accuracy": frac(digits_ok, n),
        "direction_accuracy": frac(objects_ok, objects),
        "both_accuracy": frac(both_ok, n),
        "count_accuracy": frac(count_ok, n),
        "count": n,
        "num_objects": objects,
        "chance_digit_accuracy": frac(chance_digit, n),
        "chance_direction_accuracy": 1.0 / len(DIRECTIONS),
        "chance_both_accuracy": frac(chance_both, n),
    }


def _named(objects: Reading) -> list[list]:
    return [[int(d), DIRECTIONS[_direction_id(r)]] for d, r in sorted(_pairs(objects))]


def adherence_applies(prompts: Sequence[str]) -> bool:
    """Whether every prompt names at least one digit and its direction (what the digit reader can check)."""
    from sora_jax.data.moving_digits import parse_prompt

    return all(parse_prompt(p) for p in prompts)


def check_digit_prompts(prompts: Sequence[str]) -> None:
    """A one-line UserError when some prompt names no digit with a direction (adherence cannot score it)."""
    from sora_jax.data.moving_digits import parse_prompt
    from sora_jax.errors import UserError

    bad = [p for p in prompts if not parse_prompt(p)]
    if bad:
        raise UserError(
            f"adherence reads moving digits: {len(bad)} of {len(prompts)} prompts name no digit and direction "
            f"(e.g. {bad[0][:60]!r}); score these videos with --metrics fvd,psnr"
        )


def evaluate_prompts(
    videos: np.ndarray, prompts: Sequence[str], reader: DigitReader | None = None
) -> tuple[dict, list[dict]]:
    """Reads uint8 [B, T, H, W, 3] videos and scores them against their prompts (``parse_prompt``).

    Returns (metrics of ``score``, per-video rows {prompt, intended, read, digits_ok, both_ok} with
    directions by name), the two arguments of ``write_report``.
    """
    from sora_jax.data.moving_digits import parse_prompt

    if len(videos) != len(prompts):
        raise ValueError(f"got {len(videos)} videos for {len(prompts)} prompts")
    intended = [parse_prompt(p) for p in prompts]
    readings = read_videos(videos, reader)
    rows = [
        {
            "prompt": prompt,
            "intended": _named(want),
            "read": _named(read),
            "digits_ok": {d for d, _ in want} == {d for d, _ in read},
            "both_ok": _pairs(want) == _pairs(read),
        }
        for prompt, want, read in zip(prompts, intended, readings)
    ]
    return score(readings, intended), rows


def _write_atomic(path: Path, text: str) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(text)
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def _fmt(v) -> str:
    return f"{v:.3f}" if isinstance(v, float) else str(v)


def write_report(path: str | os.PathLike, metrics: dict, per_video: Sequence[dict]) -> tuple[Path, Path]:
    """Writes ``{"metrics": ..., "per_video": [...]}`` to ``path`` (JSON) and a markdown summary beside it
    (same name, ``.md``); both atomically. Returns (json path, markdown path)."""
    path = Path(path)
    md_path = path.with_suffix(".md") if path.suffix != ".md" else path.with_suffix(".md.md")
    _write_atomic(path, json.dumps({"metrics": metrics, "per_video": list(per_video)}, indent=2, default=str))
    lines = ["# Prompt adherence", "", "| metric | value |", "|---|---|"]
    lines += [f"| {k} | {_fmt(v)} |" for k, v in metrics.items() if not isinstance(v, (list, dict))]
    if per_video:
        keys = list(per_video[0].keys())
        lines += ["", "| " + " | ".join(keys) + " |", "|" + "---|" * len(keys)]
        for row in per_video:
            cells = [str(row.get(k, "")).replace("|", "\\|") for k in keys]
            lines.append("| " + " | ".join(cells) + " |")
    _write_atomic(md_path, "\n".join(lines) + "\n")
    return path, md_path


@dataclasses.dataclass(frozen=True)
class Confusion:
    """Confusion matrices of the digit reader against the prompts (``adherence_confusion``).

    ``digits`` int ``[10, 11]``: rows the intended digit, columns the digit read in its place, the last column
    ``"none"`` (nothing read in its place). ``directions`` int ``[8, 8]``: rows the intended direction,
    columns the direction read for that digit, over intended objects whose digit was read. ``extra_digits``:
    digits read beyond the prompt's (no row to count them in); ``unread_objects``: intended objects whose
    digit was not read (in ``digits``' "none" column or read as another digit; not in ``directions``).
    """

    digits: np.ndarray
    directions: np.ndarray
    extra_digits: int
    unread_objects: int
    digit_labels: tuple[str, ...] = tuple(str(d) for d in range(10)) + ("none",)
    direction_labels: tuple[str, ...] = DIRECTIONS


def adherence_confusion(rows: Sequence[dict]) -> Confusion:
    """Digit and direction confusion matrices from ``evaluate_prompts``' per-video rows (``intended`` and
    ``read``: lists of [digit, direction name]).

    Per video, an intended digit that is read counts on the diagonal; the intended digits that are not read
    are paired, in increasing order, with the read digits the prompt did not name (a 3 read as an 8), and
    the rest count as "none". An intended object whose digit is read counts at (intended direction, read
    direction): the intended one when the reader saw the digit move that way, else the first it saw."""
    digits = np.zeros((10, 11), np.int64)
    directions = np.zeros((len(DIRECTIONS), len(DIRECTIONS)), np.int64)
    extra = unread = 0
    for row in rows:
        want = [(int(d), DIRECTIONS.index(r)) for d, r in row["intended"]]
        read: dict[int, set[int]] = {}
        for d, r in row["read"]:
            read.setdefault(int(d), set()).add(DIRECTIONS.index(r))
        wanted = {d for d, _ in want}
        missed = sorted(wanted - set(read))
        others = sorted(set(read) - wanted)
        for d in wanted & set(read):
            digits[d, d] += 1
        for i, d in enumerate(missed):
            digits[d, others[i] if i < len(others) else 10] += 1
        extra += max(0, len(others) - len(missed))
        for d, r in want:
            if d not in read:
                unread += 1
                continue
            directions[r, r if r in read[d] else min(read[d])] += 1
    return Confusion(digits, directions, extra, unread)
