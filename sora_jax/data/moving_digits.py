"""The bundled moving-digits dataset: clips of 1-2 handwritten digits moving and bouncing, with captions.

Owns the generator (``generate``: numpy arrays in memory; the caption grammar, ``caption`` / ``parse_prompt``,
lives in ``sora_jax.data.digit_captions`` and is re-exported here), and the on-disk
build (``build``: ArrayRecord shards + ``metadata.json`` + the data card ``datacard.json``, written atomically).

Source glyphs are the 1797 8x8 digits of ``sklearn.datasets.load_digits``: even indices feed train clips,
odd indices test clips, so test clips show unseen handwriting. Each object moves in one of 8 directions
(``DIRECTIONS``; the label is the *initial* direction, objects bounce off the walls). Ten (digit, direction)
pairs (``HELD_OUT``) never appear in train clips and every test clip contains at least one of them, which
measures compositional generalisation.

Every clip is counted under ``LICENSE`` and ``SOURCE`` in the data card; ``LICENSE_NOTE`` says where the
glyphs' licence comes from (scikit-learn's BSD-3-Clause copy of UCI's CC BY 4.0 optdigits test set).

    python -m data_pipelines.moving_digits --out data/moving_digits --num_train 6000 --num_test 512 \
        --num_frames 8 --height 32 --width 32 --fps 8 --seed 0
"""

from __future__ import annotations

import functools
import gzip
import importlib.util
import json
import os
import pathlib
import secrets
import shutil
from typing import Any

import numpy as np

from sora_jax.data import datacard
from sora_jax.data.digit_captions import (  # noqa: F401  (the caption grammar, re-exported)
    DIRECTION_VECTORS,
    DIRECTIONS,
    MAX_OBJECTS,
    NUMBER_WORDS,
    caption,
    parse_prompt,
)

GENERATOR = "moving_digits"
VERSION = 1

# (digit, direction id) pairs never seen in training; one per digit.
HELD_OUT_DIRECTION = tuple((3 * d + 1) % 8 for d in range(10))
HELD_OUT = frozenset((d, HELD_OUT_DIRECTION[d]) for d in range(10))

LICENSE = "BSD-3-Clause (scikit-learn digits)"
SOURCE = "sklearn.datasets.load_digits, synthetic motion"
LICENSE_NOTE = (
    "Glyphs: the 1797 8x8 digits of sklearn.datasets.load_digits, shipped in scikit-learn's BSD-3-Clause "
    "distribution (no separate licence stated for the data). scikit-learn's description says they are a copy "
    "of the test set of the UCI 'Optical Recognition of Handwritten Digits' dataset (E. Alpaydin, C. Kaynak, "
    "1998), which the UCI repository lists under CC BY 4.0: attribute it. Motion, composition and captions "
    "are synthetic (this generator)."
)

SPLITS = ("train", "test")
_SPLIT_ID = {"train": 0, "test": 1}
INTERPOLATIONS = ("nearest", "bilinear")

# ----------------------------------------------------------------------------------------------------------
# Generation


def _resize_matrix(size: int, src: int, interpolation: str) -> np.ndarray:
    """[size, src] matrix M so that M @ img @ M.T resizes a [src, src] image to [size, size]."""
    centers = (np.arange(size) + 0.5) * src / size
    m = np.zeros((size, src), np.float64)
    if interpolation == "nearest":
        m[np.arange(size), np.clip(np.floor(centers).astype(int), 0, src - 1)] = 1.0
    elif interpolation == "bilinear":
        pos = np.clip(centers - 0.5, 0, src - 1)
        i0 = np.floor(pos).astype(int)
        i1 = np.minimum(i0 + 1, src - 1)
        w = pos - i0
        np.add.at(m, (np.arange(size), i0), 1 - w)
        np.add.at(m, (np.arange(size), i1), w)
    else:
        raise ValueError(f"interpolation must be one of {INTERPOLATIONS}, got {interpolation!r}")
    return m


