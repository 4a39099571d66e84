"""A TFDS builder for captioned video: a folder of videos + a captions CSV -> ArrayRecord files.

Each example stores the clip compactly as the bytes of an H.264 MP4 (``sora_jax.data.video_codec``), with
its caption and ``fps``, ``num_frames``, ``height``, ``width`` and ``source`` (path relative to the folder)::

    video: bytes (MP4, yuv420p)   caption: text   fps: float32   num_frames, height, width: int32   source: text

The CSV has a header with ``video`` (path relative to the folder) and ``caption``, and optionally ``split``
(default ``train``). Inputs are decoded with PyAV, optionally cut to ``max_frames`` and resized, cropped to
even sizes (H.264 with yuv420p needs them) and re-encoded.

Writing and reading need ``tensorflow-datasets`` but not TensorFlow (``file_format="array_record"``, the
default here; TFDS's default TFRecord format needs TensorFlow). Read it back with
``sora_jax.data.tfds_source.open_tfds_source("captioned_video", split, data_dir, caption_key="caption")``
(no import of this module needed: TFDS reads the prepared files on their own).

    python -m data_pipelines.tfds_video --videos DIR --captions DIR/captions.csv --data_dir data/tfds \
        [--max_frames 64] [--height 256 --width 256] [--crf 20] [--fps 0] [--skip_unreadable]

Without ``videos=``/``captions=`` the builder reads them from the download config's ``manual_dir``
(``DIR/captions.csv``). (TFDS's own ``tfds build`` command needs TensorFlow and apache-beam: use this one.)
"""

from __future__ import annotations

import argparse
import logging
import os
import pathlib
from collections.abc import Iterator, Sequence
from typing import Any

import numpy as np

from sora_jax.data.captions import Row, read_captions

try:
    import tensorflow_datasets as tfds
except ImportError as e:  # pragma: no cover - depends on the extras installed
    raise ImportError(
        f"data_pipelines.tfds_video needs tensorflow-datasets ({e}); pip install 'sora_jax[tfds]'"
    ) from e

NAME = "captioned_video"
CAPTIONS_FILE = "captions.csv"  # the default captions file inside manual_dir

log = logging.getLogger(__name__)


def read_video(
    path: str | os.PathLike,
    *,
    max_frames: int = 0,
    size: tuple[int, int] | None = None,
    fps: float = 0.0,
) -> tuple[np.ndarray, float]:
    """Decodes a video file -> (uint8 [T, H, W, 3] RGB with H, W even, fps).

    max_frames: keep the first N frames (0: all); size: (height, width) to resize to (bicubic); fps: the
    rate to use when the file does not state one (0: such a file is an error). Odd sizes lose their last
    row/column. Raises FileNotFoundError / ValueError (naming the file).
    """
    import av

    path = pathlib.Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such video file: {path}")
    kw: dict[str, Any] = {}
    if size is not None:
        h, w = (int(v) for v in size)
        if h < 2 or w < 2 or h % 2 or w % 2:
            raise ValueError(f"read_video: size must be even and >= 2, got {size}")
        kw = {"height": h, "width": w, "interpolation": "BICUBIC"}
    frames: list[np.ndarray] = []
    try:
        with av.open(str(path), mode="r") as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            stream = container.streams.video[0]
            rate = stream.average_rate or stream.guessed_rate
            file_fps = float(rate) if rate else 0.0
            for frame in container.decode(stream):
                frames.append(frame.to_ndarray(format="rgb24", **kw))
                if max_frames and len(frames) >= max_frames:
                    break
    except (av.FFmpegError, OSError, ValueError) as e:
        raise ValueError(f"cannot decode video {path}: {e}") from e
    if not frames:
        raise ValueError(f"cannot decode video {path}: no frames")
    video = np.stack(frames)
    _, h, w, _ = video.shape
    video = video[:, : h - h % 2, : w - w % 2]
    if min(video.shape[1:3]) < 2:
        raise ValueError(f"cannot use video {path}: {h}x{w} is too small")
    out_fps = file_fps if file_fps > 0 else float(fps)
    if not out_fps > 0:
        raise ValueError(f"video {path} does not state its frame rate; pass fps= (--fps) to set one")
    return np.ascontiguousarray(video), out_fps


