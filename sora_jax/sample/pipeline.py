"""A trained text-to-video pipeline loaded from a workdir: config, autoencoder, text input, parameters and the
pmap sampler, with ``generate(prompts)``. ``sora_jax.api.load_pipeline`` is this module's ``load_pipeline``.

    pipe = load_pipeline("runs/demo")
    videos = pipe.generate(["a 3 moving left"], seed=0)       # uint8 [B, T, H, W, 3]
    z = pipe.autoencoder.encode(video_to_float(videos))       # latents [B, T', H', W', C] (or pixels)
    emb, mask = pipe.text_input.encode(["a 3 moving left"])   # what the model's text branch takes
"""

from __future__ import annotations

import dataclasses
from collections.abc import Callable, Sequence
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx

from sora_jax import factory, loading
from sora_jax.errors import UserError
from sora_jax.models import lora
from sora_jax.models.autoencoder import Autoencoder
from sora_jax.sample.sampler import PmapSampler, sample_inputs, sample_latents


@dataclasses.dataclass
class Pipeline:
    """A trained text-to-video pipeline: config, autoencoder (a trained VAE, or a pixel codec), text input,
    model graph and (EMA) params, and the sampler.

    ``text_input`` turns prompts into what the model's text branch takes: the HashWordTokenizer's ids
    ``[B, L]`` for the trainable encoder, or a frozen encoder's features ``[B, L, F]`` (``FrozenTextEmbedder``:
    MiniLM, T5), each with a mask ``[B, L]``.

    ``prompt_check``: called with the prompts before any sampling (``generate``, ``generate_latents`` and the
    ``Prompter`` made from this pipeline); raises to refuse them. ``api.load_pipeline`` sets the config's safety
    policy here (``sora_jax.safety.policy.guard``); None checks nothing beyond ``check_prompts``.
    """

    config: ml_collections.ConfigDict
    autoencoder: Autoencoder
    text_input: object
    graphdef: nnx.GraphDef
    params: nnx.State | None
    step: int
    sampler: PmapSampler
    prompt_check: Callable[[list[str]], None] | None = None

    def generate(
        self,
        prompts: list[str],
        *,
        seed: int = 0,
        noise: np.ndarray | None = None,
        progress: bool = False,
    ) -> np.ndarray:
        """uint8 videos [B, T, H, W, 3] for ``prompts`` (non-empty strings).

        ``noise``: float32 ``[B, T', H', W', C]`` in the model's latent space, channels last (the layout of
        ``pipe.autoencoder.encode``): the initial noise instead of the draw from ``seed`` (an exported
        ``SoraPipeline`` given the same numbers as ``latents=noise.transpose(0, 4, 1, 2, 3)`` makes the
        same videos)."""
        self._check(prompts)
        return self.sampler.generate(self.params, list(prompts), seed=seed, noise=noise, progress=progress)

    def generate_latents(
        self, prompts: list[str], *, seed: int = 0, noise: np.ndarray | None = None
    ) -> np.ndarray:
        """The sampled latents float32 ``[B, T', H', W', C]`` of ``generate`` (before decoding)."""
        self._check(prompts)
        inputs = sample_inputs(
            self.text_input, list(prompts), self.sampler.latent_shape, seed=seed, noise=noise
        )
        fn = jax.jit(lambda params, inputs: sample_latents(self.sampler.spec, params, inputs))
        return np.asarray(fn(self.params, inputs))

    def _check(self, prompts: list[str]) -> None:
        check_prompts(prompts)
        if self.prompt_check is not None:
            self.prompt_check(list(prompts))

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
    workdir: str | Path,
    *,
    step: int | str | None = None,
    use_ema: bool | None = None,
    adapters: Sequence[tuple[lora.Adapters, float]] = (),
    merge_adapters: bool = True,
    **sample_overrides,
) -> Pipeline:
    """Loads config + params of the latest (or given) checkpoint in ``workdir`` onto the local devices;
    ``step="best"``: the best checkpoint kept by evaluation during training (``config.eval.best_metric``).

    ``adapters``: LoRA adapters with their weights (``(Adapters, w)``, read for this workdir's model by
    ``sora_jax.export.lora_files.read_adapters``), merged into the kernels (``merge_adapters``: no cost per
    step) or attached unmerged (one rank-concatenated adapter per kernel; exact, slower per step).
    ``sample_overrides``: ``sample_steps``, ``cfg_scale``, ``sampler`` replace the config's diffusion values.
    """
    from sora_jax.choices import Task
    from sora_jax.config import task

    _, saved = loading.saved_config(workdir, step)
    if task(saved) is not Task.T2V:
        raise UserError(
            f"{workdir} holds a {task(saved).value} model, not a text-to-video one (its autoencoder: "
            "sora_jax.api.load_autoencoder)"
        )
    cfg, step, abstract, params = loading.restore(workdir, step=step, use_ema=use_ema, **sample_overrides)
    graphdef = abstract.graphdef
    if adapters:
        model = nnx.merge(graphdef, params)
        (lora.merge_adapters if merge_adapters else lora.attach_adapters)(model, adapters)
        graphdef, params = nnx.split(model, nnx.Param)
    return pipeline_from_params(cfg, graphdef, jax.device_get(params), step)


def pipeline_from_params(
    cfg: ml_collections.ConfigDict,
    graphdef: nnx.GraphDef,
    params: nnx.State | None,
    step: int,
    *,
    devices: list[jax.Device] | None = None,
) -> Pipeline:
    """The pipeline of a resolved config (``loading.resolve_autoencoder``) around parameters already in memory
    (host arrays of the model ``graphdef``; None when each call brings its own, as the evaluator during
    training does), sampling with the pmap sampler over ``devices`` (default: the local devices). The one way
    a Pipeline is built: ``load_pipeline`` reads the parameters from a checkpoint and calls this."""
    ae = loading.load_autoencoder(cfg)
    text_input = factory.make_text_input(cfg)
    sampler = PmapSampler(
        graphdef,
        text_input,
        factory.make_process(cfg),
        ae,
        factory.latent_shape(cfg),
        sampler=cfg.diffusion.sampler,
        num_steps=cfg.diffusion.sample_steps,
        cfg_scale=cfg.diffusion.cfg_scale,
        jitter=float(cfg.diffusion.get("sample_jitter", 0.0)),
        devices=devices,
    )
    return Pipeline(cfg, ae, text_input, graphdef, params, step, sampler)
