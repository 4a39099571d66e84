"""UniPC multistep (Zhao et al. 2023, "UniPC: A Unified Predictor-Corrector Framework for Fast Sampling of
Diffusion Models") for the rectified-flow objective, as Wan samples: diffusers' ``UniPCMultistepScheduler``
with ``prediction_type="flow_prediction"``, ``use_flow_sigmas=True``, ``predict_x0=True``, ``solver_type="bh2"``,
``solver_order=2``, ``lower_order_final=True``, ``final_sigmas_type="zero"`` (WanPipeline's scheduler).

On the flow path ``x_s = (1 - s) x0 + s noise`` (alpha = 1 - s, sigma = s, lambda = log(alpha / sigma)) the
velocity ``v`` is turned into the data prediction ``m = x - s v``; each step runs the corrector UniC on the new
``m`` (except the first step), then the predictor UniP of the step's order from the last ``solver_order``
data predictions. Every coefficient depends only on the static sigma table, so it is computed once in numpy
(float64 from diffusers' float32 sigmas) and the loop is one ``lax.scan`` whose body calls the model once:
jit-able, compile time independent of the number of steps.

The scheduler's time grid (``flow_sigmas``) is not ``flow.sampling_times``: diffusers spaces
``linspace(1, 1/1000, N + 1)[:-1]`` (N points, the last one 1/1000 short of zero), shifts them, lowers the first
by 1e-6 (so lambda is finite), appends 0, and gives the network the *integer* timesteps
``int64(1000 sigma)`` (truncated: 999, not 1000, first).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

NUM_TRAIN_TIMESTEPS = 1000
SOLVER_TYPES = ("bh1", "bh2")


def flow_sigmas(
    num_steps: int, shift: float = 1.0, num_train_timesteps: int = NUM_TRAIN_TIMESTEPS
) -> tuple[np.ndarray, np.ndarray]:
    """diffusers' UniPC flow grid: (sigmas [num_steps + 1] float32, 1 - 1e-6 > ... > 0, model times [num_steps]
    float32, the integer timesteps ``int64(num_train_timesteps * sigma)`` the network embeds)."""
    if num_steps < 1:
        raise ValueError(f"num_steps must be >= 1, got {num_steps}")
    s = np.linspace(1.0, 1.0 / num_train_timesteps, num_steps + 1)[:-1]
    s = shift * s / (1.0 + (shift - 1.0) * s)
    if abs(s[0] - 1.0) < 1e-6:
        s[0] -= 1e-6
    times = (s * num_train_timesteps).astype(np.int64).astype(np.float32)
    return np.concatenate([s, [0.0]]).astype(np.float32), times


def sigmas_from_times(ts: np.ndarray) -> np.ndarray:
    """A decreasing time grid ts [N + 1] (e.g. ``flow.sampling_times``) made usable by UniPC: float32, the first
    value lowered by 1e-6 when it is 1 (as diffusers does), so that lambda = log((1 - s) / s) stays finite."""
    s = np.asarray(ts, np.float64).copy()
    if abs(s[0] - 1.0) < 1e-6:
        s[0] -= 1e-6
    return s.astype(np.float32)


class Coefficients(NamedTuple):
    """Per-step scalars of the UniPC update, each [n] (or [n, S - 1]) float32, S = solver_order.

    corrector: ``x <- cx x + ca x_last + cb m[0] + ce (sum_k ck[k] (m[k] - m[0]) + ct (m_new - m[0]))``
    predictor: ``x_next = pa x + pb m_new + pe sum_k pk[k] (m'[k] - m_new)``, m' the history after the update.
    """

    cx: np.ndarray
    ca: np.ndarray
    cb: np.ndarray
    ce: np.ndarray
    ck: np.ndarray
    ct: np.ndarray
    pa: np.ndarray
    pb: np.ndarray
    pe: np.ndarray
    pk: np.ndarray


def _lam(s: float) -> float:
    with np.errstate(divide="ignore"):
        return float(np.log(1.0 - s) - np.log(s))


def _rhos(rks: list[float], hh: float, b_h: float, order: int) -> tuple[np.ndarray, float]:
    """diffusers' R and b of the B(h) update: R[i] = rks^i, b[i] = h phi_{i+1}(h) i! / B(h), i < order."""
    h_phi_1 = np.expm1(hh)
    h_phi_k = h_phi_1 / hh - 1.0
    factorial_i = 1
    rows, b = [], []
    rks = np.asarray(list(rks) + [1.0], np.float64)
    for i in range(1, order + 1):
        rows.append(rks ** (i - 1))
        b.append(h_phi_k * factorial_i / b_h)
        factorial_i *= i + 1
        h_phi_k = h_phi_k / hh - 1.0 / factorial_i
    return np.stack(rows), np.asarray(b)


def _update(sig: np.ndarray, s0: int, t: int, prev: list[int], solver_type: str):
    """The B(h) update from sigma index s0 to t with earlier points ``prev``: (ratio sigma_t / sigma_s0,
    -alpha_t h phi_1 (the m0 coefficient), -alpha_t B(h), [rk], R, b)."""
    alpha_t, sigma_t = 1.0 - float(sig[t]), float(sig[t])
    lam_s0 = _lam(float(sig[s0]))
    with np.errstate(divide="ignore", invalid="ignore"):
        h = _lam(float(sig[t])) - lam_s0
        rks = [(_lam(float(sig[p])) - lam_s0) / h for p in prev]
        hh = -h
        h_phi_1 = np.expm1(hh)
        b_h = hh if solver_type == "bh1" else np.expm1(hh)
        R, b = _rhos(rks, hh, b_h, len(prev) + 1)
    return sigma_t / float(sig[s0]), -alpha_t * h_phi_1, -alpha_t * b_h, rks, R, b


def coefficients(
    sigmas: np.ndarray,
    *,
    start: int = 0,
    solver_order: int = 2,
    solver_type: str = "bh2",
    lower_order_final: bool = True,
    disable_corrector: tuple[int, ...] = (),
) -> Coefficients:
    """The static coefficients of steps start .. N-1 over ``sigmas`` [N + 1] (decreasing, last 0), as diffusers'
    ``step`` computes them: warm-up orders from ``start``, order 1 at the last step (``lower_order_final``),
    no corrector on the first step or after a step listed in ``disable_corrector``."""
    if solver_order not in (1, 2, 3):
        raise ValueError(f"solver_order must be 1, 2 or 3, got {solver_order}")
    if solver_type not in SOLVER_TYPES:
        raise ValueError(f"solver_type must be one of {SOLVER_TYPES}, got {solver_type!r}")
    sig = np.asarray(sigmas, np.float32)
    num = len(sig) - 1
    if not 0 <= start < num:
        raise ValueError(f"start must be in [0, {num}), got {start}")
    if sig[-1] == 0 and not lower_order_final and solver_order > 1:
        raise ValueError(
            "lower_order_final=False with a final sigma of 0 divides by zero (NaN in diffusers too)"
        )
    S = solver_order
    rows = {f: [] for f in Coefficients._fields}
    order_prev, done = 0, 0
    for i in range(start, num):
        k_c, k_p = np.zeros(max(S - 1, 1)), np.zeros(max(S - 1, 1))
        if i > start and (i - 1) not in disable_corrector:  # UniC from i - 1 to i, of the last step's order
            p = order_prev
            ratio, cb, ce, rks, R, b = _update(sig, i - 1, i, [i - 1 - k for k in range(1, p)], solver_type)
            rhos = np.array([0.5]) if p == 1 else np.linalg.solve(R, b)
            for k in range(1, p):
                k_c[k - 1] = rhos[k - 1] / rks[k - 1]
            c = dict(cx=0.0, ca=ratio, cb=cb, ce=ce, ct=rhos[-1])
        else:
            c = dict(cx=1.0, ca=0.0, cb=0.0, ce=0.0, ct=0.0)
        order = min(S, num - i) if lower_order_final else S
        order = min(order, done + 1)
        ratio, pb, pe, rks, R, b = _update(sig, i, i + 1, [i - k for k in range(1, order)], solver_type)
        if order == 2:
            rhos_p = np.array([0.5])
        elif order > 2:
            rhos_p = np.linalg.solve(R[:-1, :-1], b[:-1])
        for k in range(1, order):
            k_p[k - 1] = rhos_p[k - 1] / rks[k - 1]
        if order == 1:
            pe = 0.0  # no history term (B(h) is infinite at sigma = 0 with bh1)
        for f, v in dict(c, ck=k_c, pa=ratio, pb=pb, pe=pe, pk=k_p).items():
            rows[f].append(v)
        order_prev, done = order, min(done + 1, S)
    return Coefficients(**{f: np.asarray(v, np.float64).astype(np.float32) for f, v in rows.items()})


def unipc_trajectory(
    apply_fn,
    noise: jax.Array,
    sigmas: np.ndarray,
    model_times: np.ndarray,
    *,
    start: int = 0,
    solver_order: int = 2,
    solver_type: str = "bh2",
    lower_order_final: bool = True,
    disable_corrector: tuple[int, ...] = (),
) -> tuple[jax.Array, jax.Array]:
    """Runs UniPC from sigma index ``start`` (x = noise [B, ...] at ``sigmas[start]``) to the end of ``sigmas``
    [N + 1]; ``apply_fn(x [B, ...], model_time [B]) -> velocity [B, ...]`` is called at ``model_times`` [N].

    Returns (x [B, ...] at sigma_N, the states after every step [N - start, B, ...]); float32 throughout, cast
    back to noise's dtype at the end.
    """
    co = coefficients(
        sigmas,
        start=start,
        solver_order=solver_order,
        solver_type=solver_type,
        lower_order_final=lower_order_final,
        disable_corrector=tuple(disable_corrector),
    )
    batch = noise.shape[0]
    sig = jnp.asarray(np.asarray(sigmas, np.float32)[start:-1])
    times = jnp.asarray(np.asarray(model_times, np.float32)[start:])
    x = noise.astype(jnp.float32)
    hist = jnp.zeros((solver_order, *x.shape), jnp.float32)  # data predictions, newest first

    def step(carry, per_step):
        x, x_last, hist = carry
        s, mt, c = per_step
        v = apply_fn(x, jnp.full((batch,), mt)).astype(jnp.float32)
        m_new = x - s * v
        m0 = hist[0]
        res = c.ct * (m_new - m0)
        for k in range(1, solver_order):
            res = res + c.ck[k - 1] * (hist[k] - m0)
        x = c.cx * x + (c.ca * x_last + c.cb * m0) + c.ce * res
        hist = jnp.concatenate([m_new[None], hist[:-1]], axis=0)
        res = jnp.zeros_like(x)
        for k in range(1, solver_order):
            res = res + c.pk[k - 1] * (hist[k] - m_new)
        x_next = (c.pa * x + c.pb * m_new) + c.pe * res
        return (x_next, x, hist), x_next

    co_j = Coefficients(*(jnp.asarray(a) for a in co))
    (x, _, _), xs = jax.lax.scan(step, (x, x, hist), (sig, times, co_j))
    return x.astype(noise.dtype), xs


def unipc_sample(
    apply_fn, noise: jax.Array, sigmas: np.ndarray, model_times: np.ndarray, **kwargs
) -> jax.Array:
    """x [B, ...] at the end of ``sigmas`` from noise [B, ...]; see ``unipc_trajectory`` for the arguments."""
    return unipc_trajectory(apply_fn, noise, sigmas, model_times, **kwargs)[0]
