"""TFDS datasets as clip sources: each example of a prepared TFDS dataset served as a ``records`` record.

``open_tfds_source(name, split, data_dir)`` wraps ``tfds.data_source`` (ArrayRecord files; no TensorFlow
needed to read them) in a random-access source whose items are ``bytes`` in the format of
``sora_jax.data.records``, so the grain pipeline takes it exactly like ``grain.sources.ArrayRecordDataSource``
(``grain.MapDataset.source(src).map(decode_clip)``). It is picklable (it reopens the dataset in each grain
worker) and thread-safe.

Two kinds of video feature are understood, found automatically (the first one in feature order) unless
``video_key`` names one (``"a/b"`` for nested features):

* frames: a sequence of images (``Sequence(Image)``, ``Video``, images inside a ``Sequence`` of dicts such as
  ``bair_robot_pushing_small``'s ``image_main``) or a uint8 tensor [T, H, W, C]; served as
  ``records.encode_clip`` of uint8 [T, H, W, 3] (grey repeated to 3 channels, alpha dropped);
* MP4 bytes: a scalar bytes feature holding an MP4 (``data_pipelines.tfds_video``'s ``captioned_video``);
  served as ``records.encode_encoded_clip`` without re-encoding, its shape and fps taken from the sibling
  features ``num_frames``, ``height``, ``width``, ``fps`` when present (else probed from the MP4).

Captions come from ``caption_key`` (text, or a ClassLabel as "a video of <class name>") or else are the
fixed ``caption``. Needs ``pip install 'sora_jax[tfds]'`` (only ``tensorflow-datasets`` is used here; the
dataset must have been prepared with ``file_format="array_record"``).
"""

from __future__ import annotations

import dataclasses
import enum
import re
import threading
from collections.abc import Iterator, Sequence
from typing import Any, SupportsIndex

import numpy as np

from sora_jax.data import records

__all__ = ["TfdsClipSource", "VideoKind", "open_tfds_source"]

_INSTALL = "pip install 'sora_jax[tfds]'"
_META_KEYS = ("num_frames", "height", "width", "fps")  # per-example metadata read beside an MP4 feature
_MP4_BRANDS = (b"ftyp",)  # ISO BMFF: bytes 4..8 of an MP4 file


class VideoKind(enum.StrEnum):
    """How a dataset stores its video: decoded frames, or the bytes of an MP4."""

    FRAMES = "frames"
    MP4 = "mp4"


def _tfds() -> Any:
    try:
        import tensorflow_datasets as tfds
    except ImportError as e:
        raise ImportError(f"reading TFDS datasets needs tensorflow-datasets ({e}); {_INSTALL}") from e
    return tfds


@dataclasses.dataclass(frozen=True)
class _Leaf:
    """One feature in the (flattened) feature tree; ``in_sequence``: inside a ``Sequence`` of dicts."""

    path: tuple[str, ...]
    feature: Any
    in_sequence: bool
    sequence_length: int | None

    @property
    def key(self) -> str:
        return "/".join(self.path)


def _leaves(feature: Any, tfds: Any) -> list[_Leaf]:
    """Every feature of a dataset that is not a dict, in feature order (a Sequence of dicts is entered)."""
    out: list[_Leaf] = []

    def walk(f: Any, path: tuple[str, ...], in_seq: bool, length: int | None) -> None:
        if isinstance(f, tfds.features.FeaturesDict):
            for k, sub in f.items():
                walk(sub, (*path, k), in_seq, length)
        elif isinstance(f, tfds.features.Sequence) and isinstance(f.feature, tfds.features.FeaturesDict):
            walk(f.feature, path, True, _sequence_length(f))
        else:
            out.append(_Leaf(path, f, in_seq, length))

    walk(feature, (), False, None)
    return out


def _sequence_length(f: Any) -> int | None:
    """The fixed length of a ``Sequence`` feature (None if it varies): the leading dim of its tensors."""
    info = f.get_tensor_info()
    while isinstance(info, dict):
        if not info:
            return None
        info = next(iter(info.values()))
    return info.shape[0]


