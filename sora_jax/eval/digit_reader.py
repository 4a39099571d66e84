"""The prompt-adherence evaluator: a small video classifier that reads which digits a clip shows and where
each one moves.

Input: uint8 [B, T, H, W, 3] videos of white digits on black (the bundled moving-digits data). The shipped
weights (``weights/digit_reader.npz``) were trained on 8-frame 32x32 clips (``ReaderConfig`` is stored in the
file, with the accuracy measured on held-out clips). Videos with more frames are read from their first
``num_frames`` frames; videos whose size is an integer multiple of the trained size (e.g. a 128x128 MP4
written by ``sample.video_io``) are block-averaged down; anything else raises a ``UserError``.

Model (about 0.2M parameters): every grey frame [H, W, 1] goes through the same four 3x3 convolutions
(widths 24-48-96-96, strides 2-1-2-1, GroupNorm + GELU) -> a feature map [H/4, W/4, D] per frame; per digit
class k and frame t an attention map over the positions pools a feature and the expected position of digit k
(a soft-argmax). Presence of digit k: an MLP on its features pooled over the frames (mean and max), so a
digit that the other one covers in some frames is still read from the rest. Direction of digit k ("its
initial direction"): an MLP shared by all classes on its trajectory (per-frame positions and steps) and its
mean feature. Trained with BCE on presence and CE on direction where present (``reader_training``).
"""

from __future__ import annotations

import dataclasses
import json
import os
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax.errors import UserError

__all__ = [
    "DEFAULT_WEIGHTS",
    "DIRECTIONS",
    "DigitReader",
    "ReaderConfig",
    "load_reader",
    "preprocess",
    "read_videos",
    "save_reader",
]

# Direction names by id, the order of ``sora_jax.data.moving_digits.DIRECTIONS`` (checked by the tests and
# stored with the weights, which win when loaded).
DIRECTIONS: tuple[str, ...] = (
    "left",
    "right",
    "up",
    "down",
    "up-left",
    "up-right",
    "down-left",
    "down-right",
)
DEFAULT_WEIGHTS = Path(__file__).resolve().parent / "weights" / "digit_reader.npz"
_CONFIG_KEY = "__config__"


