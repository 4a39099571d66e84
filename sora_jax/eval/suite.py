"""The metrics of generated videos, by name: one entry point for ``sora-jax eval``, evaluation during training
and the notebooks.

    results = score_videos(videos, prompts, ["adherence", "fd_digits"], data_dir=d)
    results["adherence"]["value"]   # exact-set accuracy ("both"), with digit/direction accuracies beside it
    scalars(results)                # {"adherence": ..., "adherence/digit_accuracy": ..., "fd_digits": ...}

Every result is a dict with ``value`` (the headline number), ``count`` (videos scored) and, where it applies,
``ref_count`` (reference videos behind the statistics) and ``higher_is_better``.
"""

from __future__ import annotations

import time
from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sora_jax.errors import UserError

# name -> (needs prompts, higher is better); psnr is a workdir's metric (its autoencoder), the rest score videos
METRICS: dict[str, tuple[bool, bool]] = {
    "adherence": (True, True),
    "fvd": (False, False),
    "fd_digits": (False, False),
    "fd_frames": (False, False),
    "psnr": (False, True),
}
VIDEO_METRICS = ("adherence", "fvd", "fd_digits", "fd_frames")


def parse_metrics(spec: str | Sequence[str]) -> list[str]:
    """``"adherence,fd_digits"`` (or a list) -> checked names; unknown names are a UserError."""
    names = [s.strip() for s in spec.split(",")] if isinstance(spec, str) else [str(s) for s in spec]
    names = [n for n in names if n]
    if not names:
        raise UserError(f"no metrics given; choose from {', '.join(METRICS)}")
    unknown = [n for n in names if n not in METRICS]
    if unknown:
        raise UserError(f"unknown metric(s) {', '.join(unknown)}; choose from {', '.join(METRICS)}")
    return list(dict.fromkeys(names))


def score_videos(
    videos: np.ndarray,
    prompts: Sequence[str] | None,
    metrics: str | Sequence[str],
    *,
    data_dir: str | Path | None = None,
    ref_split: str = "test",
    ref_count: int | None = None,
    clip=None,
    progress: bool = False,
) -> dict[str, dict]:
    """Scores uint8 videos ``[B, T, H, W, 3]`` (generated for ``prompts``) by each metric of ``metrics``.

    ``data_dir`` / ``ref_split`` / ``ref_count``: the dataset, split and number of its clips (None: all)
    whose statistics are the reference of the Fréchet distances (``eval.distances``, cached there); ``clip``
    (``eval.clips.ClipShape``): the shape a native-size dataset's clips are cut to (the generated videos').
    Returns {metric: {"value", "count", "higher_is_better", "seconds", ...}}.
    """
    from sora_jax.eval import distances
    from sora_jax.eval.adherence import check_digit_prompts, evaluate_prompts

    names = parse_metrics(metrics)
    out: dict[str, dict] = {}
    for name in names:
        needs_prompts, higher = METRICS[name]
        if name not in VIDEO_METRICS:
            raise UserError(f"{name} scores a workdir's autoencoder, not videos: use evaluate_metrics")
        if needs_prompts and prompts is None:
            raise UserError(f"metric {name} scores videos against their prompts; none given")
        t0 = time.perf_counter()
        if name in distances.DISTANCES:
            if data_dir is None:
                raise UserError(f"{name} compares with a dataset's clips: give data_dir")
            ref = distances.reference_stats(
                name, data_dir, ref_split, ref_count, clip=clip, progress=progress
            )
            out[name] = distances.distance(name, videos, ref, progress=progress) | {
                "higher_is_better": higher
            }
        elif name == "adherence":
            check_digit_prompts(prompts)
            m, _ = evaluate_prompts(videos, list(prompts))
            out[name] = {
                "value": m["both_accuracy"],
                "count": m["count"],
                "higher_is_better": higher,
                "digit_accuracy": m["digit_accuracy"],
                "direction_accuracy": m["direction_accuracy"],
            }
        out[name]["seconds"] = time.perf_counter() - t0
    return out


def scalars(results: dict[str, dict]) -> dict[str, float]:
    """Flat scalars for TensorBoard / metrics.jsonl: ``name`` -> value, ``name/extra`` -> each extra number."""
    flat: dict[str, float] = {}
    for name, r in results.items():
        flat[name] = float(r["value"])
        for k, v in r.items():
            if (
                k not in ("value", "higher_is_better")
                and isinstance(v, (int, float))
                and not isinstance(v, bool)
            ):
                flat[f"{name}/{k}"] = float(v)
    return flat
