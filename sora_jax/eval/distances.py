"""Fréchet distances of generated videos to a dataset: FVD (I3D), FD-digits and per-frame FD (digit reader).

    ref = reference_stats("fvd", data_dir, "test")     # cached in <data_dir>/fd_stats/ after the first call
    distance("fvd", videos, ref)                       # {"value", "count", "ref_count", ...}

``fvd``: the protocol of the original FVD code (google-research/frechet_video_distance, Unterthiner et al.
2018): 16 frames per clip; every frame resized to 224x224 by TF1's ``tf.image.resize_bilinear`` (bilinear,
``align_corners=False`` without half-pixel centres: source coordinate = destination * in/out, clamped at the
last pixel); values 2 * x / 255 - 1; the 400 Kinetics-400 logits of I3D (``sora_jax.eval.i3d``) as features.
Clips longer than 16 frames give their first 16; shorter ones (I3D needs at least 9) are stretched to 16 by
repeating frames (frame i of 16 is frame floor(i * T / 16)), recorded in the statistics as
``frames: "repeat T->16"``: such numbers compare runs of this benchmark, not published FVDs.

``fd_digits``: the bundled digit reader's video features (presence and direction logits and the mean frame
feature, ``DigitReader.embed``): fast, and it sees exactly what the benchmark asks of a video.
``fd_frames``: FID-style, per frame: the reader's pooled per-frame features, one sample per frame.

Reference statistics are computed once per (metric, dataset, split, count) and cached next to the dataset
(``<data_dir>/fd_stats/<metric>_<split>_<count>.npz``) with the sample count and a sha256 of what produced
them (protocol, feature weights, the dataset's metadata and shard sizes); a different hash recomputes them.
"""

from __future__ import annotations

import functools
import hashlib
import json
import logging
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from sora_jax.errors import UserError
from sora_jax.eval.frechet import Stats, frechet_distance, gaussian_stats, load_stats, save_stats

__all__ = [
    "DISTANCES",
    "FVD_FRAMES",
    "FVD_SIZE",
    "distance",
    "features",
    "fvd_clips",
    "fvd_preprocess",
    "reference_stats",
    "resize_matrix",
]

log = logging.getLogger("sora_jax.eval")

FVD_FRAMES = 16
FVD_SIZE = 224
DISTANCES = ("fvd", "fd_digits", "fd_frames")
_PROTOCOL = {
    "fvd": "fvd-v1: 16 frames (first 16 / repeated), TF1 legacy bilinear to 224, 2x/255-1, I3D k400 logits",
    "fd_digits": "fd_digits-v1: digit reader embed() video features",
    "fd_frames": "fd_frames-v1: digit reader embed() per-frame features",
}


def _check_videos(videos: np.ndarray) -> np.ndarray:
    videos = np.asarray(videos)
    if videos.ndim != 5 or videos.shape[-1] != 3 or videos.dtype != np.uint8:
        raise UserError(f"videos must be uint8 [B, T, H, W, 3], got {videos.dtype} {videos.shape}")
    return videos


def fvd_clips(videos: np.ndarray, num_frames: int = FVD_FRAMES) -> tuple[np.ndarray, str]:
    """uint8 [B, T, H, W, 3] -> [B, num_frames, H, W, 3] and how: "first 16" or "repeat T->16" (T < 16)."""
    videos = _check_videos(videos)
    t = videos.shape[1]
    if t >= num_frames:
        return videos[:, :num_frames], f"first {num_frames}"
    idx = (np.arange(num_frames) * t) // num_frames
    return videos[:, idx], f"repeat {t}->{num_frames}"


