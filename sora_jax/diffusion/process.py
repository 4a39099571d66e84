"""The diffusion process the trainer and samplers use: one object, DDPM or rectified flow, validated once.

    process = make_process("ddpm", prediction="v", schedule="cosine", num_timesteps=1000)
    loss = process.training_loss(apply_fn, x0, key)                    # [B]
    x0 = process.sample(apply_fn, noise, key, sampler="ddim", num_steps=50)

Model convention: ``apply_fn(x_t [B, ...], model_time [B] float32) -> out [B, ...]`` (same shape as x_t).
``model_time`` is what the network embeds:

- DDPM: the integer timestep as a float in [0, num_timesteps - 1] (respaced samplers pass the original
  timestep, as guided-diffusion's SpacedDiffusion does); ``out`` is eps or v per ``prediction``.
- rectified flow: ``1000 t`` with t in [0, 1] (t=1 is pure noise); ``out`` is the velocity noise - x0
  (``flow_prediction="v"``) or x0 itself (``"x0"``; the samplers convert it to a velocity).

Sampling loops are ``lax.fori_loop``/``lax.scan`` over steps, so ``sample`` can be traced by ``jax.jit``
(``sampler`` and ``num_steps`` are static Python values).
"""

from __future__ import annotations

import dataclasses
import enum
from collections.abc import Callable

import jax
import jax.numpy as jnp
import numpy as np

from sora_jax.choices import (
    SAMPLERS,
    FlowPrediction,
    FlowTimeGrid,
    Objective,
    Prediction,
    Sampler,
    ScheduleKind,
    TimestepSampling,
)
from sora_jax.diffusion import ddpm, flow, unipc
from sora_jax.diffusion.schedules import DDPMSchedule, make_schedule, respace, space_timesteps

ApplyFn = Callable[[jax.Array, jax.Array], jax.Array]


def _parse(enum_cls: type[enum.StrEnum], value, name: str, allowed=None):
    allowed = tuple(enum_cls) if allowed is None else allowed
    try:
        parsed = enum_cls(value)
    except ValueError:
        parsed = None
    if parsed is None or parsed not in allowed:
        raise ValueError(f"unknown {name} {value!r}; allowed: {', '.join(a.value for a in allowed)}")
    return parsed


def _masked_mean(sq: jax.Array, loss_mask: jax.Array | None) -> jax.Array:
    """Per-example mean [B] of sq [B, ...] over non-batch dims, only where loss_mask is 1.

    loss_mask: None, [B, T] (per frame; broadcast over the trailing dims of x [B, T, ...]) or any shape
    broadcastable to sq. An example whose mask is all zero gets loss 0.
    """
    sq = sq.astype(jnp.float32)
    axes = tuple(range(1, sq.ndim))
    if loss_mask is None:
        return jnp.mean(sq, axis=axes)
    mask = jnp.asarray(loss_mask, jnp.float32)
    mask = mask.reshape(mask.shape + (1,) * (sq.ndim - mask.ndim))
    mask = jnp.broadcast_to(mask, sq.shape)
    return jnp.sum(sq * mask, axis=axes) / jnp.maximum(jnp.sum(mask, axis=axes), 1.0)


