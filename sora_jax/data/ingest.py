"""``sora-jax ingest``: a folder of videos + a captions file -> a dataset folder of H.264 clips in ArrayRecord.

    sora-jax ingest --videos raw/ --captions raw/captions.csv --out data/mine
    python -m data_pipelines.ingest --videos raw/ --captions raw/captions.jsonl --out data/mine --workers 8

Owns the
resumable, parallel work units that write shards (``run_unit``) and the merge into ``metadata.json``,
``<split>.index.npy`` and ``report.json`` (``ingest``). The record codec (``sora_jax.data.records``) and the
H.264 codec (``sora_jax.data.video_codec``), the captions reader (``sora_jax.data.captions``) and the
cutting of one video into clips (``sora_jax.data.video_clips``) are used, not defined, here.

Captions: CSV with a header, or JSONL (``.jsonl``); keys ``video`` (path relative to ``--videos``),
``caption``, optional ``start``/``end`` seconds, ``split`` (default "train"), ``license`` and ``source``
(carried into each clip's record header as ``license`` / ``data_source``; ``--require_license`` refuses a
file with a row that has no license, before any work starts). A row with start/end
gives that segment, a row without gives the whole video; either is cut into consecutive clips of
``--clip_seconds`` (a shorter last piece is kept when it has >= ``--min_frames`` frames). Clips keep the
source fps; a short side above ``--max_short_side`` is downscaled (area filter, aspect ratio kept) and odd
sizes lose their last row/column (yuv420p needs even sizes).

Layout of ``--out``: shards ``<split>-u<unit>-<k>.array_record`` (one ``SJC1``/h264 record per clip, shards
rolled over at ``--shard_mb``), ``<split>.index.npy`` (float32 [N, 4] = frames, height, width, fps of record
i, in record order), ``<split>.provenance.npy`` (int32 [N, 2] = license, source of record i as indices into
the split's ``provenance`` lists in metadata.json, -1 = unspecified), ``metadata.json`` (read by
``sora_jax.data.pipeline``), ``report.json`` (counts and every skipped video with its reason), the data card
``datacard.json`` + ``datacard.md`` (``sora_jax.data.datacard``: clips and hours per license, source and split,
caption statistics) and ``.units/<split>-u<unit>.json`` (one per finished work unit).

Work is cut into units of ``--videos_per_unit`` rows in captions-file order, run in ``--workers`` spawned
processes. A unit writes its shards under temporary names, renames them, and writes its unit json last, so a
rerun skips every finished unit (rewriting no shard) and redoes an interrupted one from scratch. A unit whose
rows or clip options changed is redone too; delete ``.units/<json>`` to force a unit to run again (e.g. after
adding a video that was missing). Bad videos (missing, unreadable, corrupt, too short) never stop the job:
they are skipped and listed in ``report.json``. A malformed captions file is a ``UserError``.
"""

from __future__ import annotations

import argparse
import dataclasses
import hashlib
import io
import json
import os
import pathlib
import re
import time
from collections.abc import Callable
from typing import Any

import numpy as np

from sora_jax.data import datacard
from sora_jax.data.captions import Row, read_captions
from sora_jax.data.video_clips import (
    ClipOptions,
    SkipVideo,
    av_reason,
    encode_video,
    output_size,
    video_clips,
)
from sora_jax.errors import UserError

VERSION = 1
RECORD_FORMAT = "sora_jax.data.records (SJC1, h264)"
_SHARD_RE = re.compile(r"^[A-Za-z0-9_]+-u\d{5,}-\d{3,}\.array_record$")  # <split>-u<unit>-<k>
_MAX_SKIPS_PRINTED = 20
_PER_SPLIT_FILES = (".index.npy", ".provenance.npy")

Progress = Callable[[int], None]

__all__ = [
    "ClipOptions",
    "Row",
    "add_arguments",
    "ingest",
    "output_size",
    "read_captions",
    "run_unit",
    "video_clips",
]


# ----------------------------------------------------------------------------------------------------------
# Work units


