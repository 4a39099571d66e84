"""Grain pipelines over clip datasets: ArrayRecord source, per-process batches, and global jax.Arrays.

A dataset folder holds ``metadata.json`` (listing each split's shard files) and ArrayRecord shards of
records in the ``sora_jax.data.records`` format. ``make_dataset`` reads one split as a grain ``IterDataset``
of *per-process* batches: the shuffled, repeated record stream is cut into global batches and process p
reads the p-th contiguous block of each, so ``to_global`` assembles exactly the batch a single process would
have read (same examples, same order), whatever the number of processes. ``iter(ds)`` is a grain ``DatasetIterator``: checkpoint it with
``grain.checkpoint.CheckpointSave``.
"""

from __future__ import annotations

import json
import pathlib
from collections.abc import Callable
from typing import Any

import grain
import jax
import numpy as np
from jax.sharding import Mesh, NamedSharding, PartitionSpec

from sora_jax.data.records import decode_clip, read_record
from sora_jax.errors import UserError
from sora_jax.parallel.sharding import BATCH_AXES

Tokenizer = Callable[[list[str]], tuple[np.ndarray, np.ndarray]]


def _missing(path: pathlib.Path, what: str) -> FileNotFoundError:
    return FileNotFoundError(
        f"dataset folder {path} is missing {what}; build it first, e.g. "
        f"`python -m data_pipelines.moving_digits --out {path}` (or `sora-jax ingest ... --out {path}`)"
    )


def read_metadata(path: str | pathlib.Path) -> dict[str, Any]:
    """The dataset's metadata.json as a dict; FileNotFoundError (saying how to build it) if absent."""
    path = pathlib.Path(path)
    meta_path = path / "metadata.json"
    if not meta_path.is_file():
        raise _missing(path, "metadata.json")
    try:
        return json.loads(meta_path.read_text())
    except json.JSONDecodeError as e:
        raise UserError(f"{meta_path} is not valid JSON ({e}); delete the folder and build it again") from e


def open_source(path: str | pathlib.Path, split: str) -> grain.sources.ArrayRecordDataSource:
    """Random-access source over the split's shards (records: bytes in the ``records`` format)."""
    path = pathlib.Path(path)
    meta = read_metadata(path)
    splits = meta.get("splits", {})
    if split not in splits:
        raise UserError(f"dataset {path} has no split {split!r}; it has {sorted(splits)}")
    shards = [path / name for name in splits[split]["shards"]]
    absent = [p.name for p in shards if not p.is_file()]
    if not shards or absent:
        raise _missing(path, f"{split} shards {absent or '(none listed)'}")
    return grain.sources.ArrayRecordDataSource([str(p) for p in shards])


def _decode_batch(records: list) -> dict[str, Any]:
    """Records (or (index, record) pairs: ``make_dataset(with_index=True)``) -> the batch of their clips."""
    indexed = bool(records) and isinstance(records[0], tuple)
    clips = [decode_clip(r[1] if indexed else r) for r in records]
    batch = {k: np.stack([c[k] for c in clips]) for k in clips[0]}
    return batch | {"index": np.asarray([r[0] for r in records], np.int64)} if indexed else batch


class _WithIndex:
    """(index, record) -> (its record number in a source of ``n``, record): grain's datasets pass indices past
    the source's length (later epochs, ``repeat``) and the source wraps them."""

    def __init__(self, n: int):
        self.n = n

    def __call__(self, index: int, record: bytes) -> tuple[int, bytes]:
        return index % self.n, record


class _Tokenize:
    """Batch transform: captions -> tokens int32 [b, L] (or text_emb float32 [b, L, F] from a frozen encoder's
    table), text_mask bool [b, L] (picklable for workers)."""

    def __init__(self, tokenize: Tokenizer):
        self.tokenize = tokenize

    def __call__(self, batch: dict[str, Any]) -> dict[str, Any]:
        captions = [str(c) for c in batch["caption"]]
        ids, mask = self.tokenize(captions)
        ids, mask = np.asarray(ids), np.asarray(mask, bool)
        if ids.ndim not in (2, 3) or ids.shape[0] != len(captions) or mask.shape != ids.shape[:2]:
            raise ValueError(
                f"tokenize must return ids [b, L] (or features [b, L, F]) and mask [b, L] for b={len(captions)} "
                f"captions, got {ids.shape} and {mask.shape}"
            )
        if ids.ndim == 3:  # a frozen encoder's features (sora_jax/text/frozen.py)
            return {**batch, "text_emb": ids.astype(np.float32), "text_mask": mask}
        return {**batch, "tokens": ids.astype(np.int32), "text_mask": mask}