@dataclasses.dataclass(frozen=True)
class ReaderConfig:
    """What the reader was built and trained for.

    num_frames, height, width: the clip it reads (longer clips are cut to the first ``num_frames``).
    widths, strides: channels and strides of the per-frame 3x3 convolutions; hidden: width of the head MLPs.
    metrics: accuracies measured after training (informational).
    """

    num_frames: int = 8
    height: int = 32
    width: int = 32
    num_digits: int = 10
    directions: tuple[str, ...] = DIRECTIONS
    widths: tuple[int, ...] = (24, 48, 96, 96)
    strides: tuple[int, ...] = (2, 1, 2, 1)
    hidden: int = 128
    metrics: dict = dataclasses.field(default_factory=dict, compare=False)

    def to_json(self) -> str:
        return json.dumps(dataclasses.asdict(self), sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> ReaderConfig:
        d = json.loads(text)
        d["directions"] = tuple(d["directions"])
        d["widths"] = tuple(d["widths"])
        d["strides"] = tuple(d["strides"])
        return cls(**d)


def preprocess(videos: np.ndarray | jax.Array, cfg: ReaderConfig) -> np.ndarray:
    """Checks and normalises videos uint8 [B, T, H, W, 3] -> float32 [B, num_frames, height, width] in [0, 1].

    Keeps the first ``cfg.num_frames`` frames; block-averages sizes that are an integer multiple of the
    trained size; raises UserError (naming the shape and what the reader accepts) otherwise.
    """
    videos = np.asarray(videos)
    if videos.ndim == 4 and videos.shape[-1] == 3:
        raise UserError(f"videos must be batched [B, T, H, W, 3], got {videos.shape}; add a leading axis")
    if videos.ndim != 5 or videos.shape[-1] != 3:
        raise UserError(f"videos must be uint8 [B, T, H, W, 3], got shape {videos.shape}")
    if videos.dtype != np.uint8:
        raise UserError(f"videos must be uint8 (0..255), got {videos.dtype}")
    b, t, h, w, _ = videos.shape
    if t < cfg.num_frames:
        raise UserError(
            f"the digit reader needs at least {cfg.num_frames} frames (it was trained on {cfg.num_frames}), "
            f"got {t}"
        )
    f = h // cfg.height if h % cfg.height == 0 else 0
    if f < 1 or w != f * cfg.width:
        raise UserError(
            f"the digit reader reads {cfg.height}x{cfg.width} frames (or integer multiples of that size), "
            f"got {h}x{w}"
        )
    grey = videos[:, : cfg.num_frames].astype(np.float32).mean(-1) / 255.0  # [B, T, H, W]
    if f > 1:
        grey = grey.reshape(b, cfg.num_frames, cfg.height, f, cfg.width, f).mean((3, 5))
    return grey


class DigitReader(nnx.Module):
    """Reads digit presence and per-digit direction from preprocessed clips [B, T, H, W] (see preprocess).

    Every frame goes through the same 2D conv body (frames are sharp; digits only overlap in some of
    them). Per frame, a per-class attention map over the feature positions pools a feature per digit class
    and that class's expected position (a soft-argmax). Presence reads the per-class features pooled over
    time (mean and max); direction reads the per-class trajectory (positions and their frame-to-frame
    steps) together with the time-pooled feature, with one head shared by all classes.
    """

    def __init__(self, cfg: ReaderConfig, *, rngs: nnx.Rngs):
        self.cfg = cfg
        if len(cfg.strides) != len(cfg.widths):
            raise ValueError(f"ReaderConfig: {len(cfg.widths)} widths but {len(cfg.strides)} strides")
        c_in = 1
        self.convs = nnx.List()
        self.norms = nnx.List()
        for c_out, s in zip(cfg.widths, cfg.strides, strict=True):
            self.convs.append(nnx.Conv(c_in, c_out, (3, 3), strides=(s, s), padding="SAME", rngs=rngs))
            self.norms.append(nnx.GroupNorm(c_out, num_groups=min(8, c_out), rngs=rngs))
            c_in = c_out
        d, k, t, hid = c_in, cfg.num_digits, cfg.num_frames, cfg.hidden
        self.attn = nnx.Conv(d, k, (1, 1), rngs=rngs)
        # presence: per class from [mean_T, max_T] of the pooled features
        self.pres_norm = nnx.LayerNorm(2 * d, rngs=rngs)
        self.pres_hidden = nnx.Linear(2 * d, hid, rngs=rngs)
        self.pres_kernel = nnx.Param(nnx.initializers.lecun_normal()(rngs.params(), (k, hid)))
        self.pres_bias = nnx.Param(jnp.zeros((k,)))
        # direction: shared over classes, from the trajectory (T positions + T-1 steps) and the feature
        traj = 2 * t + 2 * (t - 1)
        self.dir_norm = nnx.LayerNorm(d, rngs=rngs)
        self.dir_hidden = nnx.Linear(traj + d, hid, rngs=rngs)
        self.dir_hidden2 = nnx.Linear(hid, hid, rngs=rngs)
        self.dir_out = nnx.Linear(hid, len(cfg.directions), rngs=rngs)

    def __call__(self, x_BTHW: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Returns presence logits [B, 10] and direction logits [B, 10, 8]."""
        presence, directions, _, _ = self._forward(x_BTHW)
        return presence, directions

    def embed(self, x_BTHW: jax.Array) -> tuple[jax.Array, jax.Array]:
        """The reader's features for Fréchet distances: per video [B, 10 + 80 + 2D] (presence logits,
        direction logits, the frame features averaged over time) and per frame [B, T, 2D] (the last conv
        map mean- and max-pooled over positions)."""
        presence, directions, h, _ = self._forward(x_BTHW)
        b, t = x_BTHW.shape[:2]
        frames = jnp.concatenate([h.mean((1, 2)), h.max((1, 2))], -1).reshape(b, t, -1)
        video = jnp.concatenate([presence, directions.reshape(b, -1), frames.mean(1)], -1)
        return video, frames

    def feature_map(self, x_BTHW: jax.Array) -> jax.Array:
        """The conv body's map of every frame: [B, T, H', W', D] (H' = H / 4 with the shipped strides);
        what REPA aligns a DiT's tokens with (``sora_jax/train/repa.py``)."""
        b, t, hgt, wid = x_BTHW.shape
        h = x_BTHW.reshape(b * t, hgt, wid, 1)
        for conv, norm in zip(self.convs, self.norms, strict=True):
            h = jax.nn.gelu(norm(conv(h)))  # [B*T, H', W', D]
        return h.reshape(b, t, *h.shape[1:])

    def class_maps(self, x_BTHW: jax.Array) -> tuple[jax.Array, jax.Array]:
        """Where each digit is: [B, T, H', W', K], per frame the attention of class k over the positions
        (summing to 1) times the probability that digit k is present, so a map sums to that probability;
        with the conv map it was read from, [B, T, H', W', D] (``feature_map``). What REPA's class term
        (``config.repa.classes``) aligns a DiT's tokens with."""
        b, t = x_BTHW.shape[:2]
        presence, _, h, att = self._forward(x_BTHW)  # att [B, T, N, K]
        maps = att * jax.nn.sigmoid(presence)[:, None, None, :]
        return maps.reshape(b, t, h.shape[1], h.shape[2], -1), h.reshape(b, t, *h.shape[1:])

    def _forward(self, x_BTHW: jax.Array) -> tuple[jax.Array, jax.Array, jax.Array, jax.Array]:
        b, t, hgt, wid = x_BTHW.shape
        h = self.feature_map(x_BTHW)
        h = h.reshape(b * t, *h.shape[2:])  # [B*T, H', W', D]
        att = self.attn(h)  # [B*T, H', W', K]
        _, hh, ww, k = att.shape
        att = jax.nn.softmax(att.reshape(b, t, hh * ww, k), axis=2)  # [B, T, N, K]
        feats = jnp.einsum("BTNK,BTND->BKTD", att, h.reshape(b, t, hh * ww, -1))
        ys, xs = jnp.meshgrid(jnp.linspace(-1.0, 1.0, hh), jnp.linspace(-1.0, 1.0, ww), indexing="ij")
        grid = jnp.stack([ys.reshape(-1), xs.reshape(-1)], -1) * (hgt / 4)  # [N, 2], ~pixels / 2
        pos = jnp.einsum("BTNK,NC->BKTC", att, grid)  # [B, K, T, 2]
        steps = pos[:, :, 1:] - pos[:, :, :-1]

        pooled = jnp.concatenate([feats.mean(2), feats.max(2)], -1)  # [B, K, 2D]
        zp = jax.nn.gelu(self.pres_hidden(self.pres_norm(pooled)))  # [B, K, hid]
        presence = jnp.einsum("BKH,KH->BK", zp, self.pres_kernel[...]) + self.pres_bias[...]

        traj = jnp.concatenate([pos.reshape(b, k, -1) / 4, steps.reshape(b, k, -1)], -1)
        zd = jnp.concatenate([traj, self.dir_norm(feats.mean(2))], -1)
        zd = jax.nn.gelu(self.dir_hidden(zd))
        zd = jax.nn.gelu(self.dir_hidden2(zd))
        # h: the conv map [B*T, H', W', D]; att: per frame and class, softmax over positions [B, T, N, K]
        return presence, self.dir_out(zd), h, att