@dataclasses.dataclass(frozen=True)
class Unit:
    """``rows`` of one split, written by one process into shards ``<name>-<k>.array_record``."""

    split: str
    index: int
    rows: tuple[Row, ...]
    videos: str
    out: str
    options: ClipOptions
    shard_bytes: int

    @property
    def name(self) -> str:
        return f"{self.split}-u{self.index:05d}"

    @property
    def json_path(self) -> pathlib.Path:
        return pathlib.Path(self.out) / ".units" / f"{self.name}.json"

    def fingerprint(self) -> str:
        spec = {
            "version": VERSION,
            "rows": [r.spec() for r in self.rows],
            "options": dataclasses.asdict(self.options),
            "shard_bytes": self.shard_bytes,
        }
        return hashlib.sha256(json.dumps(spec, sort_keys=True).encode()).hexdigest()


def _write_atomic(path: pathlib.Path, data: bytes) -> None:
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    with open(tmp, "wb") as f:
        f.write(data)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)


def _write_json_atomic(path: pathlib.Path, obj: Any) -> None:
    _write_atomic(path, (json.dumps(obj, indent=1, ensure_ascii=False) + "\n").encode("utf-8"))


def _finished(unit: Unit) -> dict[str, Any] | None:
    """The unit's json if it finished with the same rows and options and its shards are all there."""
    try:
        done = json.loads(unit.json_path.read_text())
    except (OSError, json.JSONDecodeError):
        return None
    if not isinstance(done, dict) or done.get("fingerprint") != unit.fingerprint():
        return None
    if "clip_rows" not in done:  # written before clips named their rows (data cards): redo
        return None
    out = pathlib.Path(unit.out)
    if not all((out / s).is_file() for s in done.get("shards", [])):
        return None
    return done


def _remove_unit_files(unit: Unit) -> None:
    out = pathlib.Path(unit.out)
    for p in [*out.glob(f"{unit.name}-*.array_record"), *out.glob(f".{unit.name}-*.partial")]:
        p.unlink(missing_ok=True)


def run_unit(unit: Unit, progress: Progress | None = None) -> dict[str, Any]:
    """Writes the unit's shards from scratch, then its unit json (last, atomically); returns that json.

    ``progress(1)`` is called after each row. Bad videos are skipped and listed, never raised.
    """
    from array_record.python.array_record_module import ArrayRecordWriter

    out = pathlib.Path(unit.out)
    unit.json_path.unlink(missing_ok=True)
    _remove_unit_files(unit)
    shards: list[str] = []
    counts: list[int] = []
    index: list[list[float]] = []
    clip_rows: list[int] = []  # the row (index into unit.rows) of each clip, in record order
    skipped: list[dict[str, str]] = []
    videos_ok = 0
    writer = None
    size = 0

    def close() -> None:
        nonlocal writer
        if writer is not None:
            writer.close()
            os.replace(out / f".{shards[-1]}.partial", out / shards[-1])
            writer = None

    for row_index, row in enumerate(unit.rows):
        try:
            clips = encode_video(pathlib.Path(unit.videos) / row.video, row, unit.options)
        except SkipVideo as e:
            skipped.append({"video": row.video, "reason": str(e)})
        except Exception as e:  # a bad input must not stop the job; the reason says what happened
            skipped.append({"video": row.video, "reason": f"{type(e).__name__}: {av_reason(e)}"})
        else:
            for record, idx in clips:
                if writer is None or (size and size + len(record) > unit.shard_bytes):
                    close()
                    shards.append(f"{unit.name}-{len(shards):03d}.array_record")
                    counts.append(0)
                    writer = ArrayRecordWriter(str(out / f".{shards[-1]}.partial"), "group_size:1")
                    size = 0
                writer.write(record)
                size += len(record)
                counts[-1] += 1
                index.append(idx)
                clip_rows.append(row_index)
            videos_ok += 1
        if progress is not None:
            progress(1)
    close()
    done = {
        "fingerprint": unit.fingerprint(),
        "split": unit.split,
        "unit": unit.index,
        "shards": shards,
        "records_per_shard": counts,
        "index": index,
        "clip_rows": clip_rows,
        "videos": len(unit.rows),
        "videos_ok": videos_ok,
        "skipped": skipped,
        "bytes": sum((out / s).stat().st_size for s in shards),
    }
    _write_json_atomic(unit.json_path, done)
    return done


_WORKER_QUEUE: Any = None


def _init_worker(queue: Any) -> None:
    global _WORKER_QUEUE
    _WORKER_QUEUE = queue