def _is_tensor(f: Any, tfds: Any) -> bool:
    return isinstance(f, tfds.features.Tensor) and not isinstance(f, tfds.features.Text)


def _is_frame(f: Any, tfds: Any) -> bool:
    """An image feature, or a uint8 tensor [H, W, C]."""
    if isinstance(f, tfds.features.Image):
        return True
    return _is_tensor(f, tfds) and len(f.shape) == 3 and np.dtype(f.np_dtype) == np.uint8


def _frames_shape(leaf: _Leaf, tfds: Any) -> tuple[int | None, int | None, int | None] | None:
    """(T, H, W) from the spec (None where it varies) if ``leaf`` is a sequence of frames, else None."""
    f = leaf.feature
    if leaf.in_sequence and _is_frame(f, tfds):
        return (leaf.sequence_length, *tuple(f.shape[:2]))
    if leaf.in_sequence:
        return None
    if isinstance(f, tfds.features.Sequence) and _is_frame(f.feature, tfds):
        return tuple(f.shape[:3])
    if _is_tensor(f, tfds) and len(f.shape) == 4 and np.dtype(f.np_dtype) == np.uint8:
        return tuple(f.shape[:3])
    return None


def _is_bytes(leaf: _Leaf, tfds: Any) -> bool:
    f = leaf.feature
    return not leaf.in_sequence and _is_tensor(f, tfds) and tuple(f.shape) == () and f.np_dtype == np.object_


def _says_mp4(leaf: _Leaf) -> bool:
    doc = getattr(leaf.feature, "doc", None)
    text = f"{getattr(doc, 'desc', '') or ''} {leaf.path[-1]}".lower()
    return "mp4" in text or "h.264" in text or "h264" in text


def _is_mp4(payload: Any) -> bool:
    return isinstance(payload, bytes | bytearray | memoryview) and bytes(payload[4:8]) in _MP4_BRANDS


def _get(example: Any, path: tuple[str, ...]) -> Any:
    for k in path:
        example = example[k]
    return example


def _to_video(value: Any, where: str) -> np.ndarray:
    """Frames (list of [H, W, C] or an array [T, H, W, C]) -> uint8 [T, H, W, 3]."""
    if isinstance(value, list | tuple) and not value:
        raise ValueError(f"{where}: the video has no frames")
    video = np.asarray(value)
    if video.ndim == 3:  # [T, H, W] grey
        video = video[..., None]
    if video.ndim != 4 or video.dtype != np.uint8 or video.shape[-1] not in (1, 3, 4) or video.shape[0] < 1:
        raise ValueError(f"{where}: expected uint8 frames [T, H, W, 1|3|4], got {video.dtype} {video.shape}")
    if video.shape[-1] == 1:
        video = np.repeat(video, 3, axis=-1)
    elif video.shape[-1] == 4:
        video = video[..., :3]
    return np.ascontiguousarray(video)


def _text(value: Any) -> str:
    if isinstance(value, bytes | np.bytes_):
        return bytes(value).decode("utf-8", errors="replace")
    if isinstance(value, np.ndarray) and value.shape == ():
        return _text(value.item())
    return str(value)


def _class_text(name: str) -> str:
    """A class name as words: "ApplyEyeMakeup" -> "apply eye makeup", "brush_hair" -> "brush hair"."""
    words = re.sub(r"(?<=[a-z0-9])(?=[A-Z])|[_\-]+", " ", name).split()
    return " ".join(w.lower() for w in words)


