"""Training metrics: clu.metrics collections, and writers to stdout, JSON lines and TensorBoard.

TensorBoard event files are written with tensorboardX, which needs no TensorFlow (clu's own writers import
TensorFlow, which the GPU images and the core install do not have). Videos go in as a grid of clips encoded as
an animated GIF in an image summary (what tensorboardX's ``add_video`` writes, without its moviepy); the
Images tab plays it. Only process 0 writes.
"""

import json
import math
from pathlib import Path

import jax
import numpy as np
from clu import metrics as clu_metrics

from sora_jax.data.video_codec import gif_bytes, tile_videos
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


def computed(scalars: dict[str, float]) -> dict[str, float]:
    """``scalars`` without the NaNs that mean "not computed at these steps" (an aux metric of a step whose loss
    changed, e.g. ``repa_cos`` after ``repa.until``); the loss's and gradient norm's are kept (``check_finite``)."""
    return {k: v for k, v in scalars.items() if k in ("loss", "grad_norm") or not math.isnan(v)}


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

    def write_videos(self, step: int, tag: str, videos: np.ndarray, *, fps: float = 8.0) -> None:
        """uint8 videos ``[B, T, H, W, 3]`` as one animated GIF of their ``video_grid`` under ``tag``."""
        if not self.enabled or len(videos) == 0:
            return
        from tensorboardX.proto.summary_pb2 import Summary

        grid = video_grid(videos)
        image = Summary.Image(
            height=grid.shape[1], width=grid.shape[2], colorspace=3, encoded_image_string=gif_bytes(grid, fps)
        )
        # tensorboardX's own add_* go through _get_file_writer().add_summary too
        self._tb._get_file_writer().add_summary(Summary(value=[Summary.Value(tag=tag, image=image)]), step)
        self._tb.flush()

    def close(self) -> None:
        if self.enabled:
            self._tb.close()
            self._jsonl.close()


_GRID_GAP = 2  # pixels between the clips of a grid and around it
_GRID_MIN_SIDE = 64  # clips are upscaled (nearest) until their shorter side is at least this


def video_grid(videos: np.ndarray) -> np.ndarray:
    """uint8 ``[B, T, H, W, 3]`` -> one uint8 video ``[T, Hg, Wg, 3]``: the clips in ``ceil(sqrt(B))`` columns,
    each upscaled by ``s = ceil(64 / min(H, W))``, 2-pixel dark-grey gaps: ``Hg = rows * (H*s + 2) + 2``,
    ``Wg = cols * (W*s + 2) + 2``."""
    videos = np.asarray(videos)
    if videos.ndim != 5 or videos.shape[-1] != 3 or videos.dtype != np.uint8:
        raise ValueError(f"videos must be uint8 [B, T, H, W, 3], got {videos.dtype} {videos.shape}")
    b, _, h, w, _ = videos.shape
    scale = max(1, math.ceil(_GRID_MIN_SIDE / min(h, w)))
    big = np.repeat(np.repeat(videos, scale, axis=2), scale, axis=3)
    return tile_videos(big, math.ceil(math.sqrt(b)), _GRID_GAP, 32, border=True)