@functools.lru_cache(maxsize=1)
def uci_digits() -> tuple[np.ndarray, np.ndarray]:
    """scikit-learn's bundled 8x8 digits, as ``sklearn.datasets.load_digits`` returns them: images float64
    [1797, 8, 8] (0..16), labels int [1797]; read from the package's CSV file without importing scikit-learn
    (whose import, seconds on a CPU, is most of what building the demo's data cost)."""
    spec = importlib.util.find_spec("sklearn")
    if spec is None or not spec.submodule_search_locations:
        raise ModuleNotFoundError("the bundled digits need scikit-learn: pip install scikit-learn")
    path = pathlib.Path(spec.submodule_search_locations[0]) / "datasets" / "data" / "digits.csv.gz"
    with gzip.open(path, "rt") as fh:
        data = np.loadtxt(fh, delimiter=",")
    return data[:, :-1].reshape(-1, 8, 8), data[:, -1].astype(int)


def _source_glyphs(split: str, size: int, interpolation: str) -> tuple[np.ndarray, np.ndarray]:
    """The split's source digits resized: glyphs uint8 [G, size, size] (0..255), labels int [G], sorted."""
    images, target = uci_digits()
    idx = np.arange(len(target))[_SPLIT_ID[split] :: 2]
    idx = idx[np.argsort(target[idx], kind="stable")]
    m = _resize_matrix(size, 8, interpolation)
    g = np.einsum("ia,nab,jb->nij", m, images[idx], m) * (255.0 / 16.0)
    return np.clip(np.rint(g), 0, 255).astype(np.uint8), target[idx].astype(np.int64)


def _sample_objects(
    rng: np.random.Generator, split: str, n: int, two_fraction: float = 0.5
) -> tuple[np.ndarray, np.ndarray]:
    """digits, directions int32 [n, 2] (-1 padded): train avoids HELD_OUT, test has >= 1 HELD_OUT object;
    a clip holds two objects with probability ``two_fraction``."""
    held = np.asarray(HELD_OUT_DIRECTION)
    two = rng.random(n) < two_fraction
    d1 = rng.integers(0, 10, n)
    if split == "train":  # uniform over the 7 allowed directions of the digit
        k = rng.integers(0, 7, n)
        k1 = k + (k >= held[d1])
    else:
        k1 = held[d1]
    d2 = (d1 + rng.integers(1, 10, n)) % 10  # a different digit
    if split == "train":
        k = rng.integers(0, 7, n)
        k2 = k + (k >= held[d2])
    else:
        k2 = rng.integers(0, 8, n)
    digits = np.stack([d1, np.where(two, d2, -1)], 1)
    directions = np.stack([k1, np.where(two, k2, -1)], 1)
    swap = two & (rng.random(n) < 0.5)  # the held-out object is not always first
    digits[swap] = digits[swap, ::-1]
    directions[swap] = directions[swap, ::-1]
    return digits.astype(np.int32), directions.astype(np.int32)


def _reflect(p: np.ndarray, limit: np.ndarray) -> np.ndarray:
    """Folds positions into [0, limit] as a ball bouncing between walls (limit broadcastable to p)."""
    limit = np.broadcast_to(limit, p.shape)
    safe = np.maximum(limit, 1e-9)
    q = np.mod(p, 2 * safe)
    return np.where(limit > 0, np.where(q > safe, 2 * safe - q, q), 0.0)