class TfdsClipSource:
    """Random-access source over a TFDS split; items: ``bytes`` records (``sora_jax.data.records``).

    Use ``open_tfds_source`` to build one. ``len(src)``, ``src[i]``, ``src.__getitems__(keys)``, iteration,
    pickling (the TFDS data source is reopened lazily after unpickling) and ``clip_index()``.
    """

    def __init__(
        self,
        *,
        name: str,
        split: str,
        data_dir: str | None,
        video_path: tuple[str, ...],
        kind: VideoKind,
        spec_shape: tuple[int | None, int | None, int | None],
        caption_path: tuple[str, ...] | None,
        caption_names: list[str] | None,
        caption: str,
        meta_paths: dict[str, tuple[str, ...]],
        source_path: tuple[str, ...] | None,
        fps: float,
        length: int,
        tfds_source: Any = None,
    ):
        self.name, self.split, self.data_dir = name, split, data_dir
        self.video_key = "/".join(video_path)
        self._video_path = video_path
        self.kind = VideoKind(kind)
        self._spec_shape = spec_shape
        self._caption_path = caption_path
        self._caption_names = caption_names
        self._caption = caption
        self._meta_paths = meta_paths
        self._source_path = source_path
        self._fps = float(fps)
        self._len = int(length)
        self._src = tfds_source
        self._lock = threading.Lock()
        self._index: np.ndarray | None = None

    # -- opening ----------------------------------------------------------------------------------------------

    def _source(self) -> Any:
        if self._src is None:
            with self._lock:
                if self._src is None:
                    self._src = _open(self.name, self.split, self.data_dir, download=False)
        return self._src

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_src"] = None
        state["_index"] = None
        del state["_lock"]
        return state

    def __setstate__(self, state: dict[str, Any]) -> None:
        self.__dict__.update(state)
        self._lock = threading.Lock()

    # -- the RandomAccessDataSource protocol --------------------------------------------------------------------

    def __len__(self) -> int:
        return self._len

    def __getitem__(self, index: SupportsIndex) -> bytes:
        i = index.__index__()
        if not -self._len <= i < self._len:
            raise IndexError(f"index {i} out of range for {self!r}")
        i %= self._len
        return self._record(self._source()[i], i)

    def __getitems__(self, indices: Sequence[SupportsIndex]) -> list[bytes]:
        if not indices:
            return []
        keys = [k.__index__() % self._len for k in indices]
        examples = self._source().__getitems__(keys)
        return [self._record(ex, i) for ex, i in zip(examples, keys, strict=True)]

    def __iter__(self) -> Iterator[bytes]:
        for i in range(self._len):
            yield self[i]

    def __repr__(self) -> str:
        return (
            f"TfdsClipSource(name={self.name!r}, split={self.split!r}, data_dir={self.data_dir!r}, "
            f"video_key={self.video_key!r}, kind={self.kind.value!r}, len={self._len})"
        )

    # -- conversion -----------------------------------------------------------------------------------------------

    def _where(self, i: int) -> str:
        return f"{self.name}/{self.split}[{i}] feature {self.video_key!r}"

    def _caption_of(self, example: Any) -> str:
        if self._caption_path is None:
            return self._caption
        value = _get(example, self._caption_path)
        if isinstance(value, list | tuple) or (isinstance(value, np.ndarray) and value.ndim > 0):
            value = value[0]  # a per-step caption inside a Sequence: the first step's
        if self._caption_names is not None:
            return "a video of " + _class_text(self._caption_names[int(value)])
        return _text(value)

    def _meta(self, example: Any) -> dict[str, float]:
        return {k: float(np.asarray(_get(example, p))) for k, p in self._meta_paths.items()}

    def _mp4_info(self, payload: bytes, example: Any, i: int) -> tuple[tuple[int, int, int], float]:
        """((T, H, W), fps) of an MP4 example: from its metadata features, else probed from the bytes."""
        meta = self._meta(example)
        shape = tuple(int(meta.get(k, 0)) for k in ("num_frames", "height", "width"))
        fps = meta.get("fps", 0.0) or self._fps
        if min(shape) < 1 or not fps > 0:
            from sora_jax.data.video_codec import probe

            try:
                t, h, w, probed_fps = probe(payload)
            except Exception as e:  # PyAV raises its own error types for bytes that are not a video
                raise ValueError(f"{self._where(i)}: cannot read the MP4 ({e})") from e
            shape = shape if min(shape) >= 1 else (t, h, w)
            fps = fps or probed_fps
        if not fps > 0:
            raise ValueError(
                f"{self._where(i)}: the clip states no frame rate; pass fps= to open_tfds_source"
            )
        return shape, float(fps)

    def _record(self, example: Any, i: int) -> bytes:
        value = _get(example, self._video_path)
        caption = self._caption_of(example)
        if self.kind is VideoKind.MP4:
            payload = bytes(value)
            shape, fps = self._mp4_info(payload, example, i)
            source = _text(_get(example, self._source_path)) if self._source_path else ""
            return records.encode_encoded_clip(payload, shape=shape, fps=fps, caption=caption, source=source)
        # level 1: this runs on every read; the record is decompressed again right after
        return records.encode_clip(_to_video(value, self._where(i)), caption, level=1)

    # -- index ----------------------------------------------------------------------------------------------------

    def clip_index(self) -> np.ndarray:
        """float32 [N, 4]: (frames, height, width, fps) of every record.

        From the feature shapes when they are fixed (no reading); otherwise one pass over the split reading
        the metadata features (``num_frames``, ``height``, ``width``, ``fps``) or, where there are none, the
        video itself. fps is the dataset's where it has one, else the ``fps`` given to ``open_tfds_source``.
        """
        if self._index is None:
            self._index = self._compute_index()
        return self._index

    def _compute_index(self) -> np.ndarray:
        if all(v is not None for v in self._spec_shape) and "fps" not in self._meta_paths:
            row = np.array([*self._spec_shape, self._fps], np.float32)
            return np.tile(row, (self._len, 1))
        out = np.zeros((self._len, 4), np.float32)
        src = self._source()
        chunk = 64
        for start in range(0, self._len, chunk):
            keys = list(range(start, min(start + chunk, self._len)))
            for i, ex in zip(keys, src.__getitems__(keys), strict=True):
                if self.kind is VideoKind.MP4:
                    (t, h, w), fps = self._mp4_info(bytes(_get(ex, self._video_path)), ex, i)
                else:
                    t, h, w = _to_video(_get(ex, self._video_path), self._where(i)).shape[:3]
                    fps = self._meta(ex).get("fps", 0.0) or self._fps
                out[i] = (t, h, w, fps)
        return out