def _run_unit_in_worker(unit: Unit) -> dict[str, Any]:
    return run_unit(unit, progress=_WORKER_QUEUE.put)


def _run_pending(pending: list[Unit], workers: int, progress: Progress) -> list[dict[str, Any]]:
    """Runs units in this process (one worker or one unit) or in ``workers`` spawned processes."""
    if workers <= 1 or len(pending) <= 1:
        return [run_unit(u, progress) for u in pending]
    import multiprocessing
    import queue as queue_lib
    from concurrent.futures import FIRST_COMPLETED, ProcessPoolExecutor, wait

    ctx = multiprocessing.get_context("spawn")  # no inherited JAX/XLA state; workers never import jax
    q = ctx.Queue()

    def drain() -> None:
        while True:
            try:
                progress(q.get_nowait())
            except queue_lib.Empty:
                return

    pool = ProcessPoolExecutor(
        min(workers, len(pending)), mp_context=ctx, initializer=_init_worker, initargs=(q,)
    )
    try:
        futures = [pool.submit(_run_unit_in_worker, u) for u in pending]
        remaining = set(futures)
        while remaining:
            done, remaining = wait(remaining, timeout=0.2, return_when=FIRST_COMPLETED)
            drain()
            for f in done:
                f.result()  # a unit that failed (not a bad video: e.g. a full disk) stops the job now
        results = [f.result() for f in futures]
    except BaseException:
        # Ctrl-C or a failed unit: stop the workers now (otherwise they run every queued unit first); the
        # units they were writing are redone by the next run. No public terminate before Python 3.14.
        for proc in list((getattr(pool, "_processes", None) or {}).values()):
            proc.terminate()
        pool.shutdown(wait=False, cancel_futures=True)
        raise
    pool.shutdown()
    drain()  # the workers have exited: their progress messages are all in the queue
    return results


# ----------------------------------------------------------------------------------------------------------
# The job


def _units(
    rows: list[Row],
    videos: pathlib.Path,
    out: pathlib.Path,
    opts: ClipOptions,
    shard_bytes: int,
    videos_per_unit: int,
) -> list[Unit]:
    by_split: dict[str, list[Row]] = {}
    for r in rows:
        by_split.setdefault(r.split, []).append(r)
    return [
        Unit(
            split,
            i // videos_per_unit,
            tuple(rs[i : i + videos_per_unit]),
            str(videos),
            str(out),
            opts,
            shard_bytes,
        )
        for split, rs in by_split.items()
        for i in range(0, len(rs), videos_per_unit)
    ]


def _remove_stale(out: pathlib.Path, units: list[Unit], results: list[dict[str, Any]]) -> None:
    """Deletes shards, unit jsons, index files and temporaries of ours that the current job does not use."""
    shards = {s for r in results for s in r["shards"]}
    names = {u.name for u in units}
    splits = {u.split for u in units}
    for p in out.iterdir():
        m = _SHARD_RE.match(p.name)
        stale_shard = m is not None and p.name not in shards
        stale_tmp = p.name.startswith(".") and (p.name.endswith(".partial") or ".tmp-" in p.name)
        stale_index = any(
            p.name.endswith(suffix) and p.name[: -len(suffix)] not in splits for suffix in _PER_SPLIT_FILES
        )
        if stale_shard or stale_tmp or stale_index:
            p.unlink(missing_ok=True)
    for p in (out / ".units").iterdir():
        if p.suffix != ".json" or p.stem not in names:
            p.unlink(missing_ok=True)


def _check_licenses(rows: list[Row], captions: str | os.PathLike) -> None:
    missing = [r for r in rows if r.license is None]
    if missing:
        raise UserError(
            f"--require_license: {len(missing)} of {len(rows)} rows of {captions} have no license (first: "
            f"{missing[0].video!r}); give every row a 'license' column/key, or drop --require_license"
        )


