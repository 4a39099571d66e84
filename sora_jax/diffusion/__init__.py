"""Diffusion: noise schedules, noising, loss targets, samplers and classifier-free guidance (pure functions).

Start from ``make_process`` (or ``process_from_config``); see ``process.py`` for the model-time convention.
"""

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
from sora_jax.diffusion.ddpm import (
    eps_from_x0,
    predict_eps,
    predict_x0,
    q_posterior_mean_variance,
    q_sample,
    v_target,
)
from sora_jax.diffusion.flow import (
    flow_match_euler_times,
    interpolate,
    resolution_shift,
    sample_time,
    sampling_times,
    shift_time,
    velocity_from_x0,
    velocity_target,
    x0_loss,
)
from sora_jax.diffusion.guidance import cfg_apply
from sora_jax.diffusion.process import (
    Process,
    make_process,
    process_from_config,
)
from sora_jax.diffusion.schedules import (
    DDPMSchedule,
    cosine_betas,
    linear_betas,
    make_schedule,
    respace,
    space_timesteps,
)
from sora_jax.diffusion.unipc import flow_sigmas as unipc_flow_sigmas
from sora_jax.diffusion.unipc import unipc_sample

__all__ = [
    "SAMPLERS",
    "DDPMSchedule",
    "Objective",
    "Prediction",
    "Process",
    "Sampler",
    "ScheduleKind",
    "FlowPrediction",
    "FlowTimeGrid",
    "TimestepSampling",
    "cfg_apply",
    "cosine_betas",
    "eps_from_x0",
    "flow_match_euler_times",
    "interpolate",
    "linear_betas",
    "make_process",
    "make_schedule",
    "predict_eps",
    "predict_x0",
    "process_from_config",
    "q_posterior_mean_variance",
    "q_sample",
    "resolution_shift",
    "respace",
    "sample_time",
    "sampling_times",
    "shift_time",
    "space_timesteps",
    "v_target",
    "velocity_from_x0",
    "velocity_target",
    "unipc_flow_sigmas",
    "unipc_sample",
    "x0_loss",
]