def make_dataset(
    path: str | pathlib.Path,
    split: str,
    *,
    global_batch_size: int,
    tokenize: Tokenizer,
    seed: int,
    shuffle: bool = True,
    repeat: bool = True,
    num_workers: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
    drop_remainder: bool = True,
    source: Any | None = None,
    with_index: bool = False,
) -> grain.IterDataset:
    """Per-process batches of a split as a grain IterDataset.

    Each element: video uint8 [b, T, H, W, 3], tokens int32 [b, L], text_mask bool [b, L], digits int32
    [b, 2], directions int32 [b, 2], caption str [b]; b = global_batch_size // process_count.
    With ``num_workers > 0`` decoding runs in worker processes (``tokenize`` must then be picklable);
    restoring an iterator's state needs the same process count and ``num_workers``. ``source``: read this
    random-access source of records (e.g. ``tfds_source.open_tfds_source``) instead of ``path``.
    ``with_index``: each element also holds index int64 [b], the clips' record numbers in the source.
    """
    process_index = jax.process_index() if process_index is None else int(process_index)
    process_count = jax.process_count() if process_count is None else int(process_count)
    if not 0 <= process_index < process_count:
        raise ValueError(f"process_index {process_index} is outside [0, process_count={process_count})")
    if global_batch_size < 1 or global_batch_size % process_count:
        raise UserError(
            f"data batch size {global_batch_size} must be a positive multiple of the process count "
            f"{process_count}"
        )
    per_process = global_batch_size // process_count
    ds = grain.MapDataset.source(open_source(path, split) if source is None else source)
    ds = (ds.map_with_index(_WithIndex(len(ds))) if with_index else ds).seed(seed)
    if shuffle:
        ds = ds.shuffle()
    if repeat:
        ds = ds.repeat()
    # global batch k = records [kB, (k+1)B); this process's part: [kB + p b, kB + (p+1) b)
    ds = ds.batch(per_process, drop_remainder=drop_remainder, batch_fn=list)[process_index::process_count]
    ds = ds.map(_decode_batch).map(_Tokenize(tokenize))
    return to_iter(ds, num_workers)


def to_iter(ds: grain.MapDataset, num_workers: int) -> grain.IterDataset:
    """``ds`` as an IterDataset read by 2 threads, in ``num_workers`` worker processes when > 0."""
    it = ds.to_iter_dataset(grain.ReadOptions(num_threads=2, prefetch_buffer_size=2))
    if num_workers > 0:
        from absl import flags

        if not flags.FLAGS.is_parsed():  # grain 0.2.18 reads an absl flag when starting workers
            flags.FLAGS.mark_as_parsed()
        it = it.mp_prefetch(grain.MultiprocessingOptions(num_workers=num_workers))
    return it


def no_tokens(captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    return np.zeros((len(captions), 1), np.int32), np.ones((len(captions), 1), bool)


def in_order(path: str | pathlib.Path, split: str, batch_size: int) -> grain.IterDataset:
    """Every clip of a split once, in stored order, on this process alone, in batches of ``batch_size``
    (the last one smaller); no tokens (for evaluation and preprocessing, not training)."""
    return make_dataset(
        path,
        split,
        global_batch_size=batch_size,
        tokenize=no_tokens,
        seed=0,
        shuffle=False,
        repeat=False,
        process_index=0,
        process_count=1,
        drop_remainder=False,
    )


def to_global(batch: dict[str, np.ndarray], mesh: Mesh) -> dict[str, jax.Array]:
    """Process-local arrays [b, ...] -> global jax.Arrays [b * process_count, ...] sharded over BATCH_AXES.

    Non-numeric entries (captions) are dropped.
    """
    sharding = NamedSharding(mesh, PartitionSpec(BATCH_AXES))
    out = {}
    for k, v in batch.items():
        v = np.asarray(v)
        if v.dtype.kind not in "biuf":
            continue
        out[k] = jax.make_array_from_process_local_data(sharding, v)
    return out


def dataset_dir(cfg, workdir: str | pathlib.Path) -> pathlib.Path:
    """Where a config's ArrayRecord dataset lives: ``config.data.path``, else ``<workdir>/data`` (the bundled
    moving digits, built there by ``ensure_dataset``). Only a path: nothing is read or built."""
    return pathlib.Path(cfg.data.path) if cfg.data.path else pathlib.Path(workdir) / "data"


def ensure_dataset(cfg, workdir: str | pathlib.Path) -> pathlib.Path:
    """``dataset_dir``, with the bundled moving digits built there first when ``config.data.path`` is empty and
    nothing is there yet (process 0 builds; every process waits for it). Returns the folder."""
    path = dataset_dir(cfg, workdir)
    if not cfg.data.path and not (path / "metadata.json").is_file() and jax.process_index() == 0:
        from sora_jax.data import moving_digits

        d = cfg.data
        moving_digits.build(
            path,
            num_train=d.num_train,
            num_test=d.num_test,
            num_frames=d.num_frames,
            height=d.height,
            width=d.width,
            fps=d.fps,
            seed=cfg.seed,
            speed=tuple(d.speed) if d.get("speed") else None,
            train_two_fraction=float(d.get("two_digit_fraction", 0.5)),
            train_min_gap=float(d.get("two_digit_gap", 0.0)),
            train_left_to_right=bool(d.get("two_digit_left_to_right", False)),
        )
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils

        multihost_utils.sync_global_devices("sora_jax_data_built")
    return path


def split_captions(data: str | pathlib.Path, split: str) -> list[str]:
    """Every caption of a split: from metadata.json when listed, else from the records' headers."""
    entry = read_metadata(data)["splits"].get(split)
    if entry is None:
        raise UserError(f"dataset {data} has no split {split!r}")
    if entry.get("captions") is not None:
        return list(entry["captions"])
    source = open_source(data, split)
    return [read_record(source[i])[0]["caption"] for i in range(len(source))]


__all__ = (
    "in_order",
    "dataset_dir",
    "ensure_dataset",
    "make_dataset",
    "no_tokens",
    "open_source",
    "read_metadata",
    "split_captions",
    "to_global",
)
