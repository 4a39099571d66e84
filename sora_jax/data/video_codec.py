"""Compressed clips in memory: H.264 MP4 bytes <-> frames, with frame selection and resizing at decode.

Ingested datasets (``sora-jax ingest``) store each clip as the bytes of a small MP4 (libx264, yuv420p) rather
than raw pixels: 10-50x smaller. The loader decodes only the frames it samples and lets FFmpeg's swscale
resize them on the way out (``frame.to_ndarray(width=, height=)``), so a 1080p source costs one decode and
no full-size copy in Python.

Also the two in-memory encodings the writers share: ``gif_bytes`` (an animated GIF, for files and TensorBoard)
and ``tile_videos`` (many clips as one grid video).
"""

from __future__ import annotations

import io
from collections.abc import Sequence
from fractions import Fraction

import av
import numpy as np

__all__ = ["decode_frames", "encode_mp4", "probe"]


def encode_mp4(frames: np.ndarray, fps: float, *, crf: int = 20, preset: str = "veryfast") -> bytes:
    """frames uint8 [T, H, W, 3] (H, W even) -> the bytes of an H.264 MP4 at ``fps``."""
    frames = np.asarray(frames)
    if frames.ndim != 4 or frames.shape[-1] != 3 or frames.dtype != np.uint8 or frames.shape[0] < 1:
        raise ValueError(
            f"encode_mp4: frames must be uint8 [T>=1, H, W, 3], got {frames.dtype} {frames.shape}"
        )
    _, h, w, _ = frames.shape
    if h % 2 or w % 2:
        raise ValueError(f"encode_mp4: H.264 with yuv420p needs even sizes, got {h}x{w}")
    if not fps > 0:
        raise ValueError(f"encode_mp4: fps must be positive, got {fps}")
    buf = io.BytesIO()
    with av.open(buf, mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=Fraction(fps).limit_denominator(1001))
        stream.width, stream.height, stream.pix_fmt = w, h, "yuv420p"
        stream.options = {"crf": str(crf), "preset": preset}
        for frame in frames:
            container.mux(stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        container.mux(stream.encode())
    return buf.getvalue()


def probe(payload: bytes) -> tuple[int, int, int, float]:
    """(frames, height, width, fps) of an MP4 in memory, counting frames by decoding (exact)."""
    with av.open(io.BytesIO(payload), mode="r") as container:
        stream = container.streams.video[0]
        n = sum(1 for _ in container.decode(stream))
        return n, stream.height, stream.width, float(stream.average_rate or 0)


def decode_frames(
    payload: bytes,
    indices: Sequence[int] | None = None,
    size: tuple[int, int] | None = None,
) -> np.ndarray:
    """Decodes an MP4 in memory -> uint8 [n, H, W, 3] RGB.

    indices: the frames to keep, ascending, repeats allowed (default: all); size: (height, width) to resize
    to with bicubic swscale (default: native). Raises ValueError if an index is past the last frame or the
    bytes do not decode.
    """
    want = None if indices is None else np.asarray(indices, np.int64)
    if want is not None and (want.ndim != 1 or (want.size and (want[0] < 0 or np.any(np.diff(want) < 0)))):
        raise ValueError(f"decode_frames: indices must be ascending and >= 0, got {want.tolist()}")
    kw = {} if size is None else {"height": int(size[0]), "width": int(size[1]), "interpolation": "BICUBIC"}
    out: list[np.ndarray] = []
    try:
        with av.open(io.BytesIO(payload), mode="r") as container:
            pos = 0
            for i, frame in enumerate(container.decode(video=0)):
                if want is None:
                    out.append(frame.to_ndarray(format="rgb24", **kw))
                    continue
                if pos >= want.size:
                    break
                if want[pos] == i:
                    image = frame.to_ndarray(format="rgb24", **kw)
                    while pos < want.size and want[pos] == i:
                        out.append(image)
                        pos += 1
    except (av.FFmpegError, OSError) as e:
        raise ValueError(f"cannot decode clip payload: {e}") from e
    if want is not None and len(out) < want.size:
        raise ValueError(f"clip has fewer frames than needed: index {int(want[len(out)])} is past its end")
    if not out:
        raise ValueError("cannot decode clip payload: no frames")
    return np.stack(out)


def gif_bytes(video: np.ndarray, fps: float) -> bytes:
    """uint8 ``[T, H, W, 3]`` as a looping animated GIF (adaptive palette, no dither; Pillow merges consecutive
    identical frames into one longer frame; 10 ms timing steps)."""
    from PIL import Image

    frames = [
        Image.fromarray(f).quantize(colors=256, method=Image.Quantize.MEDIANCUT, dither=Image.Dither.NONE)
        for f in video
    ]
    buf = io.BytesIO()
    frames[0].save(
        buf,
        format="GIF",
        save_all=True,
        append_images=frames[1:],
        duration=max(10, round(1000 / fps)),
        loop=0,
        disposal=1,
    )
    return buf.getvalue()


def tile_videos(videos: np.ndarray, cols: int, gap: int, fill: int, *, border: bool = False) -> np.ndarray:
    """uint8 ``[B, T, H, W, 3]`` in ``cols`` columns (R = ceil(B / cols) rows) -> one ``[T, Hg, Wg, 3]``:
    ``gap`` pixels of grey ``fill`` between clips (and around them with ``border``), empty cells ``fill``;
    ``Hg = R * (H + gap) - gap (+ 2 * gap with border)``, likewise ``Wg``."""
    b, t, h, w, _ = videos.shape
    rows, edge = -(-b // cols), gap if border else 0
    grid = np.full(
        (t, rows * (h + gap) - gap + 2 * edge, cols * (w + gap) - gap + 2 * edge, 3), fill, np.uint8
    )
    for i in range(b):
        top, left = edge + (i // cols) * (h + gap), edge + (i % cols) * (w + gap)
        grid[:, top : top + h, left : left + w] = videos[i]
    return grid