def _flat_params(model: DigitReader) -> dict[str, np.ndarray]:
    return {
        "/".join(map(str, p)): np.asarray(v.get_value()) for p, v in nnx.state(model, nnx.Param).flat_state()
    }


def save_reader(path: str | os.PathLike, model: DigitReader, cfg: ReaderConfig | None = None) -> Path:
    """Writes the parameters as a flat .npz (param path -> array) plus the config JSON, atomically."""
    cfg = model.cfg if cfg is None else cfg
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, **{_CONFIG_KEY: np.array(cfg.to_json())}, **_flat_params(model))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_reader(path: str | os.PathLike | None = None) -> DigitReader:
    """Loads a reader from a .npz written by ``save_reader`` (default: the shipped weights)."""
    path = Path(DEFAULT_WEIGHTS if path is None else path)
    if not path.is_file():
        raise FileNotFoundError(
            f"no digit-reader weights at {path}; train them with "
            "`python -m sora_jax.eval.reader_training --out sora_jax/eval/weights/digit_reader.npz`"
        )
    with np.load(path, allow_pickle=False) as npz:
        if _CONFIG_KEY not in npz:
            raise UserError(f"{path} is not a digit-reader weights file (no {_CONFIG_KEY} entry)")
        cfg = ReaderConfig.from_json(str(npz[_CONFIG_KEY]))
        arrays = {k: npz[k] for k in npz.files if k != _CONFIG_KEY}
    # built abstract (no initialiser runs: eager JAX compiles each op once, seconds on a CPU), then filled
    model = nnx.eval_shape(lambda: DigitReader(cfg, rngs=nnx.Rngs(0)))
    pairs = []
    for p, v in nnx.state(model, nnx.Param).flat_state():
        key = "/".join(map(str, p))
        if key not in arrays or arrays[key].shape != v.get_value().shape:
            raise UserError(f"{path}: parameter {key} missing or of the wrong shape")
        pairs.append((p, v.replace(jnp.asarray(arrays[key]))))
    nnx.update(model, nnx.State.from_flat_path(pairs))
    return model