@dataclasses.dataclass(frozen=True, eq=False)
class Process:
    """A validated diffusion process. Build with ``make_process``; all methods are pure."""

    objective: Objective
    prediction: Prediction = Prediction.EPS
    schedule: DDPMSchedule | None = None  # DDPM only, float64 tables
    flow_timestep_sampling: TimestepSampling = TimestepSampling.LOGIT_NORMAL
    flow_shift: float = 1.0
    flow_prediction: FlowPrediction = FlowPrediction.V
    flow_time_grid: FlowTimeGrid | None = None  # None: each flow sampler's default grid
    # flow only: lambda of contrastive flow matching (Stoica et al. 2025, "Contrastive Flow Matching"): the loss
    # also pushes the predicted velocity away from another example's target, lambda * |v_hat - v_other|^2
    # subtracted (the next example of the batch, rolled); 0: plain flow matching
    contrastive: float = 0.0

    @property
    def num_timesteps(self) -> int:
        return self.schedule.num_timesteps if self.schedule is not None else 0

    @property
    def is_flow(self) -> bool:
        return self.objective is Objective.RECTIFIED_FLOW

    def model_time(self, t: jax.Array) -> jax.Array:
        """Network time [B] float32: DDPM integer timestep t [B] as float; flow t [B] in [0,1] times 1000."""
        return flow.model_time(t) if self.is_flow else jnp.asarray(t, jnp.float32)

    def velocity_fn(self, apply_fn: ApplyFn) -> ApplyFn:
        """Flow only: ``apply_fn`` as a velocity model (x0-predictions converted by v = (x_t - x0) / t)."""
        if self.flow_prediction is FlowPrediction.V:
            return apply_fn

        def velocity(x: jax.Array, mt: jax.Array) -> jax.Array:
            return flow.velocity_from_x0(x, apply_fn(x, mt), mt / flow.TIME_SCALE).astype(x.dtype)

        return velocity

    def check_sampler(self, sampler: str) -> Sampler:
        """The parsed sampler, or ValueError naming it and the samplers of this objective."""
        return _parse(
            Sampler, sampler, f"sampler for objective {self.objective.value!r}", SAMPLERS[self.objective]
        )

    # ---------------------------------------------------------------- training

    def training_loss(
        self,
        apply_fn: ApplyFn,
        x0: jax.Array,
        key: jax.Array,
        *,
        loss_mask: jax.Array | None = None,
        cond_mask: jax.Array | None = None,
    ) -> jax.Array:
        """Per-example MSE [B] between apply_fn(x_t, model_time) and the target, for x0 [B, T, ...].

        DDPM: t ~ U{0..N-1}, target eps or v. Flow: t from the configured sampling, target noise - x0, or
        for x0-prediction the v-loss ``((out - x0) / max(t, 0.05))^2``.
        ``loss_mask`` ([B, T] or broadcastable to x0) restricts the average to where it is 1.
        ``cond_mask`` (bool [B, T], frames given as conditioning): those frames enter clean (x_t = x0), the
        model gets a time per frame ``[B, T]`` that is 0 on them, and they are left out of the loss.
        """
        batch = x0.shape[0]
        key_t, key_noise = jax.random.split(key)
        noise = jax.random.normal(key_noise, x0.shape, jnp.float32).astype(x0.dtype)
        if self.is_flow:
            t = flow.sample_time(key_t, batch, self.flow_timestep_sampling, self.flow_shift)
            x_t = flow.interpolate(x0, noise, t).astype(x0.dtype)
        else:
            t = jax.random.randint(key_t, (batch,), 0, self.num_timesteps)
            x_t = ddpm.q_sample(self.schedule, x0, t, noise).astype(x0.dtype)
        model_time = self.model_time(t)
        if cond_mask is not None:
            cond_mask = jnp.asarray(cond_mask, jnp.bool_)
            x_t = jnp.where(_frames(cond_mask, x0), x0, x_t)
            model_time = frame_times(model_time, cond_mask)
            keep = (~cond_mask).astype(jnp.float32)
            loss_mask = keep if loss_mask is None else jnp.asarray(loss_mask, jnp.float32) * keep
        out = apply_fn(x_t, model_time)
        if self.is_flow and self.contrastive:
            return self._contrastive_loss(out, x_t, x0, noise, t, loss_mask)
        if self.is_flow and self.flow_prediction is FlowPrediction.X0:
            return _masked_mean(flow.x0_loss(out, x0, t), loss_mask)
        if self.is_flow:
            target = flow.velocity_target(x0, noise)
        elif self.prediction is Prediction.EPS:
            target = noise
        else:
            target = ddpm.v_target(self.schedule, x0, t, noise)
        sq = jnp.square(out.astype(jnp.float32) - target.astype(jnp.float32))
        return _masked_mean(sq, loss_mask)

    def _contrastive_loss(self, out, x_t, x0, noise, t, loss_mask) -> jax.Array:
        """Contrastive flow matching's per-example loss [B]: ``|v_hat - v|^2 - lambda |v_hat - v'|^2`` where
        v' = noise' - x0' of the batch's next example (rolled by one). For x0-prediction v_hat is
        ``(x_t - out) / max(t, 0.05)``, so the first term is ``flow.x0_loss`` exactly."""
        target = flow.velocity_target(x0, noise).astype(jnp.float32)
        if self.flow_prediction is FlowPrediction.X0:
            tb = jnp.maximum(flow._bcast(t, x0), flow.X0_MIN_T)
            v_hat = (x_t.astype(jnp.float32) - out.astype(jnp.float32)) / tb
            positive = flow.x0_loss(out, x0, t)
        else:
            v_hat = out.astype(jnp.float32)
            positive = jnp.square(v_hat - target)
        negative = jnp.square(v_hat - jnp.roll(target, 1, axis=0))
        return _masked_mean(positive - self.contrastive * negative, loss_mask)

    # ---------------------------------------------------------------- sampling

    def sample(
        self,
        apply_fn: ApplyFn,
        noise: jax.Array,
        key: jax.Array,
        *,
        sampler: str,
        num_steps: int,
        eta: float = 0.0,
        clip_denoised: bool = True,
        shift: float | None = None,
        cond: jax.Array | None = None,
        cond_mask: jax.Array | None = None,
        init: jax.Array | None = None,
        strength: float = 1.0,
        history_scale: float = 0.0,
        time_grid: str | None = None,
    ) -> jax.Array:
        """Generates x0 [B, T, ...] from noise [B, T, ...].

        DDPM: "ddpm" (ancestral, fixed-small variance) or "ddim" (``eta``; 0 is deterministic), both over
        ``num_steps`` evenly respaced timesteps, predicting x0 and clipping it to [-1, 1] when
        ``clip_denoised``. Flow: "euler" or "heun" over ``num_steps`` uniform steps from t=1 to 0, shifted by
        ``shift`` (default: the process's ``flow_shift``); ``key``, ``eta`` and ``clip_denoised`` are unused.
        "unipc": UniPC multistep (order 2, bh2, predictor-corrector; ``unipc.py``) as Wan samples.
        ``time_grid`` (flow; default: the process's ``flow_time_grid``, else the sampler's): "uniform" (the
        default of euler and heun) or "diffusers" (the default of unipc): the grid of diffusers' own
        scheduler, so that a ``WanPipeline`` run is reproduced (see ``FlowTimeGrid``; heun has none).

        ``key``: one key, or typed keys ``[B]`` (one per sample) for the stochastic samplers.
        Conditioning on frames: ``cond`` (clean latents like ``noise``) on the frames where ``cond_mask``
        (bool [B, T]) is set; those frames are held clean at time 0 in every model call (as trained with
        mask strategies) and returned exactly. Editing (SDEdit, Meng et al. 2022): with ``init`` (clean
        latents) and ``strength`` s in (0, 1], sampling starts from ``init`` noised to the level of the first
        step whose noise level is <= s (t <= s for flow, timestep <= s N for DDPM) and runs the remaining
        steps; s = 1 is plain generation.

        History guidance (``history_scale`` w != 0, with ``cond_mask``; after Song et al. 2025, "History-Guided
        Video Diffusion"): every model call also runs with the given frames noised to the call's own level
        (with their share of ``noise``: a window as plain text-to-video sees it), and returns
        ``out_h + w (out_h - out_n)``: the prediction pushed towards what the clean frames add (the object's
        identity and position) over what their noisy version does. w = 0 is plain conditioning.
        """
        s = self.check_sampler(sampler)
        if time_grid is not None and not self.is_flow:
            raise ValueError(f"time_grid={time_grid!r} is for the rectified_flow objective only")
        if not 0.0 < float(strength) <= 1.0:
            raise ValueError(f"strength must be in (0, 1], got {strength!r}")
        if cond_mask is not None:
            if cond is None:
                raise ValueError("cond_mask needs cond (the clean latents of the conditioning frames)")
            apply_fn = self._conditioned(
                apply_fn, cond, jnp.asarray(cond_mask, jnp.bool_), history_scale, noise
            )
        if self.is_flow:
            shift = self.flow_shift if shift is None else shift
            if cond_mask is None:
                apply_fn = self.velocity_fn(apply_fn)
            grid = time_grid if time_grid is not None else self.flow_time_grid
            ts, model_times = _flow_grid(s, grid, num_steps, shift)
            start = _first_at_or_below(ts[:-1], strength) if init is not None else 0
            x = (
                noise
                if init is None
                else flow.interpolate(init, noise, jnp.full((noise.shape[0],), ts[start]))
            )
            if s is Sampler.EULER:
                out = flow.euler_sample(
                    apply_fn, x.astype(noise.dtype), num_steps, shift, start=start, times=ts
                )
            elif s is Sampler.HEUN:
                out = flow.heun_sample(apply_fn, x.astype(noise.dtype), num_steps, shift, start=start)
            else:
                out = unipc.unipc_sample(apply_fn, x.astype(noise.dtype), ts, model_times, start=start)
        else:
            out = self._ddpm_sample(apply_fn, noise, key, s, num_steps, eta, clip_denoised, init, strength)
        if cond_mask is not None:
            out = jnp.where(_frames(cond_mask, out), cond.astype(out.dtype), out)
        return out

    def _conditioned(
        self,
        apply_fn: ApplyFn,
        cond: jax.Array,
        cond_mask: jax.Array,
        history_scale: float = 0.0,
        noise: jax.Array | None = None,
    ) -> ApplyFn:
        """apply_fn with the conditioning frames clean at time 0; for flow a velocity model whose velocity is
        zero on them (x0-predictions converted per frame). With ``history_scale`` the history-guided
        combination (see ``sample``) of that and a call with those frames noised by ``noise``."""
        where = _frames(cond_mask, cond)
        inner = self.velocity_fn(apply_fn) if self.is_flow else apply_fn
        scale = float(history_scale)

        def apply(x: jax.Array, model_time: jax.Array) -> jax.Array:
            x_h = jnp.where(where, cond.astype(x.dtype), x)
            t_h = frame_times(model_time, cond_mask)
            if scale == 0.0:
                out = inner(x_h, t_h)
            else:
                x_n = jnp.where(where, self._noised(cond, noise, model_time).astype(x.dtype), x)
                t_n = jnp.broadcast_to(model_time[:, None], cond_mask.shape).astype(jnp.float32)
                out_h, out_n = (
                    inner(x_h, t_h),
                    inner(x_n, t_n),
                )  # two calls: the text conditioning is per batch
                out = out_h + scale * (out_h - out_n)
            return jnp.where(where, jnp.zeros_like(out), out) if self.is_flow else out

        return apply

    def _noised(self, x0: jax.Array, noise: jax.Array, model_time: jax.Array) -> jax.Array:
        """x0 [B, ...] noised with ``noise`` to the level of network time ``model_time`` [B]."""
        if self.is_flow:
            return flow.interpolate(x0, noise, model_time / flow.TIME_SCALE)
        t = jnp.round(model_time).astype(jnp.int32)
        return ddpm.q_sample(self.schedule, x0, t, noise)

    def _ddpm_sample(self, apply_fn, noise, key, sampler, num_steps, eta, clip_denoised, init, strength):
        kept = space_timesteps(self.num_timesteps, num_steps)
        sched = respace(self.schedule, kept).to_jax()
        timestep_map = jnp.asarray(kept, jnp.float32)
        batch = noise.shape[0]
        start = 0
        if init is not None:  # the first respaced step (from the noisy end) at or below strength * N
            levels = np.asarray(kept[::-1], np.float64) / (self.num_timesteps - 1)
            start = _first_at_or_below(levels, strength)
            t0 = jnp.full((batch,), kept[num_steps - 1 - start], jnp.int32)
            noise = ddpm.q_sample(self.schedule, init, t0, noise).astype(noise.dtype)

        def body(j, x):
            i = num_steps - 1 - j  # respaced index, from num_steps - 1 down to 0
            ti = jnp.full((batch,), i, jnp.int32)
            out = apply_fn(x, jnp.full((batch,), timestep_map[i])).astype(jnp.float32)
            x0 = ddpm.predict_x0(sched, x, ti, out, self.prediction)
            if clip_denoised:
                x0 = jnp.clip(x0, -1.0, 1.0)
            z = _step_noise(key, j, x.shape)
            nonzero = (i > 0).astype(jnp.float32)
            if sampler is Sampler.DDPM:
                mean, _, log_var = ddpm.q_posterior_mean_variance(sched, x0, x, ti)
                return mean + nonzero * jnp.exp(0.5 * log_var) * z
            eps = ddpm.eps_from_x0(sched, x, ti, x0)
            a = sched.alphas_cumprod[i]
            a_prev = sched.alphas_cumprod_prev[i]
            sigma = eta * jnp.sqrt((1.0 - a_prev) / (1.0 - a)) * jnp.sqrt(1.0 - a / a_prev)
            mean = x0 * jnp.sqrt(a_prev) + jnp.sqrt(jnp.maximum(1.0 - a_prev - sigma**2, 0.0)) * eps
            return mean + nonzero * sigma * z

        x = jax.lax.fori_loop(start, num_steps, body, noise.astype(jnp.float32))
        return x.astype(noise.dtype)


