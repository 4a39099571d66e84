"""Video files in and out: MP4 (H.264 via PyAV), GIF (Pillow), PNG contact sheets, and decoding.

Every writer is atomic: it writes ``<path>.tmp`` in the destination folder and ``os.replace``-s it onto
``path`` only once the file is complete, so a crash never leaves a half-written video behind.

Videos are ``uint8 [T, H, W, 3]`` (RGB). Tiny videos (the 32x32 moving digits) are upscaled by an integer
factor with nearest-neighbour sampling so that they are viewable; ``scale=None`` picks the smallest factor
that makes the shorter side at least 128 pixels (64 for contact sheets).
"""

from __future__ import annotations

import contextlib
import math
import os
from collections.abc import Iterator, Sequence
from fractions import Fraction
from pathlib import Path

import av
import numpy as np
from PIL import Image, ImageDraw, ImageFont

from sora_jax.data.video_codec import gif_bytes

__all__ = [
    "atomic_target",
    "contact_sheet",
    "default_scale",
    "read_video",
    "save_video",
    "upscale",
    "write_gif",
    "write_mp4",
]

_MP4_MIN_SIDE = 128
_SHEET_MIN_SIDE = 64
_SHEET_GAP = 2  # pixels between frames, rows and around the border of a contact sheet
_CAPTION_H = 14  # pixels of caption strip above each contact-sheet row (0 without captions)


def _check_video(video: np.ndarray, name: str = "video") -> np.ndarray:
    """Returns ``video`` as uint8 [T, H, W, 3] or raises a ValueError naming what is wrong."""
    video = np.asarray(video)
    if video.ndim != 4 or video.shape[-1] != 3:
        raise ValueError(f"{name} must be [T, H, W, 3], got shape {video.shape}")
    if video.dtype != np.uint8:
        raise ValueError(f"{name} must be uint8 (0..255), got {video.dtype}; convert with np.uint8 first")
    if video.shape[0] < 1 or video.shape[1] < 1 or video.shape[2] < 1:
        raise ValueError(f"{name} is empty: shape {video.shape}")
    return video


def default_scale(height: int, width: int, min_side: int = _MP4_MIN_SIDE) -> int:
    """The smallest integer factor that makes ``min(height, width) * factor >= min_side`` (at least 1)."""
    return max(1, math.ceil(min_side / max(1, min(height, width))))


def upscale(video: np.ndarray, scale: int) -> np.ndarray:
    """Nearest-neighbour integer upscaling: [..., H, W, C] -> [..., H*scale, W*scale, C]."""
    if int(scale) != scale or scale < 1:
        raise ValueError(f"scale must be a positive integer, got {scale!r}")
    scale = int(scale)
    if scale == 1:
        return video
    return np.repeat(np.repeat(video, scale, axis=-3), scale, axis=-2)