def _provenance(
    split: str, mine: list[tuple[Unit, dict[str, Any]]]
) -> tuple[np.ndarray, dict[str, Any], datacard.SplitClips]:
    """(codes int32 [N, 2] = license, source index of each clip, -1 unspecified; the metadata entry that names
    them; the clips for the data card) of one split's units and their results, in record order."""
    rows = [u.rows[i] for u, r in mine for i in r["clip_rows"]]
    index = np.asarray([row for _, r in mine for row in r["index"]], np.float64).reshape(-1, 4)
    licenses = sorted({r.license for r in rows if r.license is not None})
    sources = sorted({r.source for r in rows if r.source is not None})
    lic_id, src_id = {k: i for i, k in enumerate(licenses)}, {k: i for i, k in enumerate(sources)}
    codes = np.asarray(
        [(lic_id.get(r.license, -1), src_id.get(r.source, -1)) for r in rows], np.int32
    ).reshape(-1, 2)
    entry = {
        "file": f"{split}.provenance.npy",
        "columns": ["license", "source"],
        "license": licenses,
        "source": sources,
    }
    clips = datacard.SplitClips(
        seconds=index[:, 0] / np.maximum(index[:, 3], 1e-9),
        licenses=[r.license for r in rows],
        sources=[r.source for r in rows],
        captions=[r.caption for r in rows],
    )
    return codes, entry, clips


def _save_npy(path: pathlib.Path, a: np.ndarray) -> None:
    buf = io.BytesIO()  # np.save on a path would append .npy to the temporary name
    np.save(buf, a)
    _write_atomic(path, buf.getvalue())


def ingest(
    videos: str | os.PathLike,
    captions: str | os.PathLike,
    out: str | os.PathLike,
    *,
    clip_seconds: float = 4.0,
    min_frames: int = 8,
    max_short_side: int = 720,
    crf: int = 20,
    shard_mb: float = 256.0,
    videos_per_unit: int = 32,
    workers: int | None = None,
    progress: bool = True,
    require_license: bool = False,
) -> dict[str, Any]:
    """Writes (or finishes) the dataset folder ``out``; returns the report (also in ``out/report.json``).

    Raises UserError for a malformed captions file, a missing videos folder or out-of-range options, and
    (``require_license``) for a row without a license; all before anything is written.
    """
    t_begin = time.perf_counter()
    opts = ClipOptions(float(clip_seconds), int(min_frames), int(max_short_side), int(crf))
    opts.check()
    workers = min(4, os.cpu_count() or 1) if workers is None else int(workers)
    if workers < 1 or videos_per_unit < 1 or not shard_mb > 0:
        raise UserError(
            f"--workers ({workers}) and --videos_per_unit ({videos_per_unit}) must be >= 1 and --shard_mb "
            f"({shard_mb}) > 0"
        )
    videos, out = pathlib.Path(videos).absolute(), pathlib.Path(out).absolute()
    if not videos.is_dir():
        raise UserError(f"videos folder not found: {videos}")
    rows = read_captions(captions)
    if require_license:
        _check_licenses(rows, captions)
    if out.exists() and not out.is_dir():
        raise UserError(f"--out {out} exists and is not a folder")
    meta_path = out / "metadata.json"
    if meta_path.is_file():
        try:
            generator = json.loads(meta_path.read_text()).get("generator")
        except (OSError, json.JSONDecodeError, AttributeError):
            generator = None
        if generator != "ingest":
            raise UserError(f"--out {out} holds a dataset not written by ingest; choose another folder")
    (out / ".units").mkdir(parents=True, exist_ok=True)

    units = _units(rows, videos, out, opts, max(1, int(shard_mb * 2**20)), int(videos_per_unit))
    results: list[dict[str, Any] | None] = [_finished(u) for u in units]
    pending = [u for u, r in zip(units, results) if r is None]
    from tqdm.auto import tqdm

    with tqdm(
        total=len(rows),
        initial=len(rows) - sum(len(u.rows) for u in pending),
        desc=f"ingest -> {out.name}",
        unit="video",
        disable=not progress,
    ) as bar:
        fresh = iter(_run_pending(pending, workers, bar.update))
    results = [r if r is not None else next(fresh) for r in results]

    splits: dict[str, Any] = {}
    card_clips: dict[str, datacard.SplitClips] = {}
    for split in dict.fromkeys(u.split for u in units):
        mine = [(u, r) for u, r in zip(units, results) if u.split == split]
        index = np.asarray([row for _, r in mine for row in r["index"]], np.float32).reshape(-1, 4)
        _save_npy(out / f"{split}.index.npy", index)
        codes, provenance, card_clips[split] = _provenance(split, mine)
        _save_npy(out / provenance["file"], codes)
        splits[split] = {
            "shards": [s for _, r in mine for s in r["shards"]],
            "num_clips": len(index),
            "index": f"{split}.index.npy",
            "index_columns": ["frames", "height", "width", "fps"],
            "provenance": provenance,
            "num_videos": sum(r["videos_ok"] for _, r in mine),
        }
    params = {
        **dataclasses.asdict(opts),
        "shard_mb": float(shard_mb),
        "videos_per_unit": int(videos_per_unit),
    }
    meta = {
        "generator": "ingest",
        "version": VERSION,
        "record_format": RECORD_FORMAT,
        "videos": str(videos),
        "captions": str(pathlib.Path(captions).absolute()),
        "params": params,
        "splits": splits,
    }
    card = datacard.make_card("ingest", card_clips, params=dataclasses.asdict(opts))
    datacard.write_card(out, card)
    _write_json_atomic(out / "metadata.json", meta)
    _remove_stale(out, units, results)
    report = {
        "clips": sum(s["num_clips"] for s in splits.values()),
        "videos": len(rows),
        "videos_ok": sum(r["videos_ok"] for r in results),
        "skipped": [dict(s, split=r["split"]) for r in results for s in r["skipped"]],
        "shards": sum(len(s["shards"]) for s in splits.values()),
        "bytes": sum(r["bytes"] for r in results),
        "units": len(units),
        "units_run": len(pending),
        "seconds": round(time.perf_counter() - t_begin, 3),
        "splits": {k: {"clips": v["num_clips"], "videos_ok": v["num_videos"]} for k, v in splits.items()},
        "out": str(out),
        "datacard": datacard.reference(card),
    }
    _write_json_atomic(out / "report.json", report)
    return report


