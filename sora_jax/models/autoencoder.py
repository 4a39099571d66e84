"""The autoencoder interface between pixels and the DiT's latent space, and the pixel-space identity codec.

Owns: the ``Autoencoder`` protocol every codec implements (the causal 3D VAE in ``vae.py`` included),
``IdentityAutoencoder`` (pixel space, 3 channels, no downsampling), and the uint8 <-> [-1, 1] conversions
``video_to_float`` / ``float_to_video`` used at the data and writer boundaries. A codec's weights are its
``params`` (a pytree; none for the pixel codecs); jitted code takes them as an argument and rebinds them with
``with_params``, so frozen weights never become compiled constants.
"""

from __future__ import annotations

from typing import Protocol, runtime_checkable

import jax
import jax.numpy as jnp
import numpy as np


@runtime_checkable
class Autoencoder(Protocol):
    """Maps videos ``float32 [B, T, H, W, 3]`` in [-1, 1] to latents ``[B, T', H', W', C]`` and back."""

    latent_channels: int
    temporal_downsample: int
    spatial_downsample: int
    params: object  # the frozen weights, a pytree ({} for the pixel codecs, None for a weightless VAE)

    def with_params(self, params) -> Autoencoder:
        """The same codec over ``params`` (host or device arrays, or tracers inside a jitted function)."""
        ...

    def latent_shape(self, T: int, H: int, W: int) -> tuple[int, int, int, int]:
        """(T', H', W', C) of the latents of a ``T x H x W`` video."""
        ...

    def encode(self, video: jax.Array) -> jax.Array:
        """video float32 ``[B, T, H, W, 3]`` in [-1, 1] -> latents ``[B, T', H', W', C]``."""
        ...

    def decode(self, latents: jax.Array) -> jax.Array:
        """latents ``[B, T', H', W', C]`` -> video float32 ``[B, T, H, W, 3]`` in [-1, 1]."""
        ...


class IdentityAutoencoder:
    """Pixel space: latents are the video itself (C = 3, no temporal or spatial downsampling)."""

    latent_channels = 3
    temporal_downsample = 1
    spatial_downsample = 1

    @property
    def params(self) -> dict:
        """No weights: the empty pytree."""
        return {}

    def with_params(self, params) -> IdentityAutoencoder:
        """Itself: a pixel codec has no weights to bind."""
        return self

    def latent_shape(self, T: int, H: int, W: int) -> tuple[int, int, int, int]:
        return (T, H, W, self.latent_channels)

    def encode(self, video: jax.Array) -> jax.Array:
        """video ``[B, T, H, W, 3]`` -> the same array as float32."""
        if video.ndim != 5 or video.shape[-1] != 3:
            raise ValueError(f"IdentityAutoencoder.encode wants [B, T, H, W, 3], got {video.shape}")
        return jnp.asarray(video, jnp.float32)

    def decode(self, latents: jax.Array) -> jax.Array:
        """latents ``[B, T, H, W, 3]`` -> video float32 clipped to [-1, 1]."""
        if latents.ndim != 5 or latents.shape[-1] != 3:
            raise ValueError(f"IdentityAutoencoder.decode wants [B, T, H, W, 3], got {latents.shape}")
        return jnp.clip(jnp.asarray(latents, jnp.float32), -1.0, 1.0)


class LumaAutoencoder(IdentityAutoencoder):
    """Pixel space, luma only: latents are the Rec.601 luma of the video (C = 1); decoding repeats it into RGB.

    Exact for grey videos (the bundled moving digits) at a third of the DiT's patch width; colour is lost.
    """

    latent_channels = 1
    _WEIGHTS = (0.299, 0.587, 0.114)

    def encode(self, video: jax.Array) -> jax.Array:
        """video ``[B, T, H, W, 3]`` -> luma ``[B, T, H, W, 1]`` float32."""
        if video.ndim != 5 or video.shape[-1] != 3:
            raise ValueError(f"LumaAutoencoder.encode wants [B, T, H, W, 3], got {video.shape}")
        w = jnp.asarray(self._WEIGHTS, jnp.float32)
        return jnp.einsum("bthwc,c->bthw", jnp.asarray(video, jnp.float32), w)[..., None]

    def decode(self, latents: jax.Array) -> jax.Array:
        """luma ``[B, T, H, W, 1]`` -> grey video float32 ``[B, T, H, W, 3]`` clipped to [-1, 1]."""
        if latents.ndim != 5 or latents.shape[-1] != 1:
            raise ValueError(f"LumaAutoencoder.decode wants [B, T, H, W, 1], got {latents.shape}")
        return jnp.repeat(jnp.clip(jnp.asarray(latents, jnp.float32), -1.0, 1.0), 3, axis=-1)


def video_to_float(video: jax.Array | np.ndarray) -> jax.Array:
    """uint8 ``[..., 3]`` in [0, 255] -> float32 in [-1, 1]."""
    if video.dtype != np.uint8:
        raise ValueError(f"video_to_float wants uint8 pixels, got {video.dtype}")
    return jnp.asarray(video, jnp.float32) / 127.5 - 1.0


def float_to_video(x: jax.Array | np.ndarray) -> jax.Array | np.ndarray:
    """float ``[...]`` in [-1, 1] -> uint8 in [0, 255] (clipped, rounded); numpy in, numpy out; traceable."""
    xp = np if isinstance(x, np.ndarray) else jnp
    return xp.clip(xp.round((xp.asarray(x, xp.float32) + 1.0) * 127.5), 0, 255).astype(xp.uint8)
