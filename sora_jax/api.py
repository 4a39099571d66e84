"""The Python API for notebooks and scripts: everything the command line does, from Python.

    from sora_jax import api

    pipe = api.load_pipeline("runs/demo")                # config + autoencoder + DiT + text input of the
    videos = pipe.generate(["a 3 moves left"], seed=0)    # latest checkpoint; uint8 [B, T, H, W, 3]
    api.read_videos(videos)                               # [[(3, "left")]]: the adherence evaluator's reading

    text = api.load_text_encoder("minilm", max_length=32)  # or a local T5 / UMT5 folder
    states, mask = text.encode(["a 3 moves left"])         # float32 [B, L, D] (0 at padding), bool [B, L]

    cfg, step, abstract, params = api.restore("runs/demo")  # the EMA parameters alone, onto one device

Loading (a workdir's checkpoints):
- ``load_pipeline(workdir, step=None | int | "best", use_ema=None, sample_steps=, cfg_scale=, sampler=)``
  -> ``Pipeline`` (``config``, ``step``, ``params``, ``model``, ``autoencoder``, ``generate(prompts, seed=)``).
- ``load_prompter(workdir or Pipeline)`` -> ``Prompter``: video prompting (``i2v``, ``extend``, ``connect``,
  ``edit``, ``loop``, ``long_video``; ``sora_jax/sample/prompter.py``).
- ``load_autoencoder(workdir, step=None)`` -> ``WorkdirAutoencoder``: a VAE workdir's VAE, or the autoencoder a
  DiT workdir's model works through (a pixel codec, ``identity`` / ``luma``, or its VAE), with uint8 in/out.
- ``restore(workdir, step=None, use_ema=None)`` -> (config, step, abstract state, parameters).
- ``load_text_encoder("minilm" | folder, max_length=128, dtype="float32")`` -> an object with
  ``encode(texts) -> (states [B, L, D], mask [B, L])`` and ``output_dim`` (``sora_jax/text/loader.py``).

What a workdir holds:
- ``read_metrics(workdir)`` -> the ``metrics.jsonl`` rows, one dict per logged step (training scalars and
  ``eval/<metric>`` ones); ``list_checkpoints(workdir)`` -> one dict per checkpoint (step, time, bytes, config);
  ``best_checkpoint(workdir)`` -> the best step evaluation during training kept, or None.
- ``data_dir(workdir)``, ``dataset_prompts(workdir, split, num, seed)``, ``dataset_clips(workdir, split, num,
  seed)`` -> the workdir's dataset folder, captions of a split, clips (uint8 [B, T, H, W, 3]) with captions.

Scoring:
- ``read_videos(videos uint8 [B, T, H, W, 3])`` -> per video a list of (digit 0-9, direction) pairs, the
  direction one of ``DIRECTIONS`` (left right up down up-left up-right down-left down-right).
- ``evaluate_prompts(videos, prompts)`` -> (adherence metrics, per-video rows); ``adherence_confusion(rows)``
  -> digit and direction confusion matrices; ``score_videos(videos, prompts, ["adherence", ...], data_dir=)``
  -> the metrics table by name (``sora_jax/eval/suite.py``); ``psnr_per_frame(a, b)`` -> dB [B, T].

Viewing: ``save_video(path, video, fps)`` (MP4 or GIF by suffix), ``video_grid(videos, cols)`` -> one video of
the videos tiled. The notebooks in ``notebooks/`` use this module alone. The commands themselves, with typed
arguments: ``sora_jax.commands.train / sample / evaluate``.

Bad input raises ``sora_jax.errors.UserError`` (a ValueError) with one line saying what to fix. Every prompt of
``load_pipeline``'s and ``load_prompter``'s objects goes through the workdir config's safety policy before any
sampling (``sora_jax/safety/policy.py``); a refused one raises ``sora_jax.errors.PromptRefused`` (a UserError)
naming the rule, never the prompt.
"""

from __future__ import annotations