class CaptionedVideo(tfds.core.GeneratorBasedBuilder):
    """Captioned videos stored as H.264 MP4 bytes (see the module docstring)."""

    VERSION = tfds.core.Version("1.0.0")
    RELEASE_NOTES = {"1.0.0": "First release: MP4 bytes + caption, fps, num_frames, height, width, source."}
    MANUAL_DOWNLOAD_INSTRUCTIONS = (
        f"Put the videos in manual_dir and a {CAPTIONS_FILE} there (header: video, caption[, split]), or pass "
        "videos= and captions= to the builder."
    )
    # Nothing is downloaded, so there are no checksums to look up. TFDS would look for them beside the code
    # through importlib_resources (not installed with tensorflow-datasets on Python >= 3.9) when this module
    # is imported from its package.
    url_infos = None

    def __init__(
        self,
        *,
        videos: str | os.PathLike | None = None,
        captions: str | os.PathLike | None = None,
        max_frames: int = 0,
        size: tuple[int, int] | None = None,
        fps: float = 0.0,
        crf: int = 20,
        skip_unreadable: bool = False,
        **kwargs: Any,
    ):
        """videos: the folder the CSV's paths are relative to; captions: the CSV (default: both from
        manual_dir). The other options go to ``read_video`` and ``encode_mp4``; skip_unreadable logs and skips
        videos that do not decode instead of failing the build. kwargs go to ``tfds.core.DatasetBuilder``
        (data_dir, file_format: default array_record)."""
        kwargs.setdefault("file_format", "array_record")
        self._videos = None if videos is None else pathlib.Path(videos)
        self._captions = None if captions is None else pathlib.Path(captions)
        self._max_frames = int(max_frames)
        self._size = None if size is None else (int(size[0]), int(size[1]))
        self._fps = float(fps)
        self._crf = int(crf)
        self._skip_unreadable = bool(skip_unreadable)
        super().__init__(**kwargs)

    def _info(self) -> tfds.core.DatasetInfo:
        return tfds.core.DatasetInfo(
            builder=self,
            description="Captioned videos; each clip is stored as the bytes of an H.264 MP4 (yuv420p).",
            features=tfds.features.FeaturesDict(
                {
                    "video": tfds.features.Tensor(
                        shape=(), dtype=np.object_, doc="H.264 MP4 bytes (yuv420p, RGB source)"
                    ),
                    "caption": tfds.features.Text(),
                    "fps": tfds.features.Scalar(dtype=np.float32),
                    "num_frames": tfds.features.Scalar(dtype=np.int32),
                    "height": tfds.features.Scalar(dtype=np.int32),
                    "width": tfds.features.Scalar(dtype=np.int32),
                    "source": tfds.features.Text(doc="video path relative to the videos folder"),
                }
            ),
        )

    def _inputs(self, dl_manager: Any) -> tuple[pathlib.Path, pathlib.Path]:
        videos, captions = self._videos, self._captions
        if videos is None or captions is None:
            manual = pathlib.Path(dl_manager.manual_dir)
            videos = videos or manual
            captions = captions or (videos / CAPTIONS_FILE)
        return videos, captions

    def _split_generators(self, dl_manager: Any) -> dict[str, Iterator[tuple[str, dict[str, Any]]]]:
        videos, captions = self._inputs(dl_manager)
        if not videos.is_dir():
            raise FileNotFoundError(f"videos folder {videos} does not exist")
        by_split: dict[str, list[tuple[int, Row]]] = {}
        for i, row in enumerate(read_captions(captions)):  # whole videos: start/end are not used here
            by_split.setdefault(row.split, []).append((i, row))
        return {split: self._generate_examples(videos, rows) for split, rows in sorted(by_split.items())}

    def _generate_examples(
        self, videos: pathlib.Path, rows: Sequence[tuple[int, Row]]
    ) -> Iterator[tuple[str, dict[str, Any]]]:
        from sora_jax.data.video_codec import encode_mp4

        for i, row in rows:
            path = videos / row.video
            try:
                frames, fps = read_video(path, max_frames=self._max_frames, size=self._size, fps=self._fps)
            except (FileNotFoundError, ValueError) as e:
                if not self._skip_unreadable:
                    raise
                log.warning("skipping %s: %s", row.video, e)
                continue
            t, h, w, _ = frames.shape
            yield (
                f"{i:09d}",
                {
                    "video": encode_mp4(frames, fps, crf=self._crf),
                    "caption": row.caption,
                    "fps": np.float32(fps),
                    "num_frames": np.int32(t),
                    "height": np.int32(h),
                    "width": np.int32(w),
                    "source": row.video,
                },
            )


def build(
    videos: str | os.PathLike,
    captions: str | os.PathLike,
    data_dir: str | os.PathLike,
    **options: Any,
) -> tfds.core.DatasetBuilder:
    """Prepares ``captioned_video`` (ArrayRecord) under ``data_dir``; options: see ``CaptionedVideo``.

    Returns the builder (``builder.info.splits`` lists the splits); returns at once if already prepared.
    """
    builder = CaptionedVideo(videos=videos, captions=captions, data_dir=os.fspath(data_dir), **options)
    builder.download_and_prepare(
        download_config=tfds.download.DownloadConfig(try_download_gcs=False, manual_dir=os.fspath(videos))
    )
    return builder


def main(argv: Sequence[str] | None = None) -> None:
    """Command line: build ``captioned_video`` from a videos folder and a captions CSV."""
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--videos", required=True, help="folder the CSV's video paths are relative to")
    p.add_argument("--captions", required=True, help="CSV with header video,caption[,split]")
    p.add_argument(
        "--data_dir", required=True, help="TFDS data_dir to write <data_dir>/captioned_video/1.0.0"
    )
    p.add_argument("--max_frames", type=int, default=0, help="keep the first N frames of each video (0: all)")
    p.add_argument("--height", type=int, default=0, help="resize to this height (with --width; 0: native)")
    p.add_argument("--width", type=int, default=0)
    p.add_argument("--fps", type=float, default=0.0, help="rate for files that state none (0: error)")
    p.add_argument("--crf", type=int, default=20, help="H.264 quality (lower: better, larger)")
    p.add_argument("--skip_unreadable", action="store_true", help="skip videos that do not decode")
    a = p.parse_args(argv)
    if (a.height > 0) != (a.width > 0):
        p.error("--height and --width go together")
    builder = build(
        a.videos,
        a.captions,
        a.data_dir,
        max_frames=a.max_frames,
        size=(a.height, a.width) if a.height > 0 else None,
        fps=a.fps,
        crf=a.crf,
        skip_unreadable=a.skip_unreadable,
    )
    splits = {name: info.num_examples for name, info in builder.info.splits.items()}
    print(f"{builder.data_dir}: {splits}")


if __name__ == "__main__":
    main()
