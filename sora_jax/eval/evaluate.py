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
    data: str | Path | None = None,
) -> dict:
    """Samples ``num_prompts`` captions of ``split`` (or, for ``"paraphrase"``, paraphrased prompts) with the
    workdir's latest checkpoint (EMA weights unless ``use_ema`` is False; or ``pipeline``), writes the report
    to ``out`` (default ``<workdir>/eval``). ``data``: the dataset whose captions are drawn (default:
    ``eval.clips.eval_dataset``'s). Returns metrics, per-video rows, the uint8 videos ``[B, T, H, W, 3]`` and
    the prompts."""
    from sora_jax.eval.adherence import check_digit_prompts
    from sora_jax.eval.clips import eval_dataset
    from sora_jax.sample.pipeline import load_pipeline

    pipe = pipeline or load_pipeline(workdir, use_ema=use_ema)
    if split == "paraphrase":  # unseen wordings of the same objects (sora_jax/eval/paraphrase.py)
        from sora_jax.eval.paraphrase import paraphrase_prompts

        prompts = paraphrase_prompts(num_prompts, seed)
    else:
        prompts = split_prompts(eval_dataset(pipe.config, workdir, data), split, num_prompts, seed)
    check_digit_prompts(prompts)
    videos = pipe.generate(prompts, seed=seed, progress=True)
    metrics, rows = evaluate_prompts(videos, prompts)
    metrics = {"split": split, "step": pipe.step, **metrics}
    out = Path(out) if out else Path(workdir) / "eval"
    write_report(out / f"adherence_{split}.json", metrics, rows)
    return {"metrics": metrics, "per_video": rows, "videos": videos, "prompts": prompts}


def _psnr_of_autoencoder(pipe, data_dir: Path, split: str, num: int, seed: int, clip=None) -> dict:
    """Reconstruction PSNR of the pipeline's autoencoder (a VAE, or a pixel codec) on ``num`` clips (cut to
    ``clip`` when the dataset's clips have native sizes)."""
    import jax

    from sora_jax.eval.clips import sample_clips
    from sora_jax.eval.reconstruction import psnr
    from sora_jax.models.autoencoder import float_to_video, video_to_float

    clips, _ = sample_clips(data_dir, split, num, seed, clip=clip)
    ae = pipe.autoencoder
    fn = jax.jit(
        lambda p, v: float_to_video(ae.with_params(p).decode(ae.with_params(p).encode(video_to_float(v))))
    )
    recons = np.concatenate([np.asarray(fn(ae.params, clips[i : i + 16])) for i in range(0, len(clips), 16)])
    p = psnr(clips, recons)
    return {"value": float(np.mean(np.minimum(p, 100.0))), "count": len(clips), "higher_is_better": True}


def evaluate_metrics(
    workdir: str | Path,
    metrics: str | list[str],
    *,
    num_videos: int = 64,
    step: int | None = None,
    split: str = "test",
    seed: int = 0,
    ref_count: int | None = None,
    out: str | Path | None = None,
    use_ema: bool | None = None,
    pipeline=None,
    progress: bool = True,
    data: str | Path | None = None,
) -> dict:
    """``sora-jax eval --metrics``: samples ``num_videos`` captions of ``split`` (drawn with ``seed``) with the
    checkpoint at ``step`` (latest if None) and scores them by ``metrics`` (``suite.METRICS``; the distances
    against the first ``ref_count`` clips of ``split``, all if None). The captions and clips come from
    ``data`` (default ``eval.clips.eval_dataset``'s: the workdir's dataset, or the clips behind its latents);
    clips of native sizes are cut to the generated shape (``eval.clips.read_clips``). Writes
    ``<out>/metrics_step<N>.json`` (default ``out``: ``<workdir>/eval``) and returns it: {"workdir", "step", "split", "num_videos",
    "sampling_seconds", "rows": [{"metric", "value", "count", "step", "seconds", ...}]}."""
    import time

    from sora_jax.eval import suite
    from sora_jax.eval.adherence import check_digit_prompts
    from sora_jax.eval.clips import clip_shape, eval_dataset, is_native_size
    from sora_jax.loading import saved_config
    from sora_jax.sample.pipeline import load_pipeline

    names = suite.parse_metrics(metrics)
    cfg = pipeline.config if pipeline is not None else saved_config(workdir, step)[1]
    data = eval_dataset(cfg, workdir, data)  # the data and prompts are checked before any weights load
    clip = clip_shape(cfg) if is_native_size(data, split) else None
    prompts = split_prompts(data, split, num_videos, seed)
    if "adherence" in names:
        check_digit_prompts(prompts)
    pipe = pipeline or load_pipeline(workdir, step=step, use_ema=use_ema)
    report = {"workdir": str(workdir), "step": int(pipe.step), "split": split, "num_videos": num_videos}
    video_metrics = [n for n in names if n in suite.VIDEO_METRICS]
    results: dict[str, dict] = {}
    if video_metrics:
        t0 = time.perf_counter()
        videos = pipe.generate(prompts, seed=seed, progress=progress)
        report["sampling_seconds"] = time.perf_counter() - t0
        report["num_videos"] = len(prompts)
        results = suite.score_videos(
            videos,
            prompts,
            video_metrics,
            data_dir=data,
            ref_split=split,
            ref_count=ref_count,
            clip=clip,
            progress=progress,
        )
    if "psnr" in names:
        t0 = time.perf_counter()
        results["psnr"] = _psnr_of_autoencoder(pipe, data, split, num_videos, seed, clip)
        results["psnr"]["seconds"] = time.perf_counter() - t0
    report["rows"] = [{"metric": n, **results[n], "step": int(pipe.step)} for n in names]
    out = Path(out) if out else Path(workdir) / "eval"
    _write_json(out / f"metrics_step{pipe.step}.json", report)
    return report


def _write_json(path: Path, obj) -> None:
    import json
    import os

    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        tmp.write_text(json.dumps(obj, indent=2) + "\n")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)


def format_table(reports: list[dict]) -> str:
    """The metrics of one or more reports (``evaluate_metrics``) side by side, as a markdown table."""

    def cell(row: dict | None) -> str:
        if row is None:
            return "-"
        return f"{row['value']:.4g} (n={row['count']})"

    names = list(dict.fromkeys(r["metric"] for rep in reports for r in rep["rows"]))
    head = ["metric"] + [f"{Path(rep['workdir']).name}@{rep['step']}" for rep in reports]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for n in names:
        cells = [cell(next((r for r in rep["rows"] if r["metric"] == n), None)) for rep in reports]
        better = (
            "higher"
            if next(r for rep in reports for r in rep["rows"] if r["metric"] == n)["higher_is_better"]
            else "lower"
        )
        lines.append(f"| {n} ({better} is better) | " + " | ".join(cells) + " |")
    secs = [
        f"{sum(r['seconds'] for r in rep['rows']) + rep.get('sampling_seconds', 0.0):.1f} s"
        for rep in reports
    ]
    lines.append("| seconds (sampling + metrics) | " + " | ".join(secs) + " |")
    return "\n".join(lines)
