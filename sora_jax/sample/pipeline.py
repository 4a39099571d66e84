"""A trained text-to-video pipeline loaded from a workdir: config, autoencoder, text input, parameters and the
pmap sampler, with ``generate(prompts)``. ``sora_jax.api.load_pipeline`` is this module's ``load_pipeline``.
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx

from sora_jax import factory, loading
from sora_jax.models.autoencoder import Autoencoder
from sora_jax.sample.sampler import PmapSampler


@dataclasses.dataclass
class Pipeline:
    """A trained text-to-video pipeline: config, autoencoder, tokenizer, model graph and (EMA) params."""

    config: ml_collections.ConfigDict
    vae: Autoencoder
    tokenizer: object
    graphdef: nnx.GraphDef
    params: nnx.State
    step: int
    sampler: PmapSampler

    def generate(self, prompts: list[str], *, seed: int = 0, progress: bool = False) -> np.ndarray:
        """uint8 videos [B, T, H, W, 3] for ``prompts`` (non-empty strings)."""
        check_prompts(prompts)
        return self.sampler.generate(self.params, list(prompts), seed=seed, progress=progress)

    @property
    def model(self) -> nnx.Module:
        return nnx.merge(self.graphdef, self.params)


MAX_PROMPT_CHARS = 2000


def check_prompts(prompts: list[str]) -> None:
    if isinstance(prompts, str):
        raise ValueError("prompts must be a list of strings, not one string")
    if not prompts:
        raise ValueError("no prompts given")
    for p in prompts:
        if not isinstance(p, str) or not p.strip():
            raise ValueError("empty prompt: write what the video should show, e.g. 'a 3 moving left'")
        if len(p) > MAX_PROMPT_CHARS:
            raise ValueError(f"prompt of {len(p)} characters is too long (at most {MAX_PROMPT_CHARS})")


def load_pipeline(
    workdir: str | Path, *, step: int | None = None, use_ema: bool | None = None, **sample_overrides
) -> Pipeline:
    """Loads config + params of the latest (or given) checkpoint in ``workdir`` onto the local devices.

    ``sample_overrides``: ``sample_steps``, ``cfg_scale``, ``sampler`` replace the config's diffusion values.
    """
    cfg, step, abstract, params = loading.restore(workdir, step=step, use_ema=use_ema, **sample_overrides)
    ae = loading.load_autoencoder(cfg)
    tokenizer = factory.make_text_input(cfg)
    params = jax.device_get(params)
    sampler = PmapSampler(
        abstract.graphdef,
        tokenizer,
        factory.make_process(cfg),
        ae,
        factory.latent_shape(cfg),
        sampler=cfg.diffusion.sampler,
        num_steps=cfg.diffusion.sample_steps,
        cfg_scale=cfg.diffusion.cfg_scale,
    )
    return Pipeline(cfg, ae, tokenizer, abstract.graphdef, params, step, sampler)