def _flow_grid(sampler: Sampler, time_grid: str | FlowTimeGrid | None, num_steps: int, shift: float):
    """(times [num_steps + 1] float32 numpy, network times [num_steps] or None) of a flow sampler."""
    default = FlowTimeGrid.DIFFUSERS if sampler is Sampler.UNIPC else FlowTimeGrid.UNIFORM
    grid = default if time_grid is None else _parse(FlowTimeGrid, time_grid, "time_grid")
    if grid is FlowTimeGrid.UNIFORM:
        ts = flow.sampling_times(num_steps, shift)
        if sampler is not Sampler.UNIPC:
            return ts, None
        sig = unipc.sigmas_from_times(ts)
        return sig, sig[:-1] * np.float32(flow.TIME_SCALE)
    if sampler is Sampler.EULER:
        return flow.flow_match_euler_times(num_steps, shift), None
    if sampler is Sampler.UNIPC:
        return unipc.flow_sigmas(num_steps, shift)
    raise ValueError(f"time_grid {grid.value!r} has no {sampler.value!r} sampler; use euler or unipc")


def _step_noise(key: jax.Array, j, shape: tuple[int, ...]) -> jax.Array:
    """The stochastic samplers' noise of step j: from ``fold_in(key, j)``, or with a batch of typed keys
    ``[B]`` one draw per sample (so a sample's video does not depend on the rest of its batch)."""
    if key.shape == (shape[0],) and jnp.issubdtype(key.dtype, jax.dtypes.prng_key):
        return jax.vmap(lambda k: jax.random.normal(jax.random.fold_in(k, j), shape[1:], jnp.float32))(key)
    return jax.random.normal(jax.random.fold_in(key, j), shape, jnp.float32)


