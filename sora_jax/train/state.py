"""The train state as a plain pytree (params, optimizer state, EMA, step, rng) and the optimizer.

A plain dict keeps checkpoints readable by orbax without custom handlers and lets the same pytree carry
shardings for ``jax.jit(out_shardings=...)``. The NNX graph definition is rebuilt from the config.
"""

from __future__ import annotations

import functools
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import optax
from flax import nnx

from sora_jax.choices import Optimizer
from sora_jax.models import lora

TrainState = dict[
    str, Any
]  # {"step": i32[], "params": nnx.State, "opt_state": ..., "ema": nnx.State, "rng": key}


def lr_schedule(cfg: ml_collections.ConfigDict, lr: float | None = None) -> optax.Schedule:
    """Linear warmup over ``optim.warmup_steps`` to ``lr`` (default ``optim.lr``), then cosine decay to
    ``optim.final_lr_fraction`` of it (default 0.1) at ``train.num_steps``: the schedule the optimizer follows and
    the ``lr`` metric reports."""
    o = cfg.optim
    lr = o.lr if lr is None else lr
    return optax.warmup_cosine_decay_schedule(
        init_value=0.0,
        peak_value=lr,
        warmup_steps=max(1, o.warmup_steps),
        decay_steps=max(cfg.train.num_steps, o.warmup_steps + 1),
        end_value=lr * float(o.get("final_lr_fraction", 0.1)),
    )


# Muon's matrices: the stacked blocks' projection kernels, by leaf name -> (reduction axes, output axes), the
# leading block axis a batch axis (each block's matrix is orthogonalized alone). Embeddings, the final layer,
# biases, norms, adaLN of the final layer and LoRA adapters stay on AdamW (as in modded-nanogpt).
_MUON_AXES = {"wq": (1, (2, 3)), "wk": (1, (2, 3)), "wv": (1, (2, 3)), "wo": ((1, 2), 3), "kernel": (1, 2)}

# Polar Express (Amsel et al. 2025), the per-iteration quintic coefficients modded-nanogpt uses, designed for an
# input divided by 1.02 ||X||_F; optax divides by ||X||_F alone, so the first iteration takes the 1.02 instead.
_POLAR_EXPRESS = (
    (8.156554524902461, -22.48329292557795, 15.878769915207462),
    (4.042929935166739, -2.808917465908714, 0.5000178451051316),
    (3.8916678022926607, -2.772484153217685, 0.5060648178503393),
    (3.285753657755655, -2.3681294933425376, 0.46449024233003106),
    (2.3465413258596377, -1.7097828382687081, 0.42323551169305323),
)


def newton_schulz_coeffs(kind: str, steps: int):
    """``optim.muon_ns_coeffs`` -> what optax's muon takes for ``steps`` iterations: "standard" (Jordan et al.'s
    one quintic, (3.4445, -4.775, 2.0315), every iteration) or "polar_express" (one (a, b, c) row per iteration,
    made for exactly 5: cut short, its first rows overshoot past 1)."""
    if kind == "standard":
        return (3.4445, -4.775, 2.0315)
    if kind != "polar_express":
        raise ValueError(f"optim.muon_ns_coeffs must be standard or polar_express, got {kind!r}")
    if steps != len(_POLAR_EXPRESS):
        raise ValueError(f"optim.muon_ns_coeffs = polar_express takes optim.muon_ns_steps = 5, got {steps}")
    (a, b, c), *rest = _POLAR_EXPRESS
    return ((a / 1.02, b / 1.02**3, c / 1.02**5), *rest)


def muon_dimension_numbers(params, skip: tuple[str, ...] = ()):
    """Per leaf of ``params``: ``MuonDimensionNumbers`` for a stacked-block kernel (see ``_MUON_AXES``), else
    None (AdamW); also None under a module named in ``skip`` (``optim.muon_skip``, e.g. "adaLN_modulation")."""
    from optax.contrib import MuonDimensionNumbers

    def dims(path, x):
        names = [str(getattr(k, "key", getattr(k, "name", k))) for k in path]
        names = names[:-1] if names[-1] == "value" else names
        axes = _MUON_AXES.get(names[-1])
        if "blocks" not in names or axes is None or x.ndim != 1 + len(jax.tree.leaves(axes)):
            return None
        return None if set(names) & set(skip) else MuonDimensionNumbers(*axes)

    return jax.tree_util.tree_map_with_path(dims, params)


