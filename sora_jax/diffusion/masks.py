"""Frame-conditioning masks: which (latent) frames of a clip are given clean, for training and sampling.

One mechanism serves every video-prompting mode (Open-Sora's mask strategies): a bool mask ``[B, T]`` over
latent frames marks frames that are given; the process keeps them clean at time 0 and leaves them out of
the loss (``Process.training_loss(cond_mask=...)``, ``Process.sample(cond=..., cond_mask=...)``).

Training draws one strategy per clip with configured probabilities (``config.conditioning``):

    none     nothing given (text-to-video)
    first    the first k frames (image-to-video, extend forward)
    last     the last k frames (extend backward)
    both     the first k and the last k' frames (connect two clips, loops)
    random   each frame given with probability 1/2 (in-betweening, editing)

k, k' ~ U{1..max_frames} (for both, each at most (T - 1) // 2); at least one frame is always left to
generate (a clip that would have every frame given frees its last). Sampling builds masks with
``head_tail_mask``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.choices import MASK_STRATEGIES as STRATEGIES
from sora_jax.choices import check_probs

__all__ = ("STRATEGIES", "check_probs", "conditions_frames", "head_tail_mask", "sample_masks")


def conditions_frames(probs: dict[str, float]) -> bool:
    """Whether any strategy other than ``none`` has a positive probability."""
    return bool(check_probs(probs)[1:].sum() > 0)


def sample_masks(
    key: jax.Array, batch: int, num_frames: int, probs: dict[str, float], max_frames: int
) -> jax.Array:
    """bool ``[batch, num_frames]``: per clip a strategy drawn with ``probs`` (see the module docstring)."""
    p = jnp.asarray(check_probs(probs), jnp.float32)
    T = num_frames
    kmax = max(1, min(int(max_frames), T - 1))
    k_s, k_a, k_b, k_r = jax.random.split(key, 4)
    strategy = jax.random.choice(k_s, len(STRATEGIES), (batch,), p=p)
    k1 = jax.random.randint(k_a, (batch, 1), 1, kmax + 1)
    k2 = jax.random.randint(k_b, (batch, 1), 1, kmax + 1)
    idx = jnp.arange(T)[None]
    head, tail = idx < k1, idx >= T - k2
    kb = max(1, min(int(max_frames), (T - 1) // 2))  # "both": k + k' < T, so the two ends stay apart
    kb1 = jnp.minimum(k1, kb)
    kb2 = jnp.minimum(k2, kb)
    ends = (idx < kb1) | (idx >= T - kb2)
    rand = jax.random.bernoulli(k_r, 0.5, (batch, T))
    s = strategy[:, None]
    mask = jnp.select(
        [s == 1, s == 2, s == 3, s == 4], [head, tail, ends, rand], jnp.zeros((batch, T), jnp.bool_)
    )
    # always leave frames to generate: a clip with every frame given drops its last given frame(s)
    full = jnp.all(mask, axis=1, keepdims=True)
    return jnp.where(full, mask & (idx < T - 1), mask)


def head_tail_mask(num_frames: int, head: int = 0, tail: int = 0, batch: int = 1) -> np.ndarray:
    """bool ``[batch, num_frames]`` with the first ``head`` and the last ``tail`` frames given."""
    if head < 0 or tail < 0 or head + tail >= num_frames:
        raise ValueError(
            f"cannot give {head} first and {tail} last frames of a {num_frames}-frame clip: "
            "at least one frame must be generated"
        )
    m = np.zeros((batch, num_frames), bool)
    m[:, :head] = True
    if tail:
        m[:, num_frames - tail :] = True
    return m
