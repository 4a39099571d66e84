"""Training metrics: clu.metrics collections, and writers to stdout, JSON lines and TensorBoard.

TensorBoard event files are written with tensorboardX, which needs no TensorFlow (clu's own writers import
TensorFlow, which the GPU images and the core install do not have). Only process 0 writes.
"""

import json
import math
from pathlib import Path

import jax
import numpy as np
from clu import metrics as clu_metrics


def collection(names) -> type[clu_metrics.Collection]:
    """A clu Collection for a step's metric names: ``lr`` keeps its last value, the rest average."""
    return clu_metrics.Collection.create(
        **{n: (clu_metrics.LastValue if n == "lr" else clu_metrics.Average).from_output(n) for n in names}
    )


class NonFiniteLossError(FloatingPointError):
    """The loss became NaN/Inf; the message names the step."""


def check_finite(losses: list[tuple[int, float]]) -> None:
    """Raises at the first step whose loss is NaN or Inf."""
    for step, value in losses:
        if not math.isfinite(value):
            raise NonFiniteLossError(
                f"loss is {value} at step {step}: lower config.optim.lr or check the data"
            )


class MetricWriter:
    """Scalars to TensorBoard (tensorboardX) and ``metrics.jsonl`` under ``<workdir>``; process 0 only."""

    def __init__(self, workdir: str | Path):
        self.enabled = jax.process_index() == 0
        self._tb = None
        if self.enabled:
            from tensorboardX import SummaryWriter

            Path(workdir).mkdir(parents=True, exist_ok=True)
            self._tb = SummaryWriter(str(Path(workdir) / "tensorboard"))
            self._jsonl = open(Path(workdir) / "metrics.jsonl", "a")  # noqa: SIM115 (closed in close())

    def write_scalars(self, step: int, scalars: dict[str, float]) -> None:
        if not self.enabled:
            return
        clean = {k: float(np.asarray(v)) for k, v in scalars.items()}
        for k, v in clean.items():
            self._tb.add_scalar(k, v, step)
        self._jsonl.write(json.dumps({"step": step, **clean}) + "\n")
        self._jsonl.flush()

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()
