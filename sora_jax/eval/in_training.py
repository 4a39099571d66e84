"""Evaluation during training (``config.eval``): the sampler on in-memory (EMA) weights, scored by the metrics
suite (``sora_jax.eval.suite``).

Owns ``InTrainingEvaluator``, built once per run: the prompts, the sampler's host inputs and the pmapped
sampler are made once, so only the first evaluation compiles; each call brings new parameters. Also the
best-so-far rule (``improves``) and the contact sheet of an evaluation. The trainer (``sora_jax.train.loop``)
calls it every ``config.eval.every_steps`` steps and writes what it returns; it never touches the train state,
the data stream or the training key, so the losses are the same with it on or off.

    evaluator = InTrainingEvaluator(cfg, graphdef, workdir)
    ev = evaluator(jax.device_get(state["ema"]), step)     # ev.scalars {"adherence": ...}, ev.videos uint8
"""

from __future__ import annotations

import dataclasses
import time
from pathlib import Path

import jax
import ml_collections
import numpy as np
from flax import nnx

from sora_jax.config import ConfigError, eval_metric_names
from sora_jax.data.pipeline import dataset_dir
from sora_jax.errors import UserError
from sora_jax.eval import suite
from sora_jax.eval.evaluate import split_prompts
from sora_jax.sample.pipeline import Pipeline, pipeline_from_params
from sora_jax.sample.sampler import sample_inputs
from sora_jax.sample.video_io import contact_sheet

REF_SPLIT = "test"  # the dataset split whose clips are the distance metrics' reference


def check_config(cfg: ml_collections.ConfigDict) -> list[str]:
    """The metric names of ``config.eval.metrics``, checked against the suite (a ConfigError naming the key);
    cheap: the trainer calls it before compiling."""
    try:
        return suite.parse_metrics(eval_metric_names(cfg))
    except UserError as e:
        raise ConfigError(f"config.eval.metrics = {cfg.eval.metrics!r}: {e}") from None


def eval_prompts(cfg: ml_collections.ConfigDict, workdir: str | Path) -> list[str]:
    """``config.eval.num_videos`` prompts: captions of the dataset split ``config.eval.prompts`` names, drawn
    with ``config.eval.seed`` (``split_prompts``), or the config's tuple of prompts; either cycled to
    ``num_videos`` (every video has its own noise)."""
    e = cfg.eval
    if isinstance(e.prompts, str):
        chosen = split_prompts(dataset_dir(cfg, workdir), e.prompts, e.num_videos, e.seed)
        if not chosen:
            raise ConfigError(f"config.eval.prompts = {e.prompts!r}: that split has no captions")
    else:
        chosen = list(e.prompts)
    return [chosen[i % len(chosen)] for i in range(e.num_videos)]


@dataclasses.dataclass(frozen=True)
class Evaluation:
    """One evaluation: the suite's results ({metric: {"value", "count", "higher_is_better", ...}}), their
    flat ``scalars``, the sampled uint8 ``videos`` ``[num_videos, T, H, W, 3]`` for ``prompts``, and the
    wall-clock ``seconds`` (sampling + scoring)."""

    step: int
    results: dict[str, dict]
    scalars: dict[str, float]
    videos: np.ndarray
    prompts: list[str]
    seconds: float


class InTrainingEvaluator:
    """Samples ``config.eval``'s prompts with given parameters and scores them with its metrics.

    ``cfg``: a resolved config (``loading.resolve_autoencoder``); ``graphdef``: the trained model's graph;
    ``workdir``: where the dataset is when ``config.data.path`` is empty; ``devices``: the pmap sampler's
    (default: the local devices). ``pipeline`` holds the parameters of the latest call.
    """

    def __init__(
        self,
        cfg: ml_collections.ConfigDict,
        graphdef: nnx.GraphDef,
        workdir: str | Path,
        *,
        devices: list[jax.Device] | None = None,
    ):
        self.metrics = check_config(cfg)
        self.data_dir = dataset_dir(cfg, workdir)
        self.prompts = eval_prompts(cfg, workdir)
        self.pipeline: Pipeline = pipeline_from_params(cfg, graphdef, None, step=0, devices=devices)
        sampler = self.pipeline.sampler
        self.inputs = sample_inputs(
            self.pipeline.text_input, self.prompts, sampler.latent_shape, seed=cfg.eval.seed
        )

    def __call__(self, params: nnx.State, step: int) -> Evaluation:
        """Evaluates host ``params`` (every process of a multi-host job passes the same, full ones)."""
        t0 = time.perf_counter()
        self.pipeline = dataclasses.replace(self.pipeline, params=params, step=step)
        videos = self.pipeline.sampler.generate_inputs(params, self.inputs)
        results = suite.score_videos(
            videos, self.prompts, self.metrics, data_dir=self.data_dir, ref_split=REF_SPLIT
        )
        return Evaluation(
            step, results, suite.scalars(results), videos, self.prompts, time.perf_counter() - t0
        )


def improves(value: float, higher_is_better: bool, best: dict | None) -> bool:
    """Whether ``value`` beats ``best`` (best.json's {"value", ...}; None: no best yet) in the metric's
    direction. A NaN never improves."""
    if not np.isfinite(value):
        return False
    if best is None:
        return True
    return value > best["value"] if higher_is_better else value < best["value"]


def save_samples(evaluation: Evaluation, out_dir: str | Path, count: int) -> Path:
    """The first ``count`` videos of ``evaluation`` with their prompts as ``<out_dir>/samples_<step>.png``
    (``contact_sheet``: one row per video)."""
    path = Path(out_dir) / f"samples_{evaluation.step}.png"
    path.parent.mkdir(parents=True, exist_ok=True)
    contact_sheet(evaluation.videos[:count], evaluation.prompts[:count], path)
    return path
