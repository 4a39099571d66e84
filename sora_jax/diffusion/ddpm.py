"""DDPM forward process, parameterisation conversions and posterior, as pure functions of a DDPMSchedule.

``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``. The network predicts either ``eps`` or
``v = sqrt(abar_t) eps - sqrt(1 - abar_t) x0`` (Salimans & Ho 2022). All functions take integer timesteps
``t`` [B] and arrays ``x`` [B, ...]; the schedule may hold numpy float64 or jax float32 tables, and the
arithmetic is done in float32 either way.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from sora_jax.choices import Prediction
from sora_jax.diffusion.schedules import DDPMSchedule


def _gather(table, t: jax.Array, like: jax.Array) -> jax.Array:
    """``table[t]`` [B] reshaped to [B, 1, ..., 1] to broadcast against ``like`` [B, ...]."""
    vals = jnp.asarray(table, dtype=jnp.float32)[jnp.asarray(t, dtype=jnp.int32)]
    return vals.reshape(vals.shape + (1,) * (like.ndim - vals.ndim))


def q_sample(sched: DDPMSchedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """x_t [B, ...] = sqrt(abar_t) x0 + sqrt(1 - abar_t) noise, with x0, noise [B, ...] and t [B] int."""
    return (
        _gather(sched.sqrt_alphas_cumprod, t, x0) * x0
        + _gather(sched.sqrt_one_minus_alphas_cumprod, t, x0) * noise
    )


def v_target(sched: DDPMSchedule, x0: jax.Array, t: jax.Array, noise: jax.Array) -> jax.Array:
    """v [B, ...] = sqrt(abar_t) noise - sqrt(1 - abar_t) x0."""
    return (
        _gather(sched.sqrt_alphas_cumprod, t, x0) * noise
        - _gather(sched.sqrt_one_minus_alphas_cumprod, t, x0) * x0
    )


def predict_x0(
    sched: DDPMSchedule, x_t: jax.Array, t: jax.Array, out: jax.Array, prediction: str
) -> jax.Array:
    """x0 [B, ...] from the network output ``out`` [B, ...] of kind ``prediction`` ("eps" | "v")."""
    prediction = Prediction(prediction)
    if prediction is Prediction.EPS:
        return (
            _gather(sched.sqrt_recip_alphas_cumprod, t, x_t) * x_t
            - _gather(sched.sqrt_recipm1_alphas_cumprod, t, x_t) * out
        )
    return (
        _gather(sched.sqrt_alphas_cumprod, t, x_t) * x_t
        - _gather(sched.sqrt_one_minus_alphas_cumprod, t, x_t) * out
    )


def predict_eps(
    sched: DDPMSchedule, x_t: jax.Array, t: jax.Array, out: jax.Array, prediction: str
) -> jax.Array:
    """eps [B, ...] from the network output ``out`` [B, ...] of kind ``prediction`` ("eps" | "v")."""
    prediction = Prediction(prediction)
    if prediction is Prediction.EPS:
        return out
    return (
        _gather(sched.sqrt_one_minus_alphas_cumprod, t, x_t) * x_t
        + _gather(sched.sqrt_alphas_cumprod, t, x_t) * out
    )


def eps_from_x0(sched: DDPMSchedule, x_t: jax.Array, t: jax.Array, x0: jax.Array) -> jax.Array:
    """eps [B, ...] consistent with x_t and a (possibly clipped) x0 (as _predict_eps_from_xstart)."""
    return (_gather(sched.sqrt_recip_alphas_cumprod, t, x_t) * x_t - x0) / _gather(
        sched.sqrt_recipm1_alphas_cumprod, t, x_t
    )


def q_posterior_mean_variance(
    sched: DDPMSchedule, x0: jax.Array, x_t: jax.Array, t: jax.Array
) -> tuple[jax.Array, jax.Array, jax.Array]:
    """q(x_{t-1} | x_t, x0): mean [B, ...], variance [B, 1...] and clipped log-variance [B, 1...]."""
    mean = (
        _gather(sched.posterior_mean_coef1, t, x_t) * x0 + _gather(sched.posterior_mean_coef2, t, x_t) * x_t
    )
    var = _gather(sched.posterior_variance, t, x_t)
    log_var = _gather(sched.posterior_log_variance_clipped, t, x_t)
    return mean, var, log_var
