"""The Python API for notebooks and scripts: everything the command line does, from Python.

    from sora_jax import api

    pipe = api.load_pipeline("runs/demo")                # config + autoencoder + DiT + text input of the
    videos = pipe.generate(["a 3 moves left"], seed=0)    # latest checkpoint; uint8 [B, T, H, W, 3]
    api.read_videos(videos)                               # [[(3, "left")]]: the adherence evaluator's reading

    text = api.load_text_encoder("minilm", max_length=32)  # or a local T5 / UMT5 folder
    states, mask = text.encode(["a 3 moves left"])         # float32 [B, L, D] (0 at padding), bool [B, L]

    cfg, step, abstract, params = api.restore("runs/demo")  # the EMA parameters alone, onto one device

- ``load_pipeline(workdir, step=None, use_ema=None, sample_steps=, cfg_scale=, sampler=)`` -> ``Pipeline``
  (``config``, ``step``, ``params``, ``model``, ``generate(prompts, seed=, progress=)``). Video prompting
  (i2v, extend, connect, edit, loop, long videos) is ``sora_jax.sample.prompter.Prompter.from_pipeline``.
- ``read_videos(videos uint8 [B, T, H, W, 3])`` -> per video a list of (digit 0-9, direction) pairs, the
  direction one of left right up down up-left up-right down-left down-right.
- ``load_text_encoder("minilm" | folder, max_length=128, dtype="float32")`` -> an object with
  ``encode(texts) -> (states [B, L, D], mask [B, L])`` and ``output_dim`` (``sora_jax/text/loader.py``).
- ``restore(workdir, step=None, use_ema=None)`` -> (config, step, abstract state, parameters).
- The commands themselves, with typed arguments: ``sora_jax.commands.train / sample / evaluate``.

Bad input raises ``sora_jax.errors.UserError`` (a ValueError) with one line saying what to fix.
"""

from __future__ import annotations

import numpy as np

from sora_jax.loading import restore
from sora_jax.sample.pipeline import MAX_PROMPT_CHARS, Pipeline, check_prompts, load_pipeline
from sora_jax.text.loader import load_text_encoder

__all__ = (
    "MAX_PROMPT_CHARS",
    "Pipeline",
    "check_prompts",
    "load_pipeline",
    "load_text_encoder",
    "read_videos",
    "restore",
)


def read_videos(videos: np.ndarray) -> list[list[tuple[int, str]]]:
    """The adherence evaluator's reading of uint8 videos [B, T, H, W, 3]: per video [(digit, direction)]."""
    from sora_jax.eval.digit_reader import read_videos as _read

    return _read(videos)