def summary(report: dict[str, Any]) -> str:
    """A few lines for the terminal: clips, videos, skipped videos with reasons, shards, MB, seconds."""
    lines = [
        f"ingest: {report['clips']} clips from {report['videos_ok']}/{report['videos']} videos -> "
        f"{report['out']} ({report['shards']} shards, {report['bytes'] / 2**20:.2f} MB, "
        f"{report['seconds']:.1f} s; {report['units_run']}/{report['units']} work units run)"
    ]
    if report.get("datacard"):
        lines.append(f"data card {report['datacard']['hash'][:12]}: {report['datacard']['summary']}")
    skipped = report["skipped"]
    if skipped:
        lines.append(f"skipped {len(skipped)} videos:")
        lines += [f"  {s['video']}: {s['reason']}" for s in skipped[:_MAX_SKIPS_PRINTED]]
        if len(skipped) > _MAX_SKIPS_PRINTED:
            lines.append(f"  ... {len(skipped) - _MAX_SKIPS_PRINTED} more in {report['out']}/report.json")
    if not report["clips"]:
        lines.append("warning: no clips were written; see the reasons above")
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# Command line (also `sora-jax ingest`)


def add_arguments(p: argparse.ArgumentParser) -> None:
    p.add_argument("--videos", required=True, help="folder the captions file's video paths are relative to")
    p.add_argument(
        "--captions",
        required=True,
        help="CSV (header: video,caption[,start,end,split,license,source]) or .jsonl with those keys",
    )
    p.add_argument("--out", required=True, help="dataset folder (shards, metadata.json, report.json)")
    p.add_argument("--clip_seconds", type=float, default=4.0, help="clip length (default 4.0)")
    p.add_argument("--min_frames", type=int, default=8, help="shortest clip kept (default 8)")
    p.add_argument("--max_short_side", type=int, default=720, help="downscale above this (default 720)")
    p.add_argument("--crf", type=int, default=20, help="H.264 quality, lower is better (default 20)")
    p.add_argument("--shard_mb", type=float, default=256.0, help="shard size bound in MiB (default 256)")
    p.add_argument("--videos_per_unit", type=int, default=32, help="rows per resumable work unit")
    p.add_argument("--workers", type=int, default=None, help="processes (default: min(4, CPUs))")
    p.add_argument("--no_progress", action="store_true", help="no progress bar")
    p.add_argument(
        "--require_license",
        action="store_true",
        help="refuse (before any work) a captions file with a row that has no license",
    )
