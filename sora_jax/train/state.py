"""The train state as a plain pytree (params, optimizer state, EMA, step, rng) and the optimizer.

A plain dict keeps checkpoints readable by orbax without custom handlers and lets the same pytree carry
shardings for ``jax.jit(out_shardings=...)``. The NNX graph definition is rebuilt from the config.
"""

from __future__ import annotations

from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

TrainState = dict[
    str, Any
]  # {"step": i32[], "params": nnx.State, "opt_state": ..., "ema": nnx.State, "rng": key}


def make_optimizer(cfg: ml_collections.ConfigDict, lr: float | None = None) -> optax.GradientTransformation:
    """AdamW with linear warmup then cosine decay to 10%, global-norm clipping first (peak ``lr`` or the
    config's)."""
    o = cfg.optim
    lr = o.lr if lr is None else lr
    schedule = optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=lr,
        warmup_steps=max(1, o.warmup_steps),
        decay_steps=max(cfg.train.num_steps, o.warmup_steps + 1),
        end_value=lr * 0.1,
    )
    return optax.chain(
        optax.clip_by_global_norm(o.grad_clip),
        optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay),
    )


def learning_rate(cfg: ml_collections.ConfigDict, step) -> jax.Array:
    o = cfg.optim
    return optax.warmup_cosine_decay_schedule(
        0.0, o.lr, max(1, o.warmup_steps), max(cfg.train.num_steps, o.warmup_steps + 1), o.lr * 0.1
    )(step)


def init_state(model: nnx.Module, tx: optax.GradientTransformation, seed: int) -> TrainState:
    """The initial state of ``model`` (already built): params, zeroed optimizer state, EMA = params."""
    params = nnx.state(model, nnx.Param)
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "ema": jax.tree.map(jnp.copy, params),
        "rng": jax.random.key_data(jax.random.key(seed)),
    }


def ema_update(ema, params, decay: float):
    return jax.tree.map(lambda e, p: e * decay + (1.0 - decay) * p.astype(e.dtype), ema, params)
