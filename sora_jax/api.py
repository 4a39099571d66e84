"""The Python API for notebooks and scripts: load a trained pipeline from a workdir, generate, read videos.

from sora_jax import api
pipe = api.load_pipeline("runs/demo")
videos = pipe.generate(["a 3 moves left"], seed=0)   # uint8 [B, T, H, W, 3]
api.read_videos(videos)                               # [[(3, "left")]]
"""

from __future__ import annotations

import dataclasses
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx

from sora_jax import config as config_lib
from sora_jax import factory
from sora_jax.models.autoencoder import Autoencoder
from sora_jax.parallel.mesh import make_mesh
from sora_jax.sample.sampler import PmapSampler
from sora_jax.train import checkpoint
from sora_jax.train.loop import build_train_fns


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


def restore(
    workdir: str | Path, *, step: int | None = None, use_ema: bool | None = None, **diffusion_overrides
) -> tuple[ml_collections.ConfigDict, int, nnx.GraphDef, nnx.State]:
    """(config, step, graphdef, params on the host) of the latest (or given) checkpoint in ``workdir``;
    EMA parameters unless ``use_ema`` is False (default: the config's ``sample.use_ema``)."""
    step, cfg = checkpoint.restore_config(workdir, step)
    cfg = ml_collections.ConfigDict(config_lib.upgrade(cfg.to_dict()))
    for key, value in diffusion_overrides.items():
        if value is not None:
            cfg.diffusion[key] = value
    config_lib.validate(cfg)
    mesh_cfg = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1, "seq": 1})
    mesh = make_mesh(mesh_cfg, jax.local_devices()[:1])
    _, _, state_sharding, abstract_state, graphdef = build_train_fns(cfg, mesh)
    abstract = jax.tree.map(
        lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s), abstract_state, state_sharding
    )
    use_ema = cfg.sample.use_ema if use_ema is None else use_ema
    key = "ema" if use_ema else "params"
    step, params = checkpoint.restore_subtree(workdir, key, abstract[key], step=step)  # no optimizer state
    return cfg, step, graphdef, jax.device_get(params)


def load_pipeline(
    workdir: str | Path, *, step: int | None = None, use_ema: bool | None = None, **sample_overrides
) -> Pipeline:
    """Loads config + params of the latest (or given) checkpoint in ``workdir`` onto the local devices.

    ``sample_overrides``: ``sample_steps``, ``cfg_scale``, ``sampler`` replace the config's diffusion values.
    """
    cfg, step, graphdef, params = restore(workdir, step=step, use_ema=use_ema, **sample_overrides)
    ae = factory.make_autoencoder(cfg)
    tokenizer = factory.make_tokenizer(cfg)
    sampler = PmapSampler(
        graphdef,
        tokenizer,
        factory.make_process(cfg),
        ae,
        factory.latent_shape(cfg),
        sampler=cfg.diffusion.sampler,
        num_steps=cfg.diffusion.sample_steps,
        cfg_scale=cfg.diffusion.cfg_scale,
    )
    return Pipeline(cfg, ae, tokenizer, graphdef, params, step, sampler)


def read_videos(videos: np.ndarray) -> list[list[tuple[int, str]]]:
    """The adherence evaluator's reading of uint8 videos [B, T, H, W, 3]: per video [(digit, direction)]."""
    from sora_jax.eval.digit_reader import read_videos as _read

    return _read(videos)
