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

from sora_jax.errors import UserError


def collection(names) -> type[clu_metrics.Collection]:
    """A clu Collection for a step's metric names: ``lr`` keeps its last value, the rest average."""
    return clu_metrics.Collection.create(
        **{n: (clu_metrics.LastValue if n == "lr" else clu_metrics.Average).from_output(n) for n in names}
    )


class NonFiniteLossError(UserError, FloatingPointError):
    """The loss became NaN/Inf; the message names the step and what to change (one line on the CLI)."""


def check_finite(steps: list[tuple[int, dict]]) -> None:
    """Raises at the first step whose loss (or gradient norm: the update it made) is NaN or Inf.

    steps: [(step, metrics on the host, with ``loss`` and maybe ``grad_norm``)]."""
    for step, m in steps:
        for name in ("loss", "grad_norm"):
            if name in m and not math.isfinite(float(m[name])):
                raise NonFiniteLossError(
                    f"{name} is {float(m[name])} at step {step}: lower config.optim.lr or check the data "
                    "(no checkpoint of this state was written)"
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