def _open(name: str, split: str, data_dir: str | None, *, download: bool) -> Any:
    """``tfds.data_source`` with one-line errors for a dataset or split that is not there."""
    tfds = _tfds()
    kwargs: dict[str, Any] = {"split": split, "data_dir": data_dir, "download": download}
    if download:  # TFDS's default TFRecord format has no random access (and needs TensorFlow to write)
        kwargs["builder_kwargs"] = {"file_format": "array_record"}
    how = (
        "prepare it with file_format='array_record' (captioned_video: `python -m data_pipelines.tfds_video`; "
        "TFDS's own datasets: tfds.builder(name, data_dir=..., file_format='array_record')"
        ".download_and_prepare(), which needs TensorFlow) or pass download=True"
    )
    try:
        return tfds.data_source(name, **kwargs)
    except tfds.core.DatasetNotFoundError:
        raise FileNotFoundError(
            f"TFDS dataset {name!r} not found under data_dir={data_dir!r}; {how}"
        ) from None
    except (NotImplementedError, AssertionError):
        # a registered builder without ArrayRecord data: TFDS says "Random access data source for file format
        # tfrecord is not supported" (nothing prepared, or TFRecord only) or "could not find data in ..."
        raise FileNotFoundError(
            f"TFDS dataset {name!r} has no ArrayRecord files under data_dir={data_dir!r}; {how}"
        ) from None
    except ModuleNotFoundError as e:
        if "'tensorflow'" not in str(e):
            raise
        raise ImportError(
            f"TFDS dataset {name!r} has features that need TensorFlow even to read (e.g. "
            f"tfds.features.Video, as in ucf101); {_INSTALL} installs it"
        ) from e


