"""Native-size training: buckets by (frames, height, width), a token budget per batch, and the batch plan.

Sora trains on videos at their native durations, resolutions and aspect ratios. A batch must still be one
array, so every clip is assigned to a *bucket* (T, H, W) -- the closest aspect ratio among the buckets its
duration and resolution can fill, the larger on ties; a seeded ``image_fraction`` of the videos goes to the
image buckets (T = 1) instead, as in joint image-video training -- and each batch is drawn from one bucket, with as many clips as the
token budget allows (``batch = budget // tokens(T, H, W)``, rounded down to the batch multiple the mesh and
the process count need). An image bucket (T = 1) takes single frames.

The plan is a pure function of (index, buckets, seed, epoch): every process computes the same global batches
in the same order, and process p reads the p-th contiguous block of each, so N processes assemble exactly
the batch one process would read, the processes' reads are disjoint and together cover each epoch, and the
grain iterator's state (one integer per process) resumes the stream exactly. Assignment is fixed for the run;
within an epoch, clips are shuffled inside each bucket, cut into batches (remainders wait for the next
epoch's shuffle), and the batches of all buckets are shuffled together.

Each clip is read as: a random start (seeded by seed, epoch and record), frames at stride
``round(source fps / target fps)``, resized to cover the bucket (bicubic, aspect kept) and centre-cropped.
Encoded records (``sora-jax ingest``) decode only the frames sampled and resize inside FFmpeg.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Callable, Sequence
from typing import Any

import grain
import jax
import numpy as np
from PIL import Image

from sora_jax.data.records import decode_clip, read_record
from sora_jax.errors import UserError

__all__ = [
    "Bucket",
    "BucketPlan",
    "is_video_record",
    "load_clip",
    "make_bucketed_dataset",
    "parse_buckets",
    "scan_index",
]


@dataclasses.dataclass(frozen=True, order=True)
class Bucket:
    frames: int
    height: int
    width: int

    @property
    def shape(self) -> tuple[int, int, int]:
        return (self.frames, self.height, self.width)

    def __str__(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}"


def parse_buckets(spec: str | Sequence) -> list[Bucket]:
    """``"16x256x256,32x128x224,1x512x512"`` (or a sequence of (T, H, W)) -> buckets, checked."""
    items = [s.strip() for s in spec.split(",") if s.strip()] if isinstance(spec, str) else list(spec)
    out = []
    for item in items:
        try:
            dims = (
                [int(v) for v in item.lower().split("x")] if isinstance(item, str) else [int(v) for v in item]
            )
        except ValueError:
            dims = []
        if len(dims) != 3 or min(dims) < 1:
            raise UserError(f"data.buckets: {item!r} is not FRAMESxHEIGHTxWIDTH with positive sizes")
        out.append(Bucket(*dims))
    if not out:
        raise UserError("data.buckets is empty: give e.g. '16x256x256,1x512x512'")
    if len(set(out)) != len(out):
        raise UserError(f"data.buckets lists a bucket twice: {[str(b) for b in out]}")
    return out


def stride_for(src_fps: float, target_fps: float) -> int:
    """Frame stride that brings ``src_fps`` closest to ``target_fps`` (1 when either is unknown/0)."""
    if target_fps <= 0 or src_fps <= 0:
        return 1
    return max(1, int(round(src_fps / target_fps)))


class BucketPlan:
    """Which bucket each clip trains in, per-bucket batch sizes, and the global batches of each epoch.

    index: float [N, 4] (frames, height, width, fps) per record; tokens_fn(bucket) -> tokens per clip.
    """

    def __init__(
        self,
        index: np.ndarray,
        buckets: Sequence[Bucket],
        *,
        token_budget: int,
        tokens_fn: Callable[[Bucket], int],
        batch_multiple: int = 1,
        default_batch: int = 0,
        target_fps: float = 0.0,
        max_upscale: float = 1.0,
        image_fraction: float = 0.0,
        seed: int = 0,
        check_batches: bool = True,
    ):
        index = np.asarray(index, np.float64)
        if index.ndim != 2 or index.shape[1] != 4:
            raise ValueError(f"clip index must be [N, 4] (frames, height, width, fps), got {index.shape}")
        self.buckets = list(buckets)
        self.seed, self.target_fps = int(seed), float(target_fps)
        self.batch_sizes = []
        for b in self.buckets:
            n = token_budget // max(1, tokens_fn(b)) if token_budget > 0 else default_batch
            n = (n // batch_multiple) * batch_multiple
            if n < batch_multiple or n < 1:
                raise UserError(
                    f"data.token_budget {token_budget} fits no batch of bucket {b} ({tokens_fn(b)} tokens per "
                    f"clip; the batch must be a multiple of {batch_multiple}): raise the budget or drop the bucket"
                )
            self.batch_sizes.append(n)
        if not 0.0 <= image_fraction <= 1.0:
            raise UserError(f"data.image_fraction must be in [0, 1], got {image_fraction}")
        # a fixed, seeded share of the videos trains as single frames in the image (T = 1) buckets
        as_image = np.random.default_rng([self.seed, 4]).random(len(index)) < image_fraction
        self.assignment = np.full(len(index), -1, np.int64)
        for i, (t, h, w, fps) in enumerate(index):
            k = self._assign(int(t), int(h), int(w), float(fps), max_upscale, images_only=bool(as_image[i]))
            if k < 0 and as_image[i]:
                k = self._assign(int(t), int(h), int(w), float(fps), max_upscale)
            self.assignment[i] = k
        self.members = [np.flatnonzero(self.assignment == k) for k in range(len(self.buckets))]
        self.batches_per_bucket = [len(m) // n for m, n in zip(self.members, self.batch_sizes)]
        self.batches_per_epoch = sum(self.batches_per_bucket)
        if check_batches and self.batches_per_epoch == 0:
            raise UserError(
                f"no bucket gets a full batch: clips per bucket {self.counts()}, batch sizes "
                f"{dict(zip(map(str, self.buckets), self.batch_sizes))}; lower data.token_budget or add buckets"
            )

    def _assign(
        self, t: int, h: int, w: int, fps: float, max_upscale: float, images_only: bool = False
    ) -> int:
        if t < 1 or h < 1 or w < 1:
            return -1
        stride = stride_for(fps, self.target_fps)
        best, best_key = -1, None
        for k, b in enumerate(self.buckets):
            if images_only and b.frames != 1:
                continue
            if (b.frames - 1) * stride + 1 > t:  # too short
                continue
            if max(b.height / h, b.width / w) > max_upscale:  # would upscale too much to cover the bucket
                continue
            key = (abs(math.log((h / w) / (b.height / b.width))), -b.frames * b.height * b.width)
            if best_key is None or key < best_key:
                best, best_key = k, key
        return best

    def counts(self) -> dict[str, int]:
        """Clips per bucket (and ``dropped``: clips that fit none)."""
        out = {str(b): len(m) for b, m in zip(self.buckets, self.members)}
        out["dropped"] = int(np.sum(self.assignment < 0))
        return out

    def epoch(self, e: int) -> list[tuple[int, np.ndarray]]:
        """The global batches of epoch ``e``: [(bucket id, record ids [batch size])], in training order."""
        batches = []
        for k, (m, n) in enumerate(zip(self.members, self.batch_sizes)):
            rng = np.random.default_rng([self.seed, e, k, 1])
            perm = rng.permutation(m)
            batches += [(k, perm[j * n : (j + 1) * n]) for j in range(len(m) // n)]
        order = np.random.default_rng([self.seed, e, 2]).permutation(len(batches))
        return [batches[i] for i in order]

    def batch(self, i: int) -> tuple[int, int, np.ndarray]:
        """Global batch ``i`` of the endless stream: (epoch, bucket id, record ids)."""
        e, j = divmod(int(i), self.batches_per_epoch)
        k, ids = self._cached_epoch(e)[j]
        return e, k, ids

    def _cached_epoch(self, e: int) -> list[tuple[int, np.ndarray]]:
        cached = self.__dict__.get("_epoch_cache")  # (epoch, batches); replaced whole, so thread-safe
        if cached is None or cached[0] != e:
            cached = (e, self.epoch(e))
            self._epoch_cache = cached
        return cached[1]

    def __getstate__(self) -> dict:  # grain workers get the plan, not the cache
        return {k: v for k, v in self.__dict__.items() if k != "_epoch_cache"}


def _cover_size(h: int, w: int, bucket: Bucket) -> tuple[int, int]:
    scale = max(bucket.height / h, bucket.width / w)
    return max(bucket.height, round(h * scale)), max(bucket.width, round(w * scale))


def _centre_crop(video: np.ndarray, bucket: Bucket) -> np.ndarray:
    _, h, w, _ = video.shape
    top, left = (h - bucket.height) // 2, (w - bucket.width) // 2
    return video[:, top : top + bucket.height, left : left + bucket.width]


def load_clip(
    record: bytes, bucket: Bucket, *, target_fps: float, rng: np.random.Generator
) -> tuple[np.ndarray, str]:
    """One record -> (video uint8 [T, H, W, 3] of the bucket's shape, caption).

    Frames: a random start, stride from the fps; resized to cover the bucket, centre-cropped.
    """
    header, payload = read_record(record)
    t, h, w = header["shape"][:3]
    stride = stride_for(float(header.get("fps", 0.0)), target_fps)
    span = (bucket.frames - 1) * stride + 1
    if span > t:
        raise ValueError(f"clip of {t} frames is too short for bucket {bucket} at stride {stride}")
    start = int(rng.integers(0, t - span + 1))
    indices = start + stride * np.arange(bucket.frames)
    size = _cover_size(h, w, bucket)
    if "codec" in header:
        from sora_jax.data.video_codec import decode_frames

        video = decode_frames(payload, indices, size=None if size == (h, w) else size)
    else:
        clip = decode_clip(record)
        if "video" not in clip:
            raise ValueError("bucketed loading reads video records, not precomputed latents")
        video = clip["video"][indices]
        if size != (h, w):
            video = np.stack(
                [np.asarray(Image.fromarray(f).resize(size[::-1], Image.Resampling.BICUBIC)) for f in video]
            )
    return _centre_crop(video, bucket), str(header["caption"])


def is_video_record(record: bytes) -> bool:
    """Whether a record holds a video (uint8 frames or an encoded stream), not precomputed latents."""
    header, _ = read_record(record)
    return "codec" in header or header.get("dtype", "uint8") == "uint8"


def scan_index(source: Any) -> np.ndarray:
    """(frames, height, width, fps) of every record of a source, from the headers (reads every record)."""
    rows = []
    for i in range(len(source)):
        header, _ = read_record(source[i])
        t, h, w = header["shape"][:3]
        rows.append((t, h, w, float(header.get("fps", 0.0))))
    return np.asarray(rows, np.float32).reshape(-1, 4)


class _ReadBatch:
    """Global batch i -> this process's block of decoded clips (picklable for grain workers)."""

    def __init__(self, source, plan: BucketPlan, process_index: int, process_count: int):
        self.source, self.plan = source, plan
        self.process_index, self.process_count = process_index, process_count

    def __call__(self, i: int, _: Any) -> dict[str, Any]:
        e, k, ids = self.plan.batch(i)
        bucket = self.plan.buckets[k]
        b = len(ids) // self.process_count
        mine = ids[self.process_index * b : (self.process_index + 1) * b]
        videos, captions, key = [], [], "video"
        for r in mine:
            record = self.source[int(r)]
            if not is_video_record(record):  # precomputed latents, already of their bucket's shape
                clip, key = decode_clip(record), "latents"
                videos.append(clip["latents"])
                captions.append(str(clip["caption"]))
                continue
            rng = np.random.default_rng([self.plan.seed, e, int(r), 3])
            video, caption = load_clip(record, bucket, target_fps=self.plan.target_fps, rng=rng)
            videos.append(video)
            captions.append(caption)
        return {
            key: np.stack(videos),
            "caption": np.asarray(captions, dtype=object),
            "record": np.asarray(mine, np.int64),
            "bucket": np.full(len(mine), k, np.int32),
        }


def make_bucketed_dataset(
    source: Any,
    plan: BucketPlan,
    *,
    tokenize: Callable[[list[str]], tuple[np.ndarray, np.ndarray]] | None = None,
    num_workers: int = 0,
    process_index: int | None = None,
    process_count: int | None = None,
) -> grain.IterDataset:
    """Per-process batches of the plan's endless stream: video uint8 [b, T, H, W, 3] (one bucket per batch;
    latents float32 [b, T', H', W', Z] from records of precomputed latents, their index rows their buckets),
    caption [b], record int64 [b] (source ids), bucket int32 [b], and tokens/text_mask with ``tokenize``."""
    from sora_jax.data.pipeline import _Tokenize, to_iter

    process_index = jax.process_index() if process_index is None else int(process_index)
    process_count = jax.process_count() if process_count is None else int(process_count)
    for n, bucket in zip(plan.batch_sizes, plan.buckets):
        if n % process_count:
            raise UserError(f"bucket {bucket}'s batch of {n} does not split over {process_count} processes")
    ds = grain.MapDataset.range(plan.batches_per_epoch).repeat()
    ds = ds.map_with_index(_ReadBatch(source, plan, process_index, process_count))
    if tokenize is not None:
        ds = ds.map(_Tokenize(tokenize))
    return to_iter(ds, num_workers)