def resize_matrix(in_size: int, out_size: int) -> np.ndarray:
    """[out, in] float32 weights of TF1's legacy bilinear resize along one axis (no half-pixel centres)."""
    src = np.arange(out_size, dtype=np.float64) * (in_size / out_size)
    lo = np.floor(src).astype(int)
    hi = np.minimum(lo + 1, in_size - 1)
    frac = src - lo
    m = np.zeros((out_size, in_size), np.float64)
    np.add.at(m, (np.arange(out_size), lo), 1.0 - frac)
    np.add.at(m, (np.arange(out_size), hi), frac)
    return m.astype(np.float32)


def fvd_preprocess(clips_BTHWC: jax.Array, size: int = FVD_SIZE) -> jax.Array:
    """uint8 (or float in 0..255) [B, T, H, W, 3] -> float32 [B, T, size, size, 3] in [-1, 1] (see the
    module docstring: TF1 legacy bilinear resize, then 2 x / 255 - 1)."""
    _, _, h, w, _ = clips_BTHWC.shape
    ry, rx = jnp.asarray(resize_matrix(h, size)), jnp.asarray(resize_matrix(w, size))
    x = clips_BTHWC.astype(jnp.float32)
    x = jnp.einsum("oh,bthwc,pw->btopc", ry, x, rx, precision=jax.lax.Precision.HIGHEST)
    return 2.0 * x / 255.0 - 1.0


@functools.cache
def _i3d_fn():
    from sora_jax.eval.i3d import load_i3d

    graphdef, state = nnx.split(load_i3d())

    @jax.jit
    def fn(state, clips):
        return nnx.merge(graphdef, state)(fvd_preprocess(clips))

    return functools.partial(fn, state)


@functools.cache
def _reader_fn():
    from sora_jax.eval.digit_reader import load_reader

    model = load_reader()
    graphdef, state = nnx.split(model)

    @jax.jit
    def fn(state, x):
        return nnx.merge(graphdef, state).embed(x)

    return model.cfg, functools.partial(fn, state)


def _batched(fn, x: np.ndarray, batch_size: int, desc: str | None) -> list:
    """fn over ``x`` in batches of ``batch_size`` (the last one padded: one compiled shape)."""
    outs = []
    for i in tqdm(range(0, len(x), batch_size), desc=desc, disable=desc is None or len(x) <= batch_size):
        chunk = x[i : i + batch_size]
        n = len(chunk)
        if n < batch_size and len(x) > batch_size:
            chunk = np.concatenate([chunk, np.zeros((batch_size - n, *chunk.shape[1:]), chunk.dtype)])
        outs.append(jax.tree.map(lambda a, n=n: np.asarray(a)[:n], fn(jnp.asarray(chunk))))
    return outs


def features(name: str, videos: np.ndarray, *, progress: bool = False) -> tuple[np.ndarray, dict]:
    """Features of uint8 videos [B, T, H, W, 3] for distance ``name``: ([N, F] float64, info); N = B, or
    B * frames for ``fd_frames``. ``info`` says how the clips were taken ({"frames": ...})."""
    videos = _check_videos(videos)
    if name == "fvd":
        clips, how = fvd_clips(videos)
        outs = _batched(_i3d_fn(), clips, 8, "I3D features" if progress else None)
        return np.concatenate(outs).astype(np.float64), {"frames": how}
    if name in ("fd_digits", "fd_frames"):
        from sora_jax.eval.digit_reader import preprocess

        cfg, fn = _reader_fn()
        x = preprocess(videos, cfg)
        outs = _batched(fn, x, 256, "reader features" if progress else None)
        if name == "fd_digits":
            return np.concatenate([o[0] for o in outs]).astype(np.float64), {
                "frames": f"first {cfg.num_frames}"
            }
        frames = np.concatenate([o[1] for o in outs])
        return frames.reshape(-1, frames.shape[-1]).astype(np.float64), {"frames": f"first {cfg.num_frames}"}
    raise UserError(f"unknown distance {name!r}; choose from {', '.join(DISTANCES)}")


def _weights_hash(name: str) -> str:
    if name == "fvd":
        from sora_jax.eval.i3d import weights_sha256

        return weights_sha256()
    from sora_jax.eval.digit_reader import DEFAULT_WEIGHTS

    return hashlib.sha256(DEFAULT_WEIGHTS.read_bytes()).hexdigest()


