"""The real clips and captions an evaluation compares with: which dataset they come from, and reading a split's
clips at the size the model generates.

    data = eval_dataset(cfg, workdir)          # the pixel clips (a latent dataset's source), or --data
    videos, captions = read_clips(data, "test", clip=ClipShape(5, 32, 32, 8.0))

A fixed-size dataset (the bundled moving digits) is read as stored. A dataset of native-size clips (``sora-jax
ingest``: each split has an index of frames, height, width and fps) is cut to the generated shape the way
training buckets cut it (``data.buckets.load_clip``: frames at the generated fps from a start seeded by the
record, resized to cover, centre-cropped); clips too short for that are left out.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import numpy as np

from sora_jax.errors import UserError

__all__ = ["ClipShape", "clip_shape", "eval_dataset", "is_native_size", "read_clips", "sample_clips"]


@dataclasses.dataclass(frozen=True)
class ClipShape:
    """The generated videos' shape: frames, height, width and frames per second."""

    frames: int
    height: int
    width: int
    fps: float

    def key(self) -> str:
        return f"{self.frames}x{self.height}x{self.width}@{self.fps:g}"


def clip_shape(cfg) -> ClipShape:
    """The shape a config's sampler generates (``config.data.num_frames`` x ``height`` x ``width`` at ``fps``)."""
    d = cfg.data
    return ClipShape(int(d.num_frames), int(d.height), int(d.width), float(d.fps))


def eval_dataset(cfg, workdir: str | Path, data: str | Path | None = None) -> Path:
    """The folder of real clips to evaluate against: ``data`` when given, else the workdir's dataset
    (``config.data.path`` or ``<workdir>/data``); a dataset of precomputed latents (``encode_latents``) gives
    the clip dataset it was made from (its metadata's ``source``). A one-line UserError when none is there."""
    from sora_jax.data.pipeline import dataset_dir, read_metadata

    path = Path(data) if data is not None else dataset_dir(cfg, workdir)
    if not (path / "metadata.json").is_file():
        if data is not None:
            raise UserError(f"--data {path} is not a dataset folder (no metadata.json)")
        raise UserError(
            f"{workdir} has no dataset to evaluate against ({path} is missing): give --data DIR "
            "(clips from sora-jax ingest)"
        )
    meta = read_metadata(path)
    if meta.get("content") != "latents":
        return path
    source = Path(meta.get("source") or "")
    if not (source / "metadata.json").is_file():
        raise UserError(
            f"{path} holds precomputed latents and the clips they came from ({source}) are gone: "
            "give --data DIR (clips from sora-jax ingest)"
        )
    return source


def is_native_size(data_dir: str | Path, split: str) -> bool:
    """Whether a split holds clips of their own sizes (``sora-jax ingest``: an index per split) rather than
    one fixed shape."""
    from sora_jax.data.pipeline import read_metadata

    return bool(_split_entry(read_metadata(data_dir), data_dir, split).get("index"))


def _split_entry(meta: dict, data_dir, split: str) -> dict:
    entry = meta.get("splits", {}).get(split)
    if entry is None:
        raise UserError(f"dataset {data_dir} has no split {split!r}; it has {sorted(meta.get('splits', {}))}")
    return entry


def read_clips(
    data_dir: str | Path, split: str, *, limit: int | None = None, clip: ClipShape | None = None
) -> tuple[np.ndarray, list[str]]:
    """The first ``limit`` clips (all if None) of ``split`` in stored order: (uint8 [N, T, H, W, 3], captions).

    Native-size datasets need ``clip`` and are cut to it (see the module docstring); a fixed-size one is read
    as stored (``clip``, if given, must match it)."""
    from sora_jax.data import pipeline

    data_dir = Path(data_dir)
    meta = pipeline.read_metadata(data_dir)
    entry = _split_entry(meta, data_dir, split)
    if entry.get("index"):
        if clip is None:
            raise UserError(f"{data_dir} holds clips of native sizes: give the shape to cut them to")
        videos, captions = _cut_clips(data_dir, split, entry, clip, limit)
    else:
        videos, captions = [], []
        for batch in pipeline.in_order(data_dir, split, 64):
            videos.append(np.asarray(batch["video"]))
            captions += [str(c) for c in batch["caption"]]
            if limit is not None and len(captions) >= limit:
                break
        videos = np.concatenate(videos) if videos else np.zeros((0, 1, 1, 1, 3), np.uint8)
        if clip is not None and len(videos) and videos.shape[1:4] != (clip.frames, clip.height, clip.width):
            raise UserError(
                f"{data_dir} holds {'x'.join(map(str, videos.shape[1:4]))} clips; the model generates "
                f"{clip.frames}x{clip.height}x{clip.width}: evaluate against data of that size (--data)"
            )
    if not len(videos):
        raise UserError(f"split {split!r} of {data_dir} has no clips to compare with")
    if limit is not None:
        videos, captions = videos[:limit], captions[:limit]
    return videos, captions


def _cut_clips(data_dir: Path, split: str, entry: dict, clip: ClipShape, limit: int | None):
    from sora_jax.data import pipeline
    from sora_jax.data.buckets import Bucket, load_clip, stride_for

    index = np.load(data_dir / entry["index"])  # [N, 4]: frames, height, width, fps
    source = pipeline.open_source(data_dir, split)
    bucket = Bucket(clip.frames, clip.height, clip.width)
    videos, captions = [], []
    for i, (frames, _, _, fps) in enumerate(index):
        if (clip.frames - 1) * stride_for(float(fps), clip.fps) + 1 > frames:
            continue  # too short at the generated frame rate
        video, caption = load_clip(source[i], bucket, target_fps=clip.fps, rng=np.random.default_rng([0, i]))
        videos.append(video)
        captions.append(caption)
        if limit is not None and len(videos) >= limit:
            break
    if not videos:
        raise UserError(
            f"no clip of split {split!r} of {data_dir} is long enough for {clip.frames} frames at {clip.fps:g} fps"
        )
    return np.stack(videos), captions


def sample_clips(
    data_dir: str | Path, split: str, num: int, seed: int, *, clip: ClipShape | None = None
) -> tuple[np.ndarray, list[str]]:
    """``num`` clips of ``split`` drawn without replacement with ``seed`` (kept in stored order): (uint8
    [n, T, H, W, 3], captions), n = min(num, clips)."""
    videos, captions = read_clips(data_dir, split, clip=clip)
    idx = np.sort(np.random.default_rng(seed).choice(len(videos), size=min(num, len(videos)), replace=False))
    return videos[idx], [captions[i] for i in idx]
