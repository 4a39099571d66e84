"""The record codec shared by every dataset: one clip (video + caption + optional labels) <-> bytes.

Layout of one record (no pickle, readable from any language)::

    b"SJC1" | uint32 little-endian header length | JSON header (utf-8) | zlib(raw uint8 video bytes)

An *encoded* record (``sora-jax ingest``) carries the bytes of an H.264 MP4 instead (``codec: "h264"``, not
zlib-compressed), plus ``fps``, ``source`` (the video's path) and ``start`` seconds, and the captions row's
``license`` and ``data_source`` when it gives them; ``decode_clip`` decodes all its frames and
``read_record`` hands the loader the header and the MP4 bytes so it decodes only the frames it samples.

The header holds ``shape`` [T, H, W, C], ``dtype`` ("uint8" for a video [T, H, W, 3]; "float16" or
"float32" for precomputed latents [T', H', W', Z], which decode under the key ``latents``), ``caption``, ``digits`` and ``directions``
(two ints each, -1 where absent) and ``payload_bytes`` (length of the compressed video). ArrayRecord
shards written by ``data_pipelines`` and ``sora-jax ingest`` store one such record per clip.
"""

from __future__ import annotations

import json
import struct
import zlib
from typing import Any

import numpy as np

MAGIC = b"SJC1"
_LEN = struct.Struct("<I")
NUM_LABELS = 2  # objects per clip that carry (digit, direction) labels; -1 pads


def _labels(x: Any, name: str) -> list[int]:
    if x is None:
        return [-1] * NUM_LABELS
    a = np.asarray(x, dtype=np.int64).reshape(-1)
    if a.size > NUM_LABELS:
        raise ValueError(f"encode_clip: {name} has {a.size} entries, at most {NUM_LABELS} are stored")
    return [int(v) for v in a] + [-1] * (NUM_LABELS - a.size)


def encode_clip(
    video: np.ndarray,
    caption: str,
    digits: np.ndarray | None = None,
    directions: np.ndarray | None = None,
    *,
    level: int = 6,
) -> bytes:
    """Encodes a clip. video: uint8 [T, H, W, 3]; digits, directions: int [<=2] or None (-> -1s)."""
    video = np.asarray(video)
    is_latent = video.dtype in (np.float16, np.float32)
    if video.ndim != 4 or not (is_latent or (video.dtype == np.uint8 and video.shape[-1] == 3)):
        raise ValueError(
            f"encode_clip: video must be uint8 [T, H, W, 3] or float16/32 latents [T, H, W, Z], "
            f"got {video.dtype} {video.shape}"
        )
    if not isinstance(caption, str):
        raise ValueError(f"encode_clip: caption must be a str, got {type(caption).__name__}")
    payload = zlib.compress(np.ascontiguousarray(video).tobytes(), level)
    header = {
        "shape": list(video.shape),
        "dtype": str(video.dtype),
        "caption": caption,
        "digits": _labels(digits, "digits"),
        "directions": _labels(directions, "directions"),
        "payload_bytes": len(payload),
    }
    h = json.dumps(header, separators=(",", ":")).encode("utf-8")
    return MAGIC + _LEN.pack(len(h)) + h + payload


def encode_encoded_clip(
    payload: bytes,
    *,
    shape: tuple[int, int, int],
    fps: float,
    caption: str,
    source: str = "",
    start: float = 0.0,
    codec: str = "h264",
    license: str | None = None,
    data_source: str | None = None,
) -> bytes:
    """A record holding an encoded clip: payload = MP4 bytes of ``shape`` (T, H, W) frames at ``fps``;
    ``license`` / ``data_source`` (where the video came from) go into the header when given."""
    if not isinstance(caption, str):
        raise ValueError(f"encode_encoded_clip: caption must be a str, got {type(caption).__name__}")
    t, h, w = (int(v) for v in shape)
    if min(t, h, w) < 1 or not fps > 0:
        raise ValueError(f"encode_encoded_clip: need T, H, W >= 1 and fps > 0, got {shape} at {fps} fps")
    header = {
        "shape": [t, h, w, 3],
        "dtype": "uint8",
        "codec": codec,
        "fps": float(fps),
        "caption": caption,
        "source": source,
        "start": float(start),
        "digits": [-1] * NUM_LABELS,
        "directions": [-1] * NUM_LABELS,
        "payload_bytes": len(payload),
    }
    header |= {k: v for k, v in (("license", license), ("data_source", data_source)) if v is not None}
    h_bytes = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode("utf-8")
    return MAGIC + _LEN.pack(len(h_bytes)) + h_bytes + bytes(payload)


def read_record(b: bytes) -> tuple[dict[str, Any], bytes]:
    """(header, payload) of a record, checked for completeness; the payload is not decompressed/decoded."""
    b = bytes(b)
    if len(b) < len(MAGIC) + _LEN.size or b[: len(MAGIC)] != MAGIC:
        raise ValueError(
            f"corrupt clip record: missing the {MAGIC!r} magic ({len(b)} bytes); "
            "was it written by sora_jax.data.records.encode_clip?"
        )
    (hlen,) = _LEN.unpack_from(b, len(MAGIC))
    start = len(MAGIC) + _LEN.size
    if start + hlen > len(b):
        raise ValueError(f"corrupt clip record: header of {hlen} bytes runs past the record ({len(b)} bytes)")
    try:
        header = json.loads(b[start : start + hlen].decode("utf-8"))
        header["shape"] = [int(s) for s in header["shape"]]
        payload_len = int(header["payload_bytes"])
        str(header["caption"])
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"corrupt clip record: unreadable header ({e})") from e
    payload = b[start + hlen :]
    if len(payload) != payload_len:
        raise ValueError(
            f"corrupt clip record: video payload is {len(payload)} bytes, header says {payload_len}"
        )
    return header, payload


def decode_clip(b: bytes) -> dict[str, Any]:
    """Decodes a record -> {video uint8 [T,H,W,3] (or latents float32), caption str, digits int32 [2],
    directions int32 [2]}.

    Raises ValueError (saying what is wrong) on anything that is not a complete, valid record.
    """
    header, payload = read_record(b)
    shape = tuple(header["shape"])
    caption = header["caption"]
    try:
        digits = np.asarray(header["digits"], np.int32)
        directions = np.asarray(header["directions"], np.int32)
    except (KeyError, TypeError, ValueError) as e:
        raise ValueError(f"corrupt clip record: unreadable header ({e})") from e
    if "codec" in header:
        from sora_jax.data.video_codec import decode_frames

        if header["codec"] != "h264":
            raise ValueError(f"corrupt clip record: unsupported codec {header['codec']!r}")
        video = decode_frames(payload)
        return {"video": video, "caption": caption, "digits": digits, "directions": directions}
    dtype = header.get("dtype")
    if dtype not in ("uint8", "float16", "float32") or len(shape) != 4:
        raise ValueError(f"corrupt clip record: unsupported dtype/shape {dtype} {shape}")
    try:
        raw = zlib.decompress(payload)
    except zlib.error as e:
        raise ValueError(f"corrupt clip record: video payload does not decompress ({e})") from e
    if len(raw) != int(np.prod(shape)) * np.dtype(dtype).itemsize:
        raise ValueError(f"corrupt clip record: {len(raw)} bytes do not fill shape {shape} of {dtype}")
    array = np.frombuffer(raw, dtype).reshape(shape).copy()  # writable
    if dtype != "uint8":
        return {
            "latents": array.astype(np.float32),
            "caption": caption,
            "digits": digits,
            "directions": directions,
        }
    return {"video": array, "caption": caption, "digits": digits, "directions": directions}