def _dataset_fingerprint(data_dir: Path, split: str) -> str:
    from sora_jax.data.pipeline import read_metadata

    meta = read_metadata(data_dir)
    if split not in meta.get("splits", {}):
        raise UserError(f"dataset {data_dir} has no split {split!r}; it has {sorted(meta.get('splits', {}))}")
    shards = meta["splits"][split].get("shards", [])
    sizes = {s: (data_dir / s).stat().st_size for s in shards if (data_dir / s).is_file()}
    h = hashlib.sha256((data_dir / "metadata.json").read_bytes())
    h.update(json.dumps(sizes, sort_keys=True).encode())
    return h.hexdigest()


def _split_videos(data_dir: Path, split: str, num: int | None, clip=None) -> np.ndarray:
    from sora_jax.eval.clips import read_clips

    return read_clips(data_dir, split, limit=num, clip=clip)[0]


def reference_stats(
    name: str,
    data_dir: str | Path,
    split: str = "test",
    num: int | None = None,
    *,
    clip=None,
    progress: bool = True,
) -> Stats:
    """Statistics of the first ``num`` clips (all if None) of ``split`` for distance ``name``, cached in
    ``<data_dir>/fd_stats/`` (see the module docstring); ``meta`` holds the hash and the clip count.
    ``clip`` (``eval.clips.ClipShape``): the shape native-size clips are cut to (``eval.clips.read_clips``)."""
    if name not in DISTANCES:
        raise UserError(f"unknown distance {name!r}; choose from {', '.join(DISTANCES)}")
    data_dir = Path(data_dir)
    key = {
        "protocol": _PROTOCOL[name],
        "weights_sha256": _weights_hash(name),
        "dataset": _dataset_fingerprint(data_dir, split),
        "split": split,
        "num": num,
        **({"clip": clip.key()} if clip is not None else {}),
    }
    digest = hashlib.sha256(json.dumps(key, sort_keys=True).encode()).hexdigest()
    at = f"_{clip.key()}" if clip is not None else ""
    path = data_dir / "fd_stats" / f"{name}_{split}_{'all' if num is None else num}{at}.npz"
    if path.is_file():
        cached = load_stats(path)
        if cached.meta.get("hash") == digest:
            return cached
        log.info("reference statistics %s were made by something else (hash differs): recomputing", path)
    videos = _split_videos(data_dir, split, num, clip)
    feats, info = features(name, videos, progress=progress)
    stats = gaussian_stats(feats, {"hash": digest, "videos": len(videos), **info, **key})
    try:
        save_stats(path, stats)
    except OSError as e:  # a read-only dataset folder: still usable, recomputed next time
        log.warning("cannot cache reference statistics at %s (%s)", path, e)
    return stats


def distance(name: str, videos: np.ndarray, reference: Stats, *, progress: bool = False) -> dict:
    """The Fréchet distance ``name`` of uint8 videos [B, T, H, W, 3] to ``reference`` (``reference_stats``):
    {"value", "count" (videos), "samples" (feature vectors), "ref_count" (reference videos), "frames"}."""
    feats, info = features(name, videos, progress=progress)
    if feats.shape[1] != reference.mu.shape[0]:
        raise UserError(f"{name}: features of size {feats.shape[1]} vs reference {reference.mu.shape[0]}")
    if info["frames"] != reference.meta.get("frames", info["frames"]):
        log.warning(
            "%s: clips taken as %s, the reference as %s", name, info["frames"], reference.meta["frames"]
        )
    value = frechet_distance(gaussian_stats(feats), reference)
    return {
        "value": value,
        "count": int(len(videos)),
        "samples": int(len(feats)),
        "ref_count": int(reference.meta.get("videos", reference.count)),
        "frames": info["frames"],
    }