@jax.jit
def _apply(graphdef, state, x):
    model = nnx.merge(graphdef, state)
    pres, dirs = model(x)
    return jax.nn.sigmoid(pres), jax.nn.softmax(dirs, axis=-1)


def predict(model: DigitReader, videos: np.ndarray, batch_size: int = 256) -> tuple[np.ndarray, np.ndarray]:
    """Presence probabilities [B, 10] and direction probabilities [B, 10, 8] for uint8 [B, T, H, W, 3]."""
    x = preprocess(videos, model.cfg)
    graphdef, state = nnx.split(model)
    pres, dirs = [], []
    for i in range(0, len(x), batch_size):
        chunk = x[i : i + batch_size]
        n = len(chunk)
        if n < batch_size and len(x) > batch_size:  # pad the last chunk: one compiled shape
            chunk = np.concatenate([chunk, np.zeros((batch_size - n, *chunk.shape[1:]), chunk.dtype)])
        p, d = _apply(graphdef, state, jnp.asarray(chunk))
        pres.append(np.asarray(p)[:n])
        dirs.append(np.asarray(d)[:n])
    k, o = model.cfg.num_digits, len(model.cfg.directions)
    if not pres:
        return np.zeros((0, k), np.float32), np.zeros((0, k, o), np.float32)
    return np.concatenate(pres), np.concatenate(dirs)


def decode(
    presence: np.ndarray, directions: np.ndarray, names: Sequence[str] = DIRECTIONS, threshold: float = 0.5
) -> list[list[tuple[int, str]]]:
    """Turns probabilities into readings: per video [(digit, direction_name), ...] sorted by digit.

    Digits with presence > threshold are read; if none is, the single most likely digit.
    """
    readings = []
    for p, d in zip(presence, directions):
        digits = [int(k) for k in np.flatnonzero(p > threshold)] or [int(np.argmax(p))]
        readings.append([(k, names[int(np.argmax(d[k]))]) for k in sorted(digits)])
    return readings


_DEFAULT_READER: DigitReader | None = None


def read_videos(
    videos: np.ndarray, reader: DigitReader | None = None, threshold: float = 0.5
) -> list[list[tuple[int, str]]]:
    """Reads uint8 [B, T, H, W, 3] videos: per video [(digit, direction_name), ...] sorted by digit.

    Uses ``reader`` or the shipped weights (loaded once).
    """
    global _DEFAULT_READER
    if reader is None:
        if _DEFAULT_READER is None:
            _DEFAULT_READER = load_reader()
        reader = _DEFAULT_READER
    presence, directions = predict(reader, videos)
    return decode(presence, directions, reader.cfg.directions, threshold)