def _first_at_or_below(levels, strength: float) -> int:
    """Index of the first of the decreasing noise ``levels`` that is <= strength (a static Python int)."""
    levels = np.asarray(levels, np.float64)
    below = np.nonzero(levels <= float(strength) + 1e-9)[0]
    return int(below[0]) if below.size else len(levels) - 1


def _frames(cond_mask: jax.Array, like: jax.Array) -> jax.Array:
    """A per-frame mask [B, T] broadcast over the trailing dims of ``like`` [B, T, ...]."""
    return cond_mask.reshape(cond_mask.shape + (1,) * (like.ndim - cond_mask.ndim))


def frame_times(model_time: jax.Array, cond_mask: jax.Array) -> jax.Array:
    """Per-frame model time [B, T]: ``model_time`` [B] (or already [B, T]) on free frames, 0 on conditioned."""
    mt = model_time if model_time.ndim == 2 else jnp.broadcast_to(model_time[:, None], cond_mask.shape)
    return jnp.where(cond_mask, 0.0, mt).astype(jnp.float32)


def make_process(
    objective: str,
    *,
    prediction: str = "eps",
    schedule: str = "cosine",
    num_timesteps: int = 1000,
    flow_timestep_sampling: str = "logit_normal",
    flow_shift: float = 1.0,
    flow_prediction: str = "v",
    time_grid: str = "",
    contrastive: float = 0.0,
) -> Process:
    """Validates the names once and builds the Process; ValueError names a bad value and the allowed ones.

    objective: "ddpm" | "rectified_flow". DDPM only: prediction "eps" | "v", schedule "linear" | "cosine",
    num_timesteps. Flow only: flow_timestep_sampling "uniform" | "logit_normal", flow_shift > 0,
    flow_prediction "v" | "x0", time_grid "" (each sampler's default) | "uniform" | "diffusers", contrastive
    (contrastive flow matching's lambda, in [0, 1)).
    """
    obj = _parse(Objective, objective, "objective")
    pred = _parse(Prediction, prediction, "prediction")
    kind = _parse(ScheduleKind, schedule, "schedule")
    sampling = _parse(TimestepSampling, flow_timestep_sampling, "flow_timestep_sampling")
    flow_pred = _parse(FlowPrediction, flow_prediction, "flow_prediction")
    if not flow_shift > 0:
        raise ValueError(f"flow_shift must be > 0, got {flow_shift!r}")
    grid = _parse(FlowTimeGrid, time_grid, "time_grid") if time_grid else None
    if not 0.0 <= contrastive < 1.0:
        raise ValueError(f"contrastive must be in [0, 1), got {contrastive!r}")
    if contrastive and obj is not Objective.RECTIFIED_FLOW:
        raise ValueError("contrastive flow matching is for the rectified_flow objective only")
    if obj is Objective.RECTIFIED_FLOW:
        return Process(
            obj,
            flow_timestep_sampling=sampling,
            flow_shift=float(flow_shift),
            flow_prediction=flow_pred,
            flow_time_grid=grid,
            contrastive=float(contrastive),
        )
    if grid is not None:
        raise ValueError(f"time_grid={time_grid!r} is for the rectified_flow objective only")
    if int(num_timesteps) < 2:
        raise ValueError(f"num_timesteps must be >= 2, got {num_timesteps!r}")
    return Process(obj, prediction=pred, schedule=make_schedule(kind, int(num_timesteps)))


def process_from_config(diffusion_config) -> Process:
    """``make_process`` from a config's ``diffusion`` section (keys as in configs/quickstart.py)."""
    c = diffusion_config
    return make_process(
        c.objective,
        prediction=c.get("prediction", "eps"),
        schedule=c.get("schedule", "cosine"),
        num_timesteps=c.get("num_timesteps", 1000),
        flow_timestep_sampling=c.get("flow_timestep_sampling", "logit_normal"),
        flow_shift=c.get("flow_shift", 1.0),
        flow_prediction=c.get("flow_prediction", "v"),
        time_grid=c.get("time_grid", ""),
        contrastive=c.get("contrastive", 0.0),
    )