def make_optimizer(cfg: ml_collections.ConfigDict, lr: float | None = None) -> optax.GradientTransformation:
    """Global-norm clipping at ``optim.grad_clip``, then ``optim.optimizer`` on ``lr_schedule(cfg, lr)``:
    "adamw", or "muon" (Jordan et al. 2024: Nesterov momentum orthogonalized by Newton-Schulz on the blocks'
    matrices, ``muon_dimension_numbers``; updates scaled to AdamW's RMS, 0.2 sqrt(max dim), as in Liu et al.
    2025 "Muon is Scalable", so ``optim.lr`` means the same for both; AdamW with b1/b2 and Nesterov momentum,
    as optax.contrib.muon has it, on the rest, at ``optim.adam_lr`` when > 0, on the same schedule);
    ``optim.muon_ns_steps`` Newton-Schulz iterations with ``newton_schulz_coeffs(optim.muon_ns_coeffs)``."""
    o = cfg.optim
    schedule = lr_schedule(cfg, lr)
    if Optimizer(o.get("optimizer", "adamw")) is Optimizer.ADAMW:
        opt = optax.adamw(schedule, b1=o.b1, b2=o.b2, weight_decay=o.weight_decay)
    else:
        from optax.contrib import muon

        steps = int(o.get("muon_ns_steps", 5))
        adam_lr = float(o.get("adam_lr", 0.0)) * (1.0 if lr is None else lr / o.lr)
        opt = muon(
            schedule,
            ns_coeffs=newton_schulz_coeffs(o.get("muon_ns_coeffs", "standard"), steps),
            ns_steps=steps,
            beta=0.95,
            weight_decay=o.weight_decay,
            adam_b1=o.b1,
            adam_b2=o.b2,
            adam_weight_decay=o.weight_decay,
            adam_learning_rate=lr_schedule(cfg, adam_lr) if adam_lr else None,
            muon_weight_dimension_numbers=functools.partial(
                muon_dimension_numbers, skip=tuple(o.get("muon_skip", ()))
            ),
            consistent_rms=0.2,
        )
    return optax.chain(optax.clip_by_global_norm(o.grad_clip), opt)


def init_state(
    model: nnx.Module,
    tx: optax.GradientTransformation,
    seed: int,
    trainable: nnx.filterlib.Filter = nnx.Param,
) -> TrainState:
    """The initial state of ``model`` (already built): its ``trainable`` params (all ``nnx.Param``s, or with
    LoRA only the adapters, ``nnx.LoRAParam``: the frozen base is not in the state, see ``split_lora``),
    zeroed optimizer state and EMA of those alone."""
    params = nnx.state(model, trainable)
    return {
        "step": jnp.zeros((), jnp.int32),
        "params": params,
        "opt_state": tx.init(params),
        "ema": jax.tree.map(jnp.copy, params),
        "rng": jax.random.key_data(jax.random.key(seed)),
    }


def ema_update(ema, params, decay: float):
    return jax.tree.map(lambda e, p: e * decay + (1.0 - decay) * p.astype(e.dtype), ema, params)


def apply_update(
    state: TrainState, grads: nnx.State, tx: optax.GradientTransformation, ema_decay: float
) -> TrainState:
    """The update every model shares: the optimizer on ``grads``, the EMA of the new params, step + 1 (the
    rest of the state, e.g. a discriminator's, is carried over)."""
    with jax.named_scope("optimizer"):  # named for profiles (benchmarks/cpu_step_profile.py)
        updates, opt_state = tx.update(grads, state["opt_state"], state["params"])
        params = optax.apply_updates(state["params"], updates)
    with jax.named_scope("ema"):
        ema = ema_update(state["ema"], params, ema_decay)
    return {**state, "step": state["step"] + 1, "params": params, "opt_state": opt_state, "ema": ema}


def split_lora(params: nnx.State) -> tuple[nnx.State, nnx.State]:
    """A LoRA model's full params -> (adapters: the ``nnx.LoRAParam``s, base: every other ``nnx.Param``)."""
    return nnx.split_state(params, nnx.LoRAParam, ...)


def with_base(params: nnx.State, frozen: dict) -> nnx.State:
    """The full parameters of the model: ``params`` and, with LoRA, the frozen base ``frozen["base"]``."""
    return nnx.merge_state(frozen["base"], params) if "base" in frozen else params


def dora_start(graphdef: nnx.GraphDef, state: TrainState, base: nnx.State, shardings) -> TrainState:
    """``state`` (a DoRA run's, at step 0) with its magnitudes ``<kernel>_lora_m`` (params and EMA) set from
    the frozen ``base`` (``lora.init_magnitudes``: ``m = ||W||_I``, step 0 is the base): the adapters'
    initialisation saw the seed's base, not ``lora.init_from``'s. ``shardings``: of ``state["params"]``."""

    def start(adapters, base):
        model = nnx.merge(graphdef, nnx.merge_state(base, adapters))
        lora.init_magnitudes(model)
        return nnx.state(model, nnx.LoRAParam)

    params = jax.jit(start, out_shardings=shardings)(state["params"], base)
    copy = jax.jit(lambda p: jax.tree.map(jnp.copy, p), out_shardings=shardings)
    return state | {"params": params, "ema": copy(params)}