@contextlib.contextmanager
def atomic_target(path: str | os.PathLike) -> Iterator[Path]:
    """Yields ``<path>.tmp`` (same folder) to write; replaces ``path`` on success, removes it on error."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        with contextlib.suppress(FileNotFoundError):
            tmp.unlink()


def write_mp4(
    path: str | os.PathLike, video: np.ndarray, fps: float = 8, *, scale: int | None = None, crf: int = 18
) -> Path:
    """Writes ``video`` uint8 [T, H, W, 3] as an H.264 (libx264, yuv420p) MP4; returns the path.

    The frames are upscaled by ``scale`` (default: shorter side >= 128) with nearest neighbour, then padded
    with black on the bottom/right to even sizes, which H.264 with yuv420p requires.
    """
    video = _check_video(video)
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    scale = default_scale(*video.shape[1:3]) if scale is None else scale
    frames = upscale(video, scale)
    _, h, w, _ = frames.shape
    pad_h, pad_w = h % 2, w % 2
    if pad_h or pad_w:
        frames = np.pad(frames, ((0, 0), (0, pad_h), (0, pad_w), (0, 0)))
    rate = Fraction(fps).limit_denominator(1001)
    with atomic_target(path) as tmp, av.open(str(tmp), mode="w", format="mp4") as container:
        stream = container.add_stream("libx264", rate=rate)
        stream.width, stream.height = frames.shape[2], frames.shape[1]
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": str(crf)}
        for frame in frames:
            for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                container.mux(packet)
        for packet in stream.encode():
            container.mux(packet)
    return Path(path)


def write_gif(
    path: str | os.PathLike, video: np.ndarray, fps: float = 8, *, scale: int | None = None
) -> Path:
    """Writes ``video`` uint8 [T, H, W, 3] as a looping GIF (Pillow, adaptive palette); returns the path.

    GIF stores at most 256 colours per frame and 10 ms timing steps; Pillow merges consecutive identical
    frames into one longer frame, so a still video reads back with fewer frames.
    """
    video = _check_video(video)
    if fps <= 0:
        raise ValueError(f"fps must be positive, got {fps}")
    scale = default_scale(*video.shape[1:3]) if scale is None else scale
    with atomic_target(path) as tmp:
        Path(tmp).write_bytes(gif_bytes(upscale(video, scale), fps))
    return Path(path)


def save_video(
    path: str | os.PathLike, video: np.ndarray, fps: float = 8, *, scale: int | None = None
) -> Path:
    """Writes an MP4 or a GIF, chosen by the suffix of ``path`` (``.mp4`` or ``.gif``)."""
    suffix = Path(path).suffix.lower()
    if suffix == ".mp4":
        return write_mp4(path, video, fps, scale=scale)
    if suffix == ".gif":
        return write_gif(path, video, fps, scale=scale)
    raise ValueError(f"cannot write video {path}: unknown suffix {suffix!r}; use .mp4 or .gif")


def contact_sheet(
    videos: np.ndarray,
    captions: Sequence[str] | None,
    path: str | os.PathLike,
    *,
    scale: int | None = None,
) -> np.ndarray:
    """Writes a PNG with one row per video (frames left to right), each caption above its row.

    videos: uint8 [B, T, H, W, 3]. Returns the sheet, uint8 [Hs, Ws, 3], with (s = scale, g = 2, c = 14 with
    captions else 0) ``Ws = T*(W*s + g) + g`` and ``Hs = B*(c + H*s + g) + g``.
    """
    videos = np.asarray(videos)
    if videos.ndim != 5:
        raise ValueError(f"videos must be [B, T, H, W, 3], got shape {videos.shape}")
    for i, v in enumerate(videos):
        _check_video(v, name=f"videos[{i}]")
    b, t, h, w, _ = videos.shape
    if captions is not None and len(captions) != b:
        raise ValueError(f"got {len(captions)} captions for {b} videos")
    scale = default_scale(h, w, _SHEET_MIN_SIDE) if scale is None else scale
    big = upscale(videos, scale)
    fh, fw = h * scale, w * scale
    cap_h = _CAPTION_H if captions is not None else 0
    g = _SHEET_GAP
    sheet_w, sheet_h = t * (fw + g) + g, b * (cap_h + fh + g) + g
    sheet = np.full((sheet_h, sheet_w, 3), 32, np.uint8)  # dark grey, so black frames stay visible
    for i in range(b):
        top = g + i * (cap_h + fh + g) + cap_h
        for j in range(t):
            left = g + j * (fw + g)
            sheet[top : top + fh, left : left + fw] = big[i, j]
    image = Image.fromarray(sheet)
    if captions is not None:
        draw = ImageDraw.Draw(image)
        font = ImageFont.load_default()
        for i, caption in enumerate(captions):
            draw.text((g + 1, g + i * (cap_h + fh + g)), str(caption), fill=(255, 255, 255), font=font)
    with atomic_target(path) as tmp:
        image.save(tmp, format="PNG")
    return np.asarray(image)


def read_video(path: str | os.PathLike) -> np.ndarray:
    """Decodes every frame of a video file (MP4, GIF, ...) to uint8 [T, H, W, 3] RGB.

    Raises FileNotFoundError for a missing file and ValueError("cannot decode video <path>: ...") for a file
    that is not a decodable video.
    """
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"no such video file: {path}")
    try:
        with av.open(str(path), mode="r") as container:
            if not container.streams.video:
                raise ValueError("no video stream")
            frames = [f.to_ndarray(format="rgb24") for f in container.decode(video=0)]
    except (av.FFmpegError, ValueError, OSError) as e:
        raise ValueError(f"cannot decode video {path}: {e}") from e
    if not frames:
        raise ValueError(f"cannot decode video {path}: no frames")
    return np.stack(frames).astype(np.uint8)