def _trajectories(
    rng: np.random.Generator,
    directions: np.ndarray,
    num_frames: int,
    limits: np.ndarray,
    size: int,
    speed: tuple[float, float] | None = None,
    min_gap: float = 0.0,
) -> np.ndarray:
    """Top-left corners int [n, 2, T, 2] (y, x) for objects moving in ``directions`` [n, 2].

    Speed is uniform in ``speed`` = (min, max) px/frame, by default [L/T, 2L/T] (L = free travel, at least
    1.5 px/frame); starts leave two frames of travel before the first bounce, and the two objects of a clip
    start >= size/2 apart. ``min_gap`` > 0: both objects are drawn again (up to 256 times) until their
    corners are >= min_gap px apart (max-norm) in *every* frame; a clip where no draw reaches it keeps
    the draw whose closest approach was widest.
    """
    n = directions.shape[0]
    travel = float(limits.min())
    if speed is None:
        lo = max(1.5, travel / num_frames)  # diagonal components >= 1 px/frame
        hi = max(lo, 2 * travel / num_frames)
    else:
        lo, hi = float(speed[0]), float(speed[1])
    vec = DIRECTION_VECTORS[np.maximum(directions, 0)]  # [n, 2, 2]

    def sample(count: int, vec_: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        v = rng.uniform(lo, hi, (count, 1)) * vec_  # [count, 2]
        free = np.minimum(limits, 2 * np.abs(v))
        start_lo = np.where(v < 0, free, 0.0)
        start_hi = np.where(v > 0, limits - free, limits)
        return start_lo + rng.random((count, 2)) * (start_hi - start_lo), v

    p0 = np.zeros((n, MAX_OBJECTS, 2))
    vel = np.zeros((n, MAX_OBJECTS, 2))
    for o in range(MAX_OBJECTS):
        p0[:, o], vel[:, o] = sample(n, vec[:, o])
    for _ in range(64):  # resample second objects that start on top of the first
        bad = (directions[:, 1] >= 0) & (np.abs(p0[:, 0] - p0[:, 1]).max(-1) < size / 2)
        if not bad.any():
            break
        p0[bad, 1], vel[bad, 1] = sample(int(bad.sum()), vec[bad, 1])
    t = np.arange(num_frames, dtype=np.float64)

    def corners(p0_: np.ndarray, vel_: np.ndarray) -> np.ndarray:
        return np.rint(_reflect(p0_[:, :, None, :] + vel_[:, :, None, :] * t[:, None], limits)).astype(
            np.int64
        )

    out = corners(p0, vel)  # [n, 2, T, 2]
    if min_gap <= 0:
        return out
    two = directions[:, 1] >= 0
    closest = np.where(two, np.abs(out[:, 0] - out[:, 1]).max(-1).min(-1), np.inf)  # [n]
    for _ in range(256):
        bad = np.flatnonzero(closest < min_gap)
        if bad.size == 0:
            break
        q0, qv = np.empty((bad.size, MAX_OBJECTS, 2)), np.empty((bad.size, MAX_OBJECTS, 2))
        for o in range(MAX_OBJECTS):
            q0[:, o], qv[:, o] = sample(bad.size, vec[bad, o])
        cand = corners(q0, qv)
        gap = np.abs(cand[:, 0] - cand[:, 1]).max(-1).min(-1)
        better = gap > closest[bad]
        out[bad[better]], closest[bad[better]] = cand[better], gap[better]
    return out


def _render(glyphs: np.ndarray, corners: np.ndarray, height: int, width: int) -> np.ndarray:
    """Pastes glyphs uint8 [n, O, S, S] at corners [n, O, T, 2] onto black; max-composite -> [n, T, H, W].

    Corners must lie in [0, H - S] x [0, W - S]. Each frame is an [H, W] window of a [2H, 2W] canvas that
    holds the glyph at (H, W): the window starting at (H - top, W - left).
    """
    n, num_obj, s, _ = glyphs.shape
    big = np.zeros((n, num_obj, 2 * height, 2 * width), np.uint8)
    big[:, :, height : height + s, width : width + s] = glyphs
    windows = np.lib.stride_tricks.sliding_window_view(big, (height, width), axis=(2, 3))
    frames = windows[
        np.arange(n)[:, None, None],
        np.arange(num_obj)[None, :, None],
        height - corners[..., 0],
        width - corners[..., 1],
    ]  # [n, O, T, H, W]
    return frames.max(axis=1)


def generate(
    split: str,
    num_clips: int,
    *,
    seed: int,
    num_frames: int = 8,
    height: int = 32,
    width: int = 32,
    digit_size: int | None = None,
    interpolation: str = "nearest",
    speed: tuple[float, float] | None = None,
    two_fraction: float = 0.5,
    min_gap: float = 0.0,
    left_to_right: bool = False,
) -> dict[str, Any]:
    """Generates clips in memory, deterministic in (split, seed, sizes, two_fraction).

    Returns video uint8 [N, T, H, W, 3] (white digits on black), digits int32 [N, 2] and directions
    int32 [N, 2] (-1 padded for one-object clips; direction = initial direction id into DIRECTIONS),
    captions list[str] of length N, corners int [N, 2, T, 2] (each object's top-left (y, x) per frame). ``digit_size`` defaults to min(height, width) // 2. ``speed`` (min, max)
    px/frame; default: from the free travel L = min(H, W) - digit_size, uniform in [L/T, 2L/T].
    ``two_fraction``: the probability that a clip shows two digits (the other clips show one). ``min_gap``
    > 0: two digits stay >= min_gap px apart (max-norm between their corners) in every frame where a draw
    allows it (0: they only start >= digit_size/2 apart, and often cross). ``left_to_right``: a two-digit
    caption names the digit that starts further left first (then the higher one on a tie); by default the
    naming order is random.
    """
    if not 0.0 <= float(two_fraction) <= 1.0:
        raise ValueError(f"moving_digits.generate: two_fraction must be in [0, 1], got {two_fraction}")
    if speed is not None and not (len(speed) == 2 and 0 < float(speed[0]) <= float(speed[1])):
        raise ValueError(f"moving_digits.generate: speed must be (min, max) with 0 < min <= max, got {speed}")
    if split not in SPLITS:
        raise ValueError(f"split must be one of {SPLITS}, got {split!r}")
    size = min(height, width) // 2 if digit_size is None else int(digit_size)
    if not 1 <= size <= min(height, width) or num_frames < 1 or num_clips < 0:
        raise ValueError(
            f"moving_digits.generate: need 1 <= digit_size ({size}) <= min(height, width) "
            f"({min(height, width)}), num_frames ({num_frames}) >= 1 and num_clips ({num_clips}) >= 0"
        )
    rng = np.random.default_rng([int(seed), _SPLIT_ID[split], VERSION])
    glyph_bank, glyph_digit = _source_glyphs(split, size, interpolation)
    counts = np.bincount(glyph_digit, minlength=10)
    offsets = np.concatenate([[0], np.cumsum(counts)[:-1]])

    digits, directions = _sample_objects(rng, split, num_clips, float(two_fraction))
    safe_digits = np.maximum(digits, 0)
    pick = offsets[safe_digits] + np.floor(rng.random(digits.shape) * counts[safe_digits]).astype(np.int64)
    glyphs = glyph_bank[pick] * (digits >= 0)[..., None, None].astype(np.uint8)  # [N, 2, S, S]
    limits = np.array([height - size, width - size], np.float64)
    corners = _trajectories(rng, directions, num_frames, limits, size, speed, float(min_gap))

    video = np.empty((num_clips, num_frames, height, width, 3), np.uint8)
    chunk = max(1, (1 << 22) // (MAX_OBJECTS * num_frames * height * width))
    for s in range(0, num_clips, chunk):
        video[s : s + chunk] = _render(glyphs[s : s + chunk], corners[s : s + chunk], height, width)[
            ..., None
        ]
    order = np.tile(np.arange(MAX_OBJECTS), (num_clips, 1))  # [N, 2]: the objects in naming order
    if left_to_right:
        start = corners[:, :, 0]  # [N, 2, (y, x)]
        order = np.lexsort((start[..., 0], start[..., 1]), axis=-1)
    captions = [
        caption(rng, [(int(ds[o]), int(ks[o])) for o in oo if ds[o] >= 0])
        for ds, ks, oo in zip(digits, directions, order)
    ]
    return {
        "video": video,
        "digits": digits,
        "directions": directions,
        "captions": captions,
        "corners": corners,
    }


# ----------------------------------------------------------------------------------------------------------
# Build on disk


def shard_names(split: str, num_shards: int) -> list[str]:
    return [f"{split}-{i:05d}-of-{num_shards:05d}.array_record" for i in range(num_shards)]


def _is_complete(out_dir: pathlib.Path, params: dict[str, Any]) -> bool:
    meta_path = out_dir / "metadata.json"
    if not meta_path.is_file():
        return False
    try:
        meta = json.loads(meta_path.read_text())
    except (OSError, json.JSONDecodeError):
        return False
    if meta.get("generator") != GENERATOR or meta.get("version") != VERSION or meta.get("params") != params:
        return False
    return all((out_dir / f).is_file() for s in SPLITS for f in meta["splits"][s]["shards"])


def make_datacard(meta: dict[str, Any]) -> dict[str, Any]:
    """The data card (``sora_jax.data.datacard``) of a build from its ``metadata.json`` alone: every clip under
    ``LICENSE`` / ``SOURCE``, and per split the generator's labels: how many objects show each digit and each
    initial direction, and how many clips hold 1 and 2 objects."""
    seconds = float(meta["num_frames"]) / float(meta["fps"])
    names = meta.get("directions", list(DIRECTIONS))
    splits, labels = {}, {}
    for split, entry in meta["splits"].items():
        n = int(entry["num_clips"])
        splits[split] = datacard.SplitClips(
            np.full(n, seconds), [LICENSE] * n, [SOURCE] * n, entry["captions"]
        )
        digits = np.asarray(entry["digits"], np.int64).reshape(n, -1)
        directions = np.asarray(entry["directions"], np.int64).reshape(n, -1)
        present = digits >= 0
        labels[split] = {
            "digits": {str(d): int(c) for d, c in enumerate(np.bincount(digits[present], minlength=10))},
            "directions": {
                names[k]: int(c) for k, c in enumerate(np.bincount(directions[present], minlength=len(names)))
            },
            "objects_per_clip": {
                str(k): int(c)
                for k, c in enumerate(np.bincount(present.sum(1), minlength=MAX_OBJECTS + 1))
                if k
            },
        }
    return datacard.make_card(GENERATOR, splits, params=meta["params"], labels=labels, notes=LICENSE_NOTE)


def ensure_card(out_dir: str | os.PathLike, *, write: bool = True) -> dict[str, Any]:
    """The card of the complete build in ``out_dir``; made from its metadata when it has none (built before
    cards), and then written there unless ``write`` is False (one process of many writes)."""
    out_dir = pathlib.Path(out_dir)
    card = datacard.read_card(out_dir)
    if card is None:
        card = make_datacard(json.loads((out_dir / "metadata.json").read_text()))
        if write:
            datacard.write_card(out_dir, card)
    return card


def build(
    out_dir: str | os.PathLike,
    *,
    num_train: int,
    num_test: int,
    num_frames: int,
    height: int,
    width: int,
    fps: int,
    seed: int = 0,
    num_shards: int = 4,
    digit_size: int | None = None,
    interpolation: str = "nearest",
    speed: tuple[float, float] | None = None,
    train_two_fraction: float = 0.5,
    train_min_gap: float = 0.0,
    train_left_to_right: bool = False,
    progress: bool = True,
) -> pathlib.Path:
    """Writes train/test ArrayRecord shards + metadata.json into ``out_dir`` atomically; returns out_dir.

    ``train_two_fraction``: the share of two-digit clips in the train split (the test split keeps 0.5, so
    scores on it stay comparable). ``train_min_gap``: ``generate``'s ``min_gap`` for the train split (the test
    split keeps 0, so its captions stay the same). ``train_left_to_right``: ``generate``'s ``left_to_right``
    for the train split.

    Returns at once when ``out_dir`` already holds a complete build with the same parameters; raises
    FileExistsError when it holds something else (delete it or choose another folder).
    """
    from array_record.python.array_record_module import ArrayRecordWriter
    from tqdm.auto import tqdm

    from sora_jax.data.records import encode_clip

    out_dir = pathlib.Path(out_dir).absolute()
    if num_train < 1 or num_test < 1 or num_shards < 1:
        raise ValueError(
            f"build: num_train, num_test, num_shards must be >= 1, got {num_train}, {num_test}, {num_shards}"
        )
    params = dict(
        num_train=int(num_train),
        num_test=int(num_test),
        num_frames=int(num_frames),
        height=int(height),
        width=int(width),
        fps=int(fps),
        seed=int(seed),
        num_shards=int(num_shards),
        digit_size=None if digit_size is None else int(digit_size),
        interpolation=interpolation,
        speed=None if speed is None else [float(v) for v in speed],
    )
    if float(train_two_fraction) != 0.5:  # listed only when set: builds made before it stay complete
        params["train_two_fraction"] = float(train_two_fraction)
    if float(train_min_gap) > 0:
        params["train_min_gap"] = float(train_min_gap)
    if train_left_to_right:
        params["train_left_to_right"] = True
    if _is_complete(out_dir, params):
        ensure_card(out_dir)
        return out_dir
    if out_dir.exists() and (not out_dir.is_dir() or any(out_dir.iterdir())):
        raise FileExistsError(
            f"{out_dir} exists but does not hold a moving-digits build with parameters {params}; "
            "delete it or choose another folder"
        )
    out_dir.parent.mkdir(parents=True, exist_ok=True)
    tmp = out_dir.parent / f".{out_dir.name}.tmp-{os.getpid()}-{secrets.token_hex(4)}"
    tmp.mkdir()
    try:
        meta: dict[str, Any] = {
            "generator": GENERATOR,
            "version": VERSION,
            "params": params,
            "fps": int(fps),
            "num_frames": int(num_frames),
            "height": int(height),
            "width": int(width),
            "directions": list(DIRECTIONS),
            "held_out": sorted([list(p) for p in HELD_OUT]),
            "record_format": "sora_jax.data.records (SJC1)",
            "splits": {},
        }
        sizes = {"train": num_train, "test": num_test}
        bar = tqdm(total=num_train + num_test, desc=f"moving digits -> {out_dir.name}", disable=not progress)
        for split in SPLITS:
            data = generate(
                split,
                sizes[split],
                seed=seed,
                num_frames=num_frames,
                height=height,
                width=width,
                digit_size=digit_size,
                interpolation=interpolation,
                speed=speed,
                two_fraction=float(train_two_fraction) if split == "train" else 0.5,
                min_gap=float(train_min_gap) if split == "train" else 0.0,
                left_to_right=bool(train_left_to_right) and split == "train",
            )
            shards = min(num_shards, sizes[split])
            names = shard_names(split, shards)
            bounds = np.linspace(0, sizes[split], shards + 1).astype(int)
            for name, a, b in zip(names, bounds[:-1], bounds[1:]):
                writer = ArrayRecordWriter(str(tmp / name), "group_size:1")
                for i in range(a, b):
                    rec = encode_clip(
                        data["video"][i], data["captions"][i], data["digits"][i], data["directions"][i]
                    )
                    writer.write(rec)
                    bar.update(1)
                writer.close()
            meta["splits"][split] = {
                "num_clips": sizes[split],
                "shards": names,
                "captions": data["captions"],
                "digits": data["digits"].tolist(),
                "directions": data["directions"].tolist(),
            }
        bar.close()
        datacard.write_card(tmp, make_datacard(meta))
        (tmp / "metadata.json").write_text(json.dumps(meta))
        if out_dir.is_dir():
            out_dir.rmdir()  # empty (checked above)
        try:
            os.rename(tmp, out_dir)
        except OSError:
            if _is_complete(out_dir, params):  # another process finished the same build first
                return out_dir
            raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return out_dir
