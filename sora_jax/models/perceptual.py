"""The VAE's optional perceptual loss: LPIPS (Zhang et al. 2018) on a VGG16 whose weights the user supplies.

Nothing is downloaded. ``load_perceptual(path)`` reads an ``.npz`` in torchvision/LPIPS naming:
``features.{i}.weight`` ``[out, in, 3, 3]`` and ``features.{i}.bias`` for VGG16's 13 convolutions (i in
``VGG16_CONV_INDICES``), and optionally LPIPS's linear heads ``lin{k}.model.1.weight`` ``[1, C_k, 1, 1]``
(without them every channel weighs the same). Convert a PyTorch checkpoint with
``np.savez(path, **{k: v.numpy() for k, v in state_dict.items()})``.

``PerceptualLoss(frames_a, frames_b)``: frames ``[N, H, W, 3]`` in [-1, 1] -> ``[N]``: LPIPS's input scaling,
features at relu1_2, relu2_2, relu3_3, relu4_3, relu5_3, channel-wise unit normalisation, squared difference,
per-channel weights, spatial mean, sum over the five layers.
"""

from __future__ import annotations

from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np

# torchvision vgg16().features: conv indices and where LPIPS taps the ReLUs (after these convs)
VGG16_CONV_INDICES = (0, 2, 5, 7, 10, 12, 14, 17, 19, 21, 24, 26, 28)
VGG16_WIDTHS = (64, 64, 128, 128, 256, 256, 256, 512, 512, 512, 512, 512, 512)
_TAPS = (2, 7, 14, 21, 28)  # relu1_2, relu2_2, relu3_3, relu4_3, relu5_3 follow these convs
_POOL_AFTER = (2, 7, 14, 21)  # then a 2x2 max-pool
_SHIFT = np.asarray([-0.030, -0.088, -0.188], np.float32)
_SCALE = np.asarray([0.458, 0.448, 0.450], np.float32)


@jax.tree_util.register_pytree_node_class
class PerceptualLoss:
    """LPIPS with user-supplied VGG16 (+ optional linear head) weights; pure JAX. A pytree of its weights, so
    a jitted step takes it as an argument (frozen parameters, never compiled constants)."""

    def __init__(self, convs: list[tuple[jax.Array, jax.Array]], lins: list[jax.Array] | None):
        self.convs, self.lins = convs, lins

    @classmethod
    def from_torch(cls, convs: list[tuple[np.ndarray, np.ndarray]], lins: list[np.ndarray] | None):
        """From torch layouts: conv kernels ``[out, in, kh, kw]`` (-> HWIO), LPIPS heads ``[1, C, 1, 1]``."""
        return cls(
            [(jnp.asarray(w.transpose(2, 3, 1, 0)), jnp.asarray(b)) for w, b in convs],
            None if lins is None else [jnp.asarray(w.reshape(-1)) for w in lins],
        )

    def tree_flatten(self):
        return (self.convs, self.lins), None

    @classmethod
    def tree_unflatten(cls, aux, children):
        return cls(*children)

    def features(self, x: jax.Array) -> list[jax.Array]:
        """frames [N, H, W, 3] in [-1, 1] -> the five tapped ReLU feature maps."""
        h = (x.astype(jnp.float32) - _SHIFT) / _SCALE
        taps = []
        for idx, (w, b) in zip(VGG16_CONV_INDICES, self.convs):
            h = jax.lax.conv_general_dilated(h, w, (1, 1), "SAME", dimension_numbers=("NHWC", "HWIO", "NHWC"))
            h = jax.nn.relu(h + b)
            if idx in _TAPS:
                taps.append(h)
            if idx in _POOL_AFTER:
                h = jax.lax.reduce_window(h, -jnp.inf, jax.lax.max, (1, 2, 2, 1), (1, 2, 2, 1), "VALID")
        return taps

    def __call__(self, a: jax.Array, b: jax.Array) -> jax.Array:
        """LPIPS distance per frame ``[N]`` between frames a, b ``[N, H, W, 3]`` in [-1, 1]."""
        total = 0.0
        for k, (fa, fb) in enumerate(zip(self.features(a), self.features(b))):
            na = fa / (jnp.sqrt(jnp.sum(fa * fa, axis=-1, keepdims=True)) + 1e-10)
            nb = fb / (jnp.sqrt(jnp.sum(fb * fb, axis=-1, keepdims=True)) + 1e-10)
            d = jnp.square(na - nb)
            d = d @ self.lins[k] if self.lins is not None else jnp.mean(d, axis=-1)
            total = total + jnp.mean(d, axis=(1, 2))
        return total


def load_perceptual(path: str | Path) -> PerceptualLoss:
    """``PerceptualLoss`` from an ``.npz`` of VGG16 (+ LPIPS head) weights; one clear error on a bad file."""
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"perceptual-loss weights not found: {path}")
    try:
        data = np.load(path)
    except (OSError, ValueError) as e:
        raise ValueError(f"perceptual-loss weights {path} are not a readable .npz ({e})") from e
    convs, cin = [], 3
    for idx, width in zip(VGG16_CONV_INDICES, VGG16_WIDTHS):
        w_key, b_key = f"features.{idx}.weight", f"features.{idx}.bias"
        if w_key not in data or b_key not in data:
            raise ValueError(f"perceptual-loss weights {path}: missing {w_key} / {b_key} (VGG16 naming)")
        w, b = np.asarray(data[w_key], np.float32), np.asarray(data[b_key], np.float32)
        if w.shape != (width, cin, 3, 3) or b.shape != (width,):
            raise ValueError(
                f"perceptual-loss weights {path}: {w_key} is {w.shape}, VGG16 wants {(width, cin, 3, 3)}"
            )
        convs.append((w, b))
        cin = width
    lin_keys = [f"lin{k}.model.1.weight" for k in range(5)]
    present = [k in data for k in lin_keys]
    if any(present) and not all(present):
        raise ValueError(f"perceptual-loss weights {path}: LPIPS heads need all of {lin_keys}")
    lins = [np.asarray(data[k], np.float32) for k in lin_keys] if all(present) else None
    return PerceptualLoss.from_torch(convs, lins)
