"""One video -> clips for ``sora-jax ingest``: decode with PyAV, cut a row's segment (or the whole video) into
consecutive ``clip_seconds`` pieces at the source fps, downscale a short side above ``max_short_side``, crop
to even sizes, and encode each piece as H.264 (``sora_jax.data.video_codec``). A video that cannot give clips
raises ``SkipVideo`` with the reason that ``report.json`` records.
"""

from __future__ import annotations

import dataclasses
import math
import os
import pathlib
from collections.abc import Iterator

import numpy as np

from sora_jax.data.captions import Row
from sora_jax.errors import UserError


@dataclasses.dataclass(frozen=True)
class ClipOptions:
    clip_seconds: float = 4.0
    min_frames: int = 8
    max_short_side: int = 720
    crf: int = 20

    def check(self) -> None:
        if not (math.isfinite(self.clip_seconds) and self.clip_seconds > 0):
            raise UserError(f"--clip_seconds must be > 0, got {self.clip_seconds}")
        if self.min_frames < 1:
            raise UserError(f"--min_frames must be >= 1, got {self.min_frames}")
        if self.max_short_side < 2:
            raise UserError(f"--max_short_side must be >= 2, got {self.max_short_side}")
        if not 0 <= self.crf <= 51:
            raise UserError(f"--crf must be in [0, 51] (H.264), got {self.crf}")


class SkipVideo(Exception):
    """A video that cannot give clips; the message is the reason recorded in report.json."""


def output_size(height: int, width: int, max_short_side: int) -> tuple[tuple[int, int], tuple[int, int]]:
    """((resize H, W), (stored H, W)) of a source frame: downscaled (aspect kept) only when the short side
    exceeds ``max_short_side``, then cropped to even sizes."""
    short = min(height, width)
    if short > max_short_side:
        s = max_short_side / short
        rh = max_short_side if height <= width else round(height * s)
        rw = max_short_side if width < height else round(width * s)
    else:
        rh, rw = height, width
    return (rh, rw), (rh - rh % 2, rw - rw % 2)


def av_reason(e: BaseException) -> str:
    msg = getattr(e, "strerror", None) or str(e) or type(e).__name__
    return str(msg).splitlines()[0]


def video_clips(
    path: str | os.PathLike, row: Row, opts: ClipOptions
) -> Iterator[tuple[np.ndarray, float, float]]:
    """Decodes ``path`` (the row's segment, or all of it) -> (frames uint8 [T, H, W, 3], fps, start seconds)
    per clip, in time order. The frames array is a reused buffer: copy or consume it before the next clip.

    Raises SkipVideo (the reason) when the file is missing, unreadable or too short.
    """
    import av

    path = pathlib.Path(path)
    if not path.is_file():
        raise SkipVideo("file not found")
    try:
        container = av.open(str(path), mode="r")
    except (av.FFmpegError, OSError) as e:
        raise SkipVideo(f"cannot open as a video: {av_reason(e)}") from None
    with container:
        if not container.streams.video:
            raise SkipVideo("no video stream")
        stream = container.streams.video[0]
        rate = stream.average_rate or stream.guessed_rate or stream.base_rate
        fps = float(rate) if rate else 0.0
        if not (math.isfinite(fps) and fps > 0):
            raise SkipVideo("unknown frame rate")
        clip_len = max(1, round(opts.clip_seconds * fps))
        if clip_len < opts.min_frames:
            raise SkipVideo(
                f"--clip_seconds {opts.clip_seconds:g} at {fps:g} fps is {clip_len} frames < "
                f"--min_frames {opts.min_frames}"
            )
        # default (slice) threading: frame threading hides decode errors of truncated files; processes
        # (--workers) give the parallelism
        tb = stream.time_base
        t0 = float(stream.start_time * tb) if stream.start_time is not None and tb else 0.0
        start = row.start or 0.0
        end = math.inf if row.end is None else row.end
        half = 0.5 / fps
        if start > 0 and tb:
            try:
                container.seek(int((start + t0) / tb), stream=stream, backward=True, any_frame=False)
            except av.FFmpegError:
                container.seek(0, stream=stream)  # unseekable: decode from the start
        buf: np.ndarray | None = None
        sizes: tuple[tuple[int, int], tuple[int, int]] | None = None
        n = total = 0
        clip_start = 0.0
        t = start if start > 0 else 0.0
        try:
            for frame in container.decode(stream):
                t = frame.time - t0 if frame.time is not None else t + 1.0 / fps
                if t < start - half:
                    continue
                if t >= end - half:
                    break
                if sizes is None:
                    if min(frame.height, frame.width) < 2:
                        raise SkipVideo(f"frames are {frame.height}x{frame.width}, too small")
                    sizes = output_size(frame.height, frame.width, opts.max_short_side)
                    buf = np.empty((clip_len, *sizes[1], 3), np.uint8)
                (rh, rw), (h, w) = sizes
                if (rh, rw) == (frame.height, frame.width):
                    image = frame.to_ndarray(format="rgb24")
                else:
                    image = frame.to_ndarray(format="rgb24", width=rw, height=rh, interpolation="AREA")
                if n == 0:
                    clip_start = t
                buf[n] = image[:h, :w]
                n += 1
                total += 1
                if n == clip_len:
                    yield buf, fps, clip_start
                    n = 0
        except av.FFmpegError as e:
            raise SkipVideo(f"decode error after {total} frames: {av_reason(e)}") from None
        if total < opts.min_frames:
            if total == 0 and row.start is not None:
                if stream.duration and tb:
                    length = f"{float(stream.duration * tb):.3g} s long"
                elif container.duration:
                    length = f"{container.duration / 1e6:.3g} s long"
                else:
                    length = "of unknown length"
                raise SkipVideo(f"no frames in the segment from {start:g} s (the video is {length})")
            if total == 0:
                raise SkipVideo("no frames decoded")
            raise SkipVideo(f"too short: {total} frames < --min_frames {opts.min_frames}")
        if n >= opts.min_frames:
            yield buf[:n], fps, clip_start


def encode_video(path: str | os.PathLike, row: Row, opts: ClipOptions) -> list[tuple[bytes, list[float]]]:
    """All clips of one row as (record bytes, index row [frames, height, width, fps]); SkipVideo if none.

    A video is all or nothing: a decode error half-way skips it (its earlier clips are dropped)."""
    from sora_jax.data.records import encode_encoded_clip
    from sora_jax.data.video_codec import encode_mp4

    out = []
    for frames, fps, start in video_clips(path, row, opts):
        t, h, w = frames.shape[:3]
        payload = encode_mp4(frames, fps, crf=opts.crf)
        record = encode_encoded_clip(
            payload,
            shape=(t, h, w),
            fps=fps,
            caption=row.caption,
            source=row.video,
            start=round(start, 6),
            license=row.license,
            data_source=row.source,
        )
        out.append((record, [float(t), float(h), float(w), float(fps)]))
    return out
