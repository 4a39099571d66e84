"""Rectified flow (as in SD3, Open-Sora 2, Wan): straight paths from data at t=0 to noise at t=1.

``x_t = (1 - t) x0 + t noise``; the network predicts the velocity ``dx_t/dt = noise - x0`` (``"v"``) or the
clean sample ``x0`` (``"x0"``, as in JiT, Li & He 2025 "Back to Basics: Let Denoising Generative Models
Denoise"). x0-prediction keeps the network's output on the data manifold, so a token can carry more values
than the model is wide (large pixel patches); it is trained with the v-loss
``|v(x0_hat) - v|^2 = |x0_hat - x0|^2 / t^2`` with t clipped at ``X0_MIN_T`` in the denominator, and sampled by
converting to ``v = (x_t - x0_hat) / t``. The network is given ``model_time = 1000 t`` (``model_time``) so
timestep embeddings see the same range as in DDPM.
Training times are uniform or logit-normal (SD3: ``t = sigmoid(m + s n)``, n ~ N(0, 1)), optionally pushed
toward the noise end by the shift ``t' = shift t / (1 + (shift - 1) t)`` (SD3 eq. 23; larger shift for
more tokens, see ``resolution_shift``). Sampling integrates the ODE from t=1 to t=0.
"""

from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.choices import TimestepSampling

TIME_SCALE = 1000.0
X0_MIN_T = 0.05  # JiT's clip of t in the v-loss denominator for x0-prediction


def model_time(t: jax.Array) -> jax.Array:
    """What the network embeds [B] float32: ``1000 t`` for t [B] in [0, 1]."""
    return jnp.asarray(t, jnp.float32) * TIME_SCALE


def _bcast(t: jax.Array, like: jax.Array) -> jax.Array:
    t = jnp.asarray(t, jnp.float32)
    return t.reshape(t.shape + (1,) * (like.ndim - t.ndim))


def interpolate(x0: jax.Array, noise: jax.Array, t: jax.Array) -> jax.Array:
    """x_t [B, ...] = (1 - t) x0 + t noise, with t [B] in [0, 1]."""
    tb = _bcast(t, x0)
    return (1.0 - tb) * x0 + tb * noise


def velocity_target(x0: jax.Array, noise: jax.Array) -> jax.Array:
    """The regression target [B, ...]: noise - x0."""
    return noise - x0


def velocity_from_x0(x_t: jax.Array, x0_hat: jax.Array, t: jax.Array) -> jax.Array:
    """v [B, ...] = (x_t - x0_hat) / t for t [B] > 0: the velocity an x0-prediction implies (samplers never
    evaluate at t = 0; t is floored at 1e-6 only to keep a stray call finite)."""
    tb = jnp.maximum(_bcast(t, x_t), 1e-6)
    return (x_t.astype(jnp.float32) - x0_hat.astype(jnp.float32)) / tb


def x0_loss(x0_hat: jax.Array, x0: jax.Array, t: jax.Array) -> jax.Array:
    """The v-loss of an x0-prediction, elementwise [B, ...]: ((x0_hat - x0) / max(t, X0_MIN_T))^2."""
    tb = jnp.maximum(_bcast(t, x0), X0_MIN_T)
    return jnp.square((x0_hat.astype(jnp.float32) - x0.astype(jnp.float32)) / tb)


def shift_time(t: jax.Array, shift: float | jax.Array) -> jax.Array:
    """t' = shift t / (1 + (shift - 1) t); shift > 1 spends more time near noise. shift=1 is identity."""
    return shift * t / (1.0 + (shift - 1.0) * t)


def resolution_shift(num_tokens: int, base_tokens: int = 256) -> float:
    """SD3's resolution-dependent shift sqrt(num_tokens / base_tokens) (1.0 at the base resolution)."""
    if num_tokens <= 0 or base_tokens <= 0:
        raise ValueError(f"token counts must be positive, got {num_tokens=} {base_tokens=}")
    return math.sqrt(num_tokens / base_tokens)