import dataclasses
import json
import warnings
from pathlib import Path

import jax
import numpy as np

from sora_jax.data.video_codec import tile_videos
from sora_jax.errors import UserError
from sora_jax.eval.adherence import Confusion, adherence_confusion, evaluate_prompts
from sora_jax.eval.digit_reader import DIRECTIONS
from sora_jax.eval.suite import score_videos
from sora_jax.loading import restore
from sora_jax.models.autoencoder import Autoencoder, float_to_video, video_to_float
from sora_jax.safety.policy import guard
from sora_jax.sample import pipeline as _pipeline
from sora_jax.sample.pipeline import MAX_PROMPT_CHARS, Pipeline, check_prompts
from sora_jax.sample.prompter import Prompter
from sora_jax.sample.video_io import save_video as _save_video
from sora_jax.text.loader import load_text_encoder

__all__ = (
    "DIRECTIONS",
    "MAX_PROMPT_CHARS",
    "Confusion",
    "Pipeline",
    "Prompter",
    "WorkdirAutoencoder",
    "adherence_confusion",
    "best_checkpoint",
    "check_prompts",
    "data_dir",
    "dataset_clips",
    "dataset_prompts",
    "evaluate_prompts",
    "list_checkpoints",
    "load_autoencoder",
    "load_pipeline",
    "load_prompter",
    "load_text_encoder",
    "psnr_per_frame",
    "read_metrics",
    "read_videos",
    "restore",
    "save_video",
    "score_videos",
    "video_grid",
)


def read_videos(videos: np.ndarray) -> list[list[tuple[int, str]]]:
    """The adherence evaluator's reading of uint8 videos [B, T, H, W, 3]: per video [(digit, direction)]."""
    from sora_jax.eval.digit_reader import read_videos as _read

    return _read(videos)


def load_pipeline(
    workdir: str | Path, *, step: int | str | None = None, use_ema: bool | None = None, **sample_overrides
) -> Pipeline:
    """The text-to-video pipeline of a workdir's latest (or ``step``; ``"best"``: ``best_checkpoint``'s)
    checkpoint (``sora_jax.sample.pipeline``): ``generate(prompts, seed=)`` -> uint8 ``[B, T, H, W, 3]``.
    ``sample_overrides``: ``sample_steps``, ``cfg_scale``, ``sampler``. A VAE workdir is a UserError (its
    autoencoder: ``load_autoencoder``). Prompts go through the config's safety policy first
    (``config.safety.policy``; a refused one raises ``sora_jax.errors.PromptRefused``)."""
    return guard(_pipeline.load_pipeline(workdir, step=step, use_ema=use_ema, **sample_overrides))


def load_prompter(
    workdir_or_pipeline: str | Path | Pipeline, *, step: int | str | None = None, **kw
) -> Prompter:
    """The video prompter (i2v, extend, connect, edit, loop, long videos) of a workdir's latest (or ``step``)
    checkpoint, or of an already loaded ``Pipeline``; ``kw`` go to ``Prompter.from_pipeline`` (``bucket``,
    ``fsdp``, ``guidance_rescale``, ``history_guidance``). Its modes take and return uint8 ``[T, H, W, 3]``;
    prompts go through the safety policy first (the pipeline's, or its config's: ``PromptRefused``)."""
    pipe = workdir_or_pipeline
    if not isinstance(pipe, Pipeline):
        pipe = load_pipeline(pipe, step=step)
    elif pipe.prompt_check is None:
        pipe = guard(dataclasses.replace(pipe))
    return Prompter.from_pipeline(pipe, **kw)


# ------------------------------------------------------------------------------------ what a workdir holds


