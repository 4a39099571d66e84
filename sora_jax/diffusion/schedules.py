"""DDPM noise schedules: beta tables and the derived quantities of guided-diffusion's GaussianDiffusion.

Tables are computed once in numpy float64 (``make_schedule``) and cast to float32 ``jax.Array`` copies
(``DDPMSchedule.to_jax``) for jitted code. ``respace`` builds the schedule of a subset of timesteps, as
guided-diffusion's ``SpacedDiffusion`` does, so ancestral sampling can take fewer steps than training.

Notation: N timesteps ``t = 0 .. N-1``; ``alphas_cumprod[t]`` is ``abar_t``, with
``x_t = sqrt(abar_t) x0 + sqrt(1 - abar_t) eps``.
"""

from __future__ import annotations

import dataclasses
import math
from collections.abc import Sequence
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.choices import ScheduleKind


def linear_betas(n: int, beta_start: float = 1e-4, beta_end: float = 0.02) -> np.ndarray:
    """Linear betas [n] float64; ``beta_start``/``beta_end`` are the 1000-step values, scaled by 1000/n."""
    if n < 1:
        raise ValueError(f"linear_betas: n must be >= 1, got {n}")
    scale = 1000.0 / n
    return np.linspace(scale * beta_start, scale * beta_end, n, dtype=np.float64)


def cosine_alpha_bar(t: np.ndarray, s: float = 0.008) -> np.ndarray:
    """Continuous ``abar(t) = cos^2(((t + s) / (1 + s)) * pi / 2)`` for t in [0, 1] (unnormalised)."""
    return np.cos((np.asarray(t, np.float64) + s) / (1.0 + s) * math.pi / 2) ** 2


def cosine_betas(n: int, s: float = 0.008, max_beta: float = 0.999) -> np.ndarray:
    """Cosine betas [n] float64: ``beta_i = min(1 - abar((i+1)/n) / abar(i/n), max_beta)``."""
    if n < 1:
        raise ValueError(f"cosine_betas: n must be >= 1, got {n}")
    i = np.arange(n, dtype=np.float64)
    betas = 1.0 - cosine_alpha_bar((i + 1) / n, s) / cosine_alpha_bar(i / n, s)
    return np.minimum(betas, max_beta)


@dataclasses.dataclass(frozen=True)
class DDPMSchedule:
    """All per-timestep tables [N] of a Gaussian diffusion, as in guided-diffusion's GaussianDiffusion.

    Fields are numpy float64 after ``make_schedule``/``from_betas`` and float32 ``jax.Array`` after
    ``to_jax()``. Registered as a pytree, so it can be passed through ``jax.jit``.
    """

    betas: Any
    alphas_cumprod: Any
    alphas_cumprod_prev: Any
    sqrt_alphas_cumprod: Any
    sqrt_one_minus_alphas_cumprod: Any
    sqrt_recip_alphas_cumprod: Any
    sqrt_recipm1_alphas_cumprod: Any
    posterior_variance: Any
    posterior_log_variance_clipped: Any
    posterior_mean_coef1: Any
    posterior_mean_coef2: Any

    @property
    def num_timesteps(self) -> int:
        return int(self.betas.shape[0])

    @classmethod
    def from_betas(cls, betas: np.ndarray) -> DDPMSchedule:
        """Derives every table from betas [N] in float64."""
        betas = np.asarray(betas, dtype=np.float64)
        if betas.ndim != 1 or betas.size == 0:
            raise ValueError(f"betas must be a non-empty 1-D array, got shape {betas.shape}")
        if not np.all((betas > 0) & (betas <= 1)):
            raise ValueError("betas must lie in (0, 1]")
        alphas = 1.0 - betas
        ac = np.cumprod(alphas)
        ac_prev = np.append(1.0, ac[:-1])
        post_var = betas * (1.0 - ac_prev) / (1.0 - ac)
        # The posterior variance is 0 at t=0; guided-diffusion clips the log by reusing the t=1 value.
        first = post_var[1] if betas.size > 1 else betas[0]
        post_log_var = np.log(np.append(first, post_var[1:]))
        return cls(
            betas=betas,
            alphas_cumprod=ac,
            alphas_cumprod_prev=ac_prev,
            sqrt_alphas_cumprod=np.sqrt(ac),
            sqrt_one_minus_alphas_cumprod=np.sqrt(1.0 - ac),
            sqrt_recip_alphas_cumprod=np.sqrt(1.0 / ac),
            sqrt_recipm1_alphas_cumprod=np.sqrt(1.0 / ac - 1.0),
            posterior_variance=post_var,
            posterior_log_variance_clipped=post_log_var,
            posterior_mean_coef1=betas * np.sqrt(ac_prev) / (1.0 - ac),
            posterior_mean_coef2=(1.0 - ac_prev) * np.sqrt(alphas) / (1.0 - ac),
        )

    def to_jax(self) -> DDPMSchedule:
        """A copy whose tables are float32 ``jax.Array`` [N]."""
        return jax.tree.map(lambda a: jnp.asarray(a, dtype=jnp.float32), self)


jax.tree_util.register_dataclass(
    DDPMSchedule, data_fields=[f.name for f in dataclasses.fields(DDPMSchedule)], meta_fields=[]
)


def make_schedule(kind: str, n: int) -> DDPMSchedule:
    """Builds the float64 schedule of ``kind`` ("linear" | "cosine") with ``n`` timesteps."""
    try:
        kind = ScheduleKind(kind)
    except ValueError:
        allowed = ", ".join(k.value for k in ScheduleKind)
        raise ValueError(f"unknown schedule {kind!r}; allowed: {allowed}") from None
    betas = linear_betas(n) if kind is ScheduleKind.LINEAR else cosine_betas(n)
    return DDPMSchedule.from_betas(betas)


def space_timesteps(num_timesteps: int, num_steps: int) -> np.ndarray:
    """``num_steps`` evenly spaced timesteps [num_steps] int from 0 to ``num_timesteps - 1`` inclusive.

    The single-section case of guided-diffusion's ``space_timesteps`` (fractional stride, rounded).
    """
    if not 1 <= num_steps <= num_timesteps:
        raise ValueError(f"num_steps must be in [1, {num_timesteps}], got {num_steps}")
    if num_steps == 1:
        return np.array([num_timesteps - 1])
    stride = (num_timesteps - 1) / (num_steps - 1)
    return np.array([round(i * stride) for i in range(num_steps)], dtype=np.int64)


def respace(sched: DDPMSchedule, use_timesteps: Sequence[int]) -> DDPMSchedule:
    """The schedule over the kept timesteps (sorted, increasing), as guided-diffusion's SpacedDiffusion.

    New betas are ``1 - abar[k_i] / abar[k_{i-1}]`` so the respaced ``alphas_cumprod`` equals the original
    at the kept timesteps. Index i of the result corresponds to original timestep ``use_timesteps[i]``.
    """
    kept = np.asarray(use_timesteps, dtype=np.int64)
    if kept.ndim != 1 or kept.size == 0 or np.any(np.diff(kept) <= 0):
        raise ValueError("use_timesteps must be a non-empty strictly increasing sequence")
    ac = np.asarray(sched.alphas_cumprod, dtype=np.float64)[kept]
    betas = 1.0 - ac / np.append(1.0, ac[:-1])
    return DDPMSchedule.from_betas(betas)