def sample_time(
    key: jax.Array,
    batch: int,
    sampling: str = "logit_normal",
    shift: float = 1.0,
    *,
    mean: float = 0.0,
    std: float = 1.0,
) -> jax.Array:
    """Training times t [batch] float32 in (0, 1): uniform or logit-normal(mean, std), then shifted."""
    sampling = TimestepSampling(sampling)
    if sampling is TimestepSampling.UNIFORM:
        t = jax.random.uniform(key, (batch,), jnp.float32)
    else:
        t = jax.nn.sigmoid(mean + std * jax.random.normal(key, (batch,), jnp.float32))
    return shift_time(t, shift)


def sampling_times(num_steps: int, shift: float = 1.0) -> np.ndarray:
    """The [num_steps + 1] times 1 = t_0 > ... > t_num_steps = 0 of the ODE solver (uniform, then shifted);
    a static float32 numpy array, so callers can pick steps from it at trace time (SDEdit's start)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    return shift_time(np.linspace(1.0, 0.0, num_steps + 1), float(shift)).astype(np.float32)


def flow_match_euler_times(num_steps: int, shift: float = 1.0, num_train_timesteps: int = 1000) -> np.ndarray:
    """diffusers' ``FlowMatchEulerDiscreteScheduler(shift=shift)`` grid [num_steps + 1] float32 (its sigmas; the
    network gets ``1000 t`` as here). Not ``sampling_times``: diffusers spaces num_steps points (not num_steps + 1)
    from 1 to its shifted sigma_min = shift(1/1000), shifts them again (sigma_min is shifted twice) and appends 0.
    """
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    s1 = np.float32(1.0 / num_train_timesteps)
    sigma_min = float(np.float32(shift) * s1 / (np.float32(1.0) + np.float32(shift - 1.0) * s1))
    s = np.linspace(num_train_timesteps, sigma_min * num_train_timesteps, num_steps) / num_train_timesteps
    s = shift * s / (1.0 + (shift - 1.0) * s)
    return np.concatenate([s.astype(np.float32), np.zeros(1, np.float32)])


def euler_sample(
    apply_fn,
    noise: jax.Array,
    num_steps: int,
    shift: float = 1.0,
    *,
    start: int = 0,
    times: np.ndarray | None = None,
) -> jax.Array:
    """Integrates dx/dt = apply_fn(x, 1000 t) from t=1 (x = noise [B, ...]) to t=0 with Euler steps.

    ``start`` > 0 skips the first steps: ``noise`` is then x at ``sampling_times(...)[start]`` (SDEdit).
    ``times`` [num_steps + 1] replaces ``sampling_times(num_steps, shift)`` (e.g. ``flow_match_euler_times``)."""
    ts = (sampling_times(num_steps, shift) if times is None else np.asarray(times, np.float32))[start:]
    batch = noise.shape[0]

    def step(x, t_pair):
        t, t_next = t_pair
        v = apply_fn(x, model_time(jnp.full((batch,), t)))
        return x + (t_next - t) * v.astype(x.dtype), None

    x, _ = jax.lax.scan(step, noise, (ts[:-1], ts[1:]))
    return x


def heun_sample(
    apply_fn,
    noise: jax.Array,
    num_steps: int,
    shift: float = 1.0,
    *,
    start: int = 0,
    times: np.ndarray | None = None,
) -> jax.Array:
    """Heun (2nd order) from t=1 to t=0; the final step to t=0 is plain Euler (as in EDM), so the model
    is never evaluated at t=0. Costs 2 * num_steps - 1 model calls (fewer from ``start``, as in Euler).
    ``times`` as in ``euler_sample``."""
    ts = (sampling_times(num_steps, shift) if times is None else np.asarray(times, np.float32))[start:]
    batch = noise.shape[0]

    def vel(x, t):
        return apply_fn(x, model_time(jnp.full((batch,), t))).astype(x.dtype)

    def step(x, t_pair):
        t, t_next = t_pair
        v = vel(x, t)
        x_euler = x + (t_next - t) * v
        v_next = vel(x_euler, t_next)
        return x + (t_next - t) * 0.5 * (v + v_next), None

    x, _ = jax.lax.scan(step, noise, (ts[:-2], ts[1:-1]))
    return x + (ts[-1] - ts[-2]) * vel(x, ts[-2])
