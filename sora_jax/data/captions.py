"""Captions files of video collections: CSV with a header, or JSONL, one row per video (or segment).

Keys: ``video`` (a path relative to the videos folder), ``caption``, optional ``start``/``end`` seconds,
``split`` (letters, digits, '_'; default "train"), ``license`` and ``source`` (free text, e.g. "CC-BY-4.0" and
"pexels.com/@someone"; ingest carries them per clip and counts them in the data card,
``sora_jax.data.datacard``). Shared by ``sora-jax ingest`` and the TFDS builder
(``data_pipelines/tfds_video.py``); a malformed file is one ``UserError`` line naming the file and line.
"""

from __future__ import annotations

import csv
import dataclasses
import json
import math
import os
import pathlib
import re
from typing import Any

from sora_jax.errors import UserError

DEFAULT_SPLIT = "train"
_SPLIT_RE = re.compile(r"^[A-Za-z0-9_]+$")

__all__ = ["DEFAULT_SPLIT", "Row", "read_captions"]


@dataclasses.dataclass(frozen=True)
class Row:
    """One captions-file row: a video (relative to the videos folder), its caption, an optional segment."""

    video: str
    caption: str
    split: str = DEFAULT_SPLIT
    start: float | None = None
    end: float | None = None
    license: str | None = None
    source: str | None = None

    def spec(self) -> dict[str, Any]:
        """The row as a dict, without an absent license/source (so rows from before those keys fingerprint
        as they did)."""
        d = dataclasses.asdict(self)
        return {k: v for k, v in d.items() if not (k in ("license", "source") and v is None)}


def _seconds(value: Any, key: str, where: str) -> float | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, bool):
        raise UserError(f"{where}: {key} must be a number of seconds, got {value!r}")
    try:
        x = float(value)
    except (TypeError, ValueError):
        raise UserError(f"{where}: {key} must be a number of seconds, got {value!r}") from None
    if not math.isfinite(x) or x < 0:
        raise UserError(f"{where}: {key} must be a finite number of seconds >= 0, got {value!r}")
    return x


def _text(value: Any, key: str, where: str) -> str | None:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if not isinstance(value, str):
        raise UserError(f"{where}: {key} must be text, got {value!r}")
    return " ".join(value.split())


def _row(d: dict[str, Any], where: str) -> Row:
    video, caption = d.get("video"), d.get("caption")
    if not isinstance(video, str) or not video.strip():
        raise UserError(f"{where}: 'video' must be a non-empty path, got {video!r}")
    if not isinstance(caption, str):
        raise UserError(f"{where}: 'caption' must be a string, got {caption!r}")
    split = d.get("split")
    split = DEFAULT_SPLIT if split is None or (isinstance(split, str) and not split.strip()) else split
    if not isinstance(split, str) or not _SPLIT_RE.match(split.strip()):
        raise UserError(f"{where}: split must be letters, digits or '_', got {split!r}")
    start, end = _seconds(d.get("start"), "start", where), _seconds(d.get("end"), "end", where)
    if start is not None and end is not None and end <= start:
        raise UserError(f"{where}: end ({end}) must be after start ({start})")
    return Row(
        video=video.strip(),
        caption=caption,
        split=split.strip(),
        start=start,
        end=end,
        license=_text(d.get("license"), "license", where),
        source=_text(d.get("source"), "source", where),
    )


def read_captions(path: str | os.PathLike) -> list[Row]:
    """The rows of a captions file (CSV with a header, or ``.jsonl``), in file order.

    Raises UserError (one line naming the file and line) when the file is missing or malformed.
    """
    path = pathlib.Path(path)
    if not path.is_file():
        raise UserError(f"captions file not found: {path}")
    rows: list[Row] = []
    try:
        with open(path, encoding="utf-8-sig", newline="") as f:
            if path.suffix.lower() == ".jsonl":
                for n, line in enumerate(f, start=1):
                    if not line.strip():
                        continue
                    try:
                        d = json.loads(line)
                    except json.JSONDecodeError as e:
                        raise UserError(f"{path}:{n}: not valid JSON ({e.msg})") from None
                    if not isinstance(d, dict):
                        raise UserError(f"{path}:{n}: expected a JSON object, got {type(d).__name__}")
                    for key in ("video", "caption"):
                        if key not in d:
                            raise UserError(f"{path}:{n}: missing key {key!r}")
                    rows.append(_row(d, f"{path}:{n}"))
            else:
                reader = csv.DictReader(f)
                header = [h.strip() for h in reader.fieldnames or []]
                missing = [k for k in ("video", "caption") if k not in header]
                if missing:
                    raise UserError(
                        f"{path}: the CSV header must name the columns 'video' and 'caption' "
                        f"(missing {', '.join(missing)}; header: {','.join(header) or '(empty)'})"
                    )
                reader.fieldnames = header
                for d in reader:
                    where = f"{path}:{reader.line_num}"
                    if None in d:
                        raise UserError(f"{where}: more fields than the header has columns")
                    rows.append(_row(d, where))
    except UnicodeDecodeError as e:
        raise UserError(f"{path}: not UTF-8 text ({e.reason} at byte {e.start})") from None
    except csv.Error as e:
        raise UserError(f"{path}: malformed CSV ({e})") from None
    if not rows:
        raise UserError(f"{path}: no rows; expected a header and one row per video")
    return rows
