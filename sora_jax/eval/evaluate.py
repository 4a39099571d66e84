"""``sora-jax eval``: generate videos for a split's captions and score their prompt adherence."""

from __future__ import annotations

from pathlib import Path

import numpy as np

from sora_jax.eval.adherence import evaluate_prompts, write_report


def split_prompts(data_dir: str | Path, split: str, num: int, seed: int = 0) -> list[str]:
    """``num`` captions of ``split`` (metadata.json's list, else the records'), drawn with ``seed``."""
    from sora_jax.data.pipeline import split_captions

    captions = split_captions(data_dir, split)
    rng = np.random.default_rng(seed)
    idx = rng.choice(len(captions), size=min(num, len(captions)), replace=False)
    return [captions[i] for i in sorted(idx)]


def evaluate_workdir(
    workdir: str | Path,
    *,
    num_prompts: int = 64,
    split: str = "test",
    seed: int = 0,
    out: str | Path | None = None,
    pipeline=None,
    use_ema: bool | None = None,
) -> dict:
    """Samples ``num_prompts`` captions of ``split`` (or, for ``"paraphrase"``, paraphrased prompts) with the
    workdir's latest checkpoint (EMA weights unless ``use_ema`` is False; or ``pipeline``), writes the report
    to ``out`` (default ``<workdir>/eval``). Returns metrics, per-video rows, the uint8 videos
    ``[B, T, H, W, 3]`` and the prompts."""
    from sora_jax.data.pipeline import dataset_dir
    from sora_jax.sample.pipeline import load_pipeline

    pipe = pipeline or load_pipeline(workdir, use_ema=use_ema)
    if split == "paraphrase":  # unseen wordings of the same objects (sora_jax/eval/paraphrase.py)
        from sora_jax.eval.paraphrase import paraphrase_prompts

        prompts = paraphrase_prompts(num_prompts, seed)
    else:
        prompts = split_prompts(dataset_dir(pipe.config, workdir), split, num_prompts, seed)
    videos = pipe.generate(prompts, seed=seed, progress=True)
    metrics, rows = evaluate_prompts(videos, prompts)
    metrics = {"split": split, "step": pipe.step, **metrics}
    out = Path(out) if out else Path(workdir) / "eval"
    write_report(out / f"adherence_{split}.json", metrics, rows)
    return {"metrics": metrics, "per_video": rows, "videos": videos, "prompts": prompts}