def open_tfds_source(
    name: str,
    split: str,
    data_dir: str | None,
    *,
    video_key: str | None = None,
    caption_key: str | None = None,
    caption: str = "",
    fps: float = 0.0,
    download: bool = False,
) -> TfdsClipSource:
    """A random-access source of ``records`` bytes over ``tfds.data_source(name, split=, data_dir=)``.

    name: a TFDS name (``"moving_mnist"``, ``"captioned_video"``, ``"ucf101/ucf101_1_256"``); data_dir: where
    it was prepared (ArrayRecord); video_key: the video feature (default: the first sequence of images or
    MP4-bytes feature); caption_key: a text or ClassLabel feature to caption with (default: the fixed
    ``caption``); fps: the frame rate to report (and store with MP4 clips) when the dataset has none;
    download: prepare the dataset (ArrayRecord) if absent. Raises ValueError (one line) for a dataset
    without a usable video feature or for bad keys, FileNotFoundError for a dataset that is not prepared.
    """
    tfds = _tfds()
    src = _open(name, split, data_dir, download=download)
    features = src.dataset_info.features
    leaves = _leaves(features, tfds)
    by_key = {leaf.key: leaf for leaf in leaves}
    known = ", ".join(by_key) or "(none)"

    def find(key: str, what: str) -> _Leaf:
        if key in by_key:
            return by_key[key]
        matches = [leaf for leaf in leaves if leaf.path and leaf.path[-1] == key]
        if len(matches) == 1:
            return matches[0]
        raise ValueError(f"{what} {key!r} is not a feature of TFDS dataset {name!r}; its features: {known}")

    first: list[Any] = []  # the first example, read only if a bytes feature has to be sniffed

    def mp4_candidate(leaf: _Leaf) -> bool:
        if not _is_bytes(leaf, tfds):
            return False
        if _says_mp4(leaf):
            return True
        if not first:
            first.append(src[0] if len(src) else None)
        return first[0] is not None and _is_mp4(_get(first[0], leaf.path))

    if video_key is None:
        video = next(
            (leaf for leaf in leaves if _frames_shape(leaf, tfds) is not None or mp4_candidate(leaf)), None
        )
        if video is None:
            raise ValueError(
                f"TFDS dataset {name!r} has no video feature (a sequence of images, a uint8 [T, H, W, C] "
                f"tensor or MP4 bytes); its features: {known}"
            )
    else:
        video = find(video_key, "video_key")
    spec_shape = _frames_shape(video, tfds)
    if spec_shape is not None:
        kind = VideoKind.FRAMES
    elif _is_bytes(video, tfds):
        kind, spec_shape = VideoKind.MP4, (None, None, None)
    else:
        raise ValueError(
            f"feature {video.key!r} of TFDS dataset {name!r} is neither a sequence of images nor MP4 bytes "
            f"({video.feature!r})"
        )

    caption_path, caption_names = None, None
    if caption_key is not None:
        leaf = find(caption_key, "caption_key")
        if isinstance(leaf.feature, tfds.features.ClassLabel):
            caption_names = list(leaf.feature.names)
        elif not (_is_tensor(leaf.feature, tfds) or isinstance(leaf.feature, tfds.features.Text)) or (
            leaf.feature.np_dtype != np.object_
        ):
            raise ValueError(
                f"caption_key {caption_key!r} of TFDS dataset {name!r} must be a text or ClassLabel feature, "
                f"got {leaf.feature!r}"
            )
        caption_path = leaf.path
    if not isinstance(caption, str):
        raise ValueError(f"caption must be a str, got {type(caption).__name__}")

    siblings = {leaf.path: leaf for leaf in leaves if not leaf.in_sequence}
    parent = video.path[:-1]
    meta_paths = {}
    for k in _META_KEYS:
        leaf = siblings.get((*parent, k))
        if leaf is not None and _is_tensor(leaf.feature, tfds) and tuple(leaf.feature.shape) == ():
            meta_paths[k] = leaf.path
    if kind is VideoKind.FRAMES:
        meta_paths = {k: p for k, p in meta_paths.items() if k == "fps"}
    source_leaf = siblings.get((*parent, "source"))
    source_path = (
        source_leaf.path
        if kind is VideoKind.MP4 and source_leaf is not None and source_leaf.feature.np_dtype == np.object_
        else None
    )
    return TfdsClipSource(
        name=name,
        split=split,
        data_dir=None if data_dir is None else str(data_dir),
        video_path=video.path,
        kind=kind,
        spec_shape=spec_shape,
        caption_path=caption_path,
        caption_names=caption_names,
        caption=caption,
        meta_paths=meta_paths,
        source_path=source_path,
        fps=fps,
        length=len(src),
        tfds_source=src,
    )