def read_metrics(workdir: str | Path) -> list[dict]:
    """The scalars a run logged (``<workdir>/metrics.jsonl``): one dict per step, ``{"step": s, name: value}``,
    sorted by step. Rows of the same step are merged, later values winning (a resumed run logs the steps after
    its checkpoint again; evaluation during training writes ``eval/<metric>`` rows of its own). An unreadable
    last line (a write cut short) is skipped with a warning."""
    path = Path(workdir) / "metrics.jsonl"
    if not path.is_file():
        raise UserError(f"{path} not found: train first (sora-jax train --workdir {workdir})")
    lines = [line for line in path.read_text().splitlines() if line.strip()]
    by_step: dict[int, dict] = {}
    for i, line in enumerate(lines):
        try:
            row = json.loads(line)
        except json.JSONDecodeError as e:
            if i == len(lines) - 1:
                warnings.warn(f"{path}: skipping its unreadable last line ({e})", stacklevel=2)
                continue
            raise UserError(f"{path} line {i + 1} is not JSON ({e})") from None
        if not isinstance(row, dict) or "step" not in row:
            raise UserError(f"{path} line {i + 1} has no 'step': {line[:80]}")
        by_step.setdefault(int(row["step"]), {}).update(row)
    return [by_step[s] for s in sorted(by_step)]


def list_checkpoints(workdir: str | Path) -> list[dict]:
    """One dict per checkpoint of ``workdir`` (what ``sora-jax checkpoints`` prints): ``step`` (None for one
    moved aside as unreadable), ``name``, ``time``, ``bytes``, ``complete``, ``config`` (a one-line summary),
    ``datacard`` ({"hash", "summary"} of the data card it was trained on, ``sora_jax.data.datacard``; None for
    a checkpoint made before data cards)."""
    from sora_jax.train.checkpoint import list_checkpoints as _list

    return _list(workdir)


def best_checkpoint(workdir: str | Path) -> dict | None:
    """The best checkpoint evaluation during training kept (``config.eval.best_metric``): {"step", "metric",
    "value", "higher_is_better"}, or None; ``load_pipeline(workdir, step="best")`` loads it."""
    from sora_jax.train.checkpoint import read_best

    return read_best(workdir)


def data_dir(workdir: str | Path) -> Path:
    """The dataset folder of the config a workdir's latest checkpoint was trained with (``config.data.path``,
    else ``<workdir>/data``)."""
    from sora_jax.data.pipeline import dataset_dir
    from sora_jax.loading import saved_config

    _, cfg = saved_config(workdir)
    return dataset_dir(cfg, workdir)


def _draw(n: int, num: int, seed: int) -> np.ndarray:
    """Sorted indices of ``num`` of ``n`` items drawn without replacement (the evaluators' draw)."""
    return np.sort(np.random.default_rng(seed).choice(n, size=min(num, n), replace=False))


def dataset_prompts(workdir: str | Path, split: str = "test", num: int = 16, seed: int = 0) -> list[str]:
    """``num`` captions of ``split`` of the workdir's dataset, drawn with ``seed`` (``sora-jax eval``'s prompts;
    the test split's name digit/direction combinations training never saw)."""
    from sora_jax.eval.evaluate import split_prompts

    return split_prompts(data_dir(workdir), split, num, seed)


def dataset_clips(
    workdir: str | Path, split: str = "test", num: int = 8, seed: int = 0
) -> tuple[np.ndarray, list[str]]:
    """(uint8 clips ``[B, T, H, W, 3]``, their captions): ``num`` clips of ``split`` of the workdir's dataset,
    drawn with ``seed`` as ``sora-jax eval --prompting`` draws them; only those clips are read."""
    from sora_jax.data.pipeline import open_source
    from sora_jax.data.records import decode_clip

    source = open_source(data_dir(workdir), split)
    clips = [decode_clip(source[int(i)]) for i in _draw(len(source), num, seed)]
    if not clips:
        raise UserError(f"split {split!r} of {data_dir(workdir)} has no clips")
    if "video" not in clips[0]:
        raise UserError(f"{data_dir(workdir)} holds latents, not videos (config.data.content = latents)")
    shapes = {c["video"].shape for c in clips}
    if len(shapes) > 1:
        raise UserError(f"clips of {split!r} differ in shape ({sorted(shapes)}): ask for one at a time")
    return np.stack([c["video"] for c in clips]), [str(c["caption"]) for c in clips]


