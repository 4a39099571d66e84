"""Classifier-free guidance (Ho & Salimans 2022) as a wrapper that turns a conditional model into an
``apply_fn(x_t, model_time)`` the samplers accept.

The conditional and unconditional passes run as one model call on the doubled batch ``[x_t; x_t]`` with
the conditioning stacked ``[cond; uncond]`` along the leading axis of every leaf; the guided output is
``uncond + scale * (cond - uncond)``.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import jax
import jax.numpy as jnp

CondApplyFn = Callable[[jax.Array, jax.Array, Any], Any]


def rescale_guidance(guided: jax.Array, cond_out: jax.Array, phi: float) -> jax.Array:
    """Guidance rescale (Lin et al. 2024, "Common Diffusion Noise Schedules and Sample Steps are Flawed",
    eq. 15-16): ``phi * guided * std(cond_out) / std(guided) + (1 - phi) * guided``, the standard deviations
    taken per sample over all non-batch dims. Counters the over-exposure of large guidance scales."""
    axes = tuple(range(1, guided.ndim))
    g32, c32 = guided.astype(jnp.float32), cond_out.astype(jnp.float32)
    std_g = jnp.std(g32, axis=axes, keepdims=True)
    std_c = jnp.std(c32, axis=axes, keepdims=True)
    rescaled = g32 * (std_c / jnp.maximum(std_g, 1e-12))
    return (phi * rescaled + (1.0 - phi) * g32).astype(guided.dtype)


def cfg_apply(
    apply_fn_cond: CondApplyFn, cond: Any, scale: float | jax.Array, *, rescale: float = 0.0
) -> Callable:
    """Returns ``apply_fn(x_t [B, ...], model_time [B] or [B, T]) -> out [B, ...]`` guided with ``scale``.

    apply_fn_cond(x_t [2B, ...], model_time [2B, ...], cond) -> out [2B, ...] (out may be a pytree).
    cond: a pytree whose leaves have leading dim 2B, the conditional half first, e.g. text embeddings
    [2B, L, D] and masks [2B, L] where rows B..2B-1 hold the null caption, or a negative prompt.
    ``rescale`` > 0 applies guidance rescale (``rescale_guidance``) with that phi (0.7 in the paper).

    When ``scale`` is a Python number equal to 1 (0), only the conditional (unconditional) half runs, at half
    the cost; a traced ``scale`` always runs both halves.
    """
    static_scale = float(scale) if isinstance(scale, int | float) else None

    def half(tree, which: int, batch: int):
        return jax.tree.map(lambda a: a[which * batch : (which + 1) * batch], tree)

    def apply_fn(x_t: jax.Array, model_time: jax.Array):
        batch = x_t.shape[0]
        for leaf in jax.tree.leaves(cond):
            if leaf.shape[0] != 2 * batch:
                raise ValueError(
                    f"cfg_apply: cond leaves need leading dim 2B = {2 * batch} ([cond; uncond]), "
                    f"got shape {leaf.shape}"
                )
        if static_scale == 1.0:
            return apply_fn_cond(x_t, model_time, half(cond, 0, batch))
        if static_scale == 0.0:
            return apply_fn_cond(x_t, model_time, half(cond, 1, batch))
        out = apply_fn_cond(
            jnp.concatenate([x_t, x_t], axis=0), jnp.concatenate([model_time, model_time], axis=0), cond
        )
        out_c, out_u = half(out, 0, batch), half(out, 1, batch)
        guided = jax.tree.map(lambda c, u: u + scale * (c - u), out_c, out_u)
        if rescale:
            guided = jax.tree.map(lambda g, c: rescale_guidance(g, c, rescale), guided, out_c)
        return guided

    return apply_fn
