"""The Python API for notebooks and scripts: load a trained pipeline from a workdir, generate, read videos.

from sora_jax import api
pipe = api.load_pipeline("runs/demo")
videos = pipe.generate(["a 3 moves left"], seed=0)   # uint8 [B, T, H, W, 3]
api.read_videos(videos)                               # [[(3, "left")]]
"""

from __future__ import annotations

import numpy as np

from sora_jax.sample.pipeline import MAX_PROMPT_CHARS, Pipeline, check_prompts, load_pipeline

__all__ = ("MAX_PROMPT_CHARS", "Pipeline", "check_prompts", "load_pipeline", "read_videos")


def read_videos(videos: np.ndarray) -> list[list[tuple[int, str]]]:
    """The adherence evaluator's reading of uint8 videos [B, T, H, W, 3]: per video [(digit, direction)]."""
    from sora_jax.eval.digit_reader import read_videos as _read

    return _read(videos)