# ------------------------------------------------------------------------------------------------ scoring


def psnr_per_frame(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """PSNR in dB (peak 255) of each frame of uint8 videos ``[B, T, H, W, C]``: float64 ``[B, T]``, inf where a
    frame is reproduced exactly (``sora_jax/eval/reconstruction.py``'s ``psnr``, per frame)."""
    from sora_jax.eval.reconstruction import psnr

    a, b = np.asarray(a), np.asarray(b)
    if a.shape != b.shape or a.ndim != 5:
        raise UserError(
            f"psnr_per_frame wants two videos [B, T, H, W, C] of one shape, got {a.shape}, {b.shape}"
        )
    return psnr(a.reshape(-1, *a.shape[2:]), b.reshape(-1, *b.shape[2:])).reshape(a.shape[:2])


# ------------------------------------------------------------------------------------------ the autoencoder


@dataclasses.dataclass
class WorkdirAutoencoder:
    """An autoencoder loaded from a workdir (``load_autoencoder``), with uint8 videos in and out.

    ``autoencoder``: the codec (``encode`` float [-1, 1] -> latents); ``kind``: ``"vae"``, ``"wan_vae"``,
    ``"luma"`` or ``"identity"``; ``description``: one line saying which autoencoder this is and where it came from;
    ``data_workdir``: the workdir whose dataset matches it (``dataset_clips(data_workdir)``: clips of the
    shape it codes); ``step``: the VAE checkpoint's step (None for a pixel codec).
    """

    autoencoder: Autoencoder
    kind: str
    description: str
    data_workdir: Path
    step: int | None = None

    def __post_init__(self):
        ae = self.autoencoder
        self._encode = jax.jit(lambda p, v: ae.with_params(p).encode(video_to_float(v)))
        self._decode = jax.jit(lambda p, z: float_to_video(ae.with_params(p).decode(z)))

    def encode(self, videos: np.ndarray) -> np.ndarray:
        """uint8 ``[B, T, H, W, 3]`` -> latents float32 ``[B, T', H', W', C]``."""
        return np.asarray(self._encode(self.autoencoder.params, np.asarray(videos, np.uint8)))

    def decode(self, latents: np.ndarray) -> np.ndarray:
        """latents ``[B, T', H', W', C]`` -> uint8 ``[B, T, H, W, 3]``."""
        return np.asarray(self._decode(self.autoencoder.params, np.asarray(latents, np.float32)))

    def reconstruct(self, videos: np.ndarray) -> np.ndarray:
        """uint8 ``[B, T, H, W, 3]`` through the encoder and the decoder: uint8 of the same shape."""
        return self.decode(self.encode(videos))


_PIXEL_CODECS = {
    "identity": "pixel RGB: the latents are the frames themselves (C = 3), nothing is learned or downsampled",
    "luma": "pixel grey: the latents are the frames' luma (C = 1), exact for grey videos, colour is lost",
}


def load_autoencoder(workdir: str | Path, *, step: int | None = None) -> WorkdirAutoencoder:
    """The autoencoder of a workdir: a VAE workdir's VAE (EMA weights), or the one a DiT workdir's model works
    through (a pixel codec, or the trained VAE of ``config.autoencoder.path``).

    A VAE's latents are normalised by the statistics ``sora-jax eval --workdir W`` measures
    (``latent_stats.json``, what a latent DiT sees); before those exist they are its raw posterior means, and
    ``description`` says so. ``step`` picks a VAE workdir's checkpoint (default: the one its statistics were
    measured on, else the latest)."""
    from sora_jax import factory, loading
    from sora_jax.choices import AutoencoderKind, Task
    from sora_jax.config import task
    from sora_jax.models.vae import LATENT_STATS

    workdir = Path(workdir)
    at, cfg = loading.saved_config(workdir, step)
    if task(cfg) is Task.VAE:
        if (workdir / LATENT_STATS).is_file():
            codec = loading.load_vae_codec(workdir, step=step)
            how = f"latents normalised by {LATENT_STATS} (shift {codec.shift:.3g}, scale {codec.scale:.3g})"
        else:
            _, at, _, params = restore(workdir, step=at)
            vcfg = factory.vae_config(cfg)
            codec = factory.vae_codec(vcfg, 0.0, 1.0, at).with_params(jax.device_get(params))
            how = f"raw posterior means (no {LATENT_STATS} yet: `sora-jax eval --workdir {workdir}` measures it)"
        desc = f"the VAE of {workdir} (step {codec.step}, {cfg.vae.variant}): {how}"
        return WorkdirAutoencoder(codec, "vae", desc, workdir, codec.step)
    kind = AutoencoderKind(cfg.autoencoder.kind)
    if kind is AutoencoderKind.VAE:
        cfg = loading.resolve_autoencoder(cfg)
        codec = loading.load_autoencoder(cfg)
        path = Path(cfg.autoencoder.path)
        desc = (
            f"the VAE {path} (step {codec.step}) that the DiT of {workdir} works through, normalised latents"
        )
        return WorkdirAutoencoder(codec, "vae", desc, path, codec.step)
    if kind is AutoencoderKind.WAN_VAE:
        codec = loading.load_autoencoder(cfg)
        desc = f"Wan 2.1's VAE {cfg.autoencoder.path} that the Wan transformer of {workdir} works through"
        return WorkdirAutoencoder(codec, "wan_vae", desc, workdir, at)
    desc = f"the pixel codec {kind.value!r} of the DiT of {workdir} ({_PIXEL_CODECS[kind.value]})"
    return WorkdirAutoencoder(factory.make_autoencoder(cfg), kind.value, desc, workdir)


# ------------------------------------------------------------------------------------------------ viewing


def save_video(
    path: str | Path,
    video: np.ndarray,
    fps: float = 8,
    *,
    scale: int | None = None,
    mark: bool = True,
    pipeline: Pipeline | None = None,
    prompt: str | None = None,
    seed: int | None = None,
) -> Path:
    """Writes uint8 ``video`` [T, H, W, 3] as an MP4 or a GIF (by the suffix of ``path``), upscaled by
    ``scale`` (default: shorter side >= 128). ``mark`` (the default): as ``sora-jax sample`` writes generated
    videos, with the invisible watermark at the written size (``config.safety.watermark`` of ``pipeline``,
    payload from its model and step) and, for an MP4 that ``pipeline`` made from ``prompt``, a provenance
    record (``config.safety.provenance``: the prompt's sha256 only). ``mark=False``: as is (real clips)."""
    if not mark:
        return _save_video(path, video, fps, scale=scale)
    from sora_jax.safety.stamp import Stamp

    cfg = pipeline.config if pipeline is not None else None
    stamp = Stamp.for_run(cfg, None, pipeline.step if pipeline is not None else 0)
    if pipeline is None or prompt is None:
        stamp = dataclasses.replace(stamp, provenance=False)  # nothing to state a generation's facts from
    return stamp.write(path, video, fps, prompt=prompt or "", seed=seed, scale=scale)


def video_grid(videos: np.ndarray, cols: int = 4, gap: int = 2, fill: int = 128) -> np.ndarray:
    """uint8 videos ``[B, T, H, W, 3]`` tiled into one video ``[T, R * (H + gap) - gap, C * (W + gap) - gap, 3]``
    (C = ``cols``, or B when fewer; R = ceil(B / C) rows), gaps and empty cells grey ``fill``: to play many
    videos as one (``save_video``)."""
    v = np.asarray(videos)
    if v.ndim != 5 or v.shape[-1] != 3 or not len(v):
        raise UserError(f"video_grid wants videos [B, T, H, W, 3], got shape {v.shape}")
    return tile_videos(v, max(1, min(int(cols), len(v))), gap, fill)
