"""Long-video consistency: does a minute-long video keep the prompt's objects and their motion?

A long video is made segment by segment (``Prompter.long_video``); each segment is read by the digit reader
through the clip-length window that ends where the segment ends. ``score_long`` gives, over B videos and S
segments:

  per segment (arrays [S], over the videos)   digit / both / direction accuracy, the mean angle (degrees)
                                              between each intended direction and the one read for that digit
  per video (fractions over the videos)       every segment shows the prompt's digits; the set of digits read
                                              ever changes between consecutive segments (identity change)
  along the video                             first- vs last-quarter digit accuracy and angle error (decay and
                                              drift), identity changes per minute, and the seam ratio: mean
                                              |frame change| at segment boundaries over the mean inside them

``plot_long`` draws the per-segment accuracies against time (PNG).
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import numpy as np

from sora_jax.eval.adherence import evaluate_prompts

__all__ = ["direction_angle", "plot_long", "score_long", "segment_windows", "summarize_long"]

_VECTORS = {
    "left": (-1, 0),
    "right": (1, 0),
    "up": (0, -1),
    "down": (0, 1),
    "up-left": (-1, -1),
    "up-right": (1, -1),
    "down-left": (-1, 1),
    "down-right": (1, 1),
}


def direction_angle(a: str, b: str) -> float:
    """The angle in degrees (0..180) between two direction names."""
    (ux, uy), (vx, vy) = _VECTORS[a], _VECTORS[b]
    diff = abs(np.degrees(np.arctan2(uy, ux)) - np.degrees(np.arctan2(vy, vx))) % 360.0
    return float(min(diff, 360.0 - diff))


def segment_windows(videos: np.ndarray, segments: Sequence[tuple[int, int]], frames: int) -> np.ndarray:
    """The clip-length window ending at each segment's end: uint8 [S, B, frames, H, W, 3] from [B, N, ...]."""
    out = []
    for _, end in segments:
        start = max(0, end - frames)
        out.append(videos[:, start : start + frames])
    return np.stack(out)


def _quarter(x: np.ndarray, last: bool) -> float:
    k = max(1, len(x) // 4)
    part = x[-k:] if last else x[:k]
    part = part[np.isfinite(part)]
    return float(part.mean()) if part.size else float("nan")


def summarize_long(rows: Sequence[Sequence[dict]], seconds_per_segment: float) -> tuple[dict, dict]:
    """Consistency metrics from the reader's rows per segment and video (``rows[s][b]``: the rows of
    ``evaluate_prompts``, with ``intended`` / ``read`` as [digit, direction name] lists).

    Returns (metrics, per_segment arrays [S]: digit_accuracy, both_accuracy, direction_accuracy,
    angle_error_deg)."""
    S, B = len(rows), len(rows[0])
    digits_ok = np.array([[r["digits_ok"] for r in seg] for seg in rows])  # [S, B]
    both_ok = np.array([[r["both_ok"] for r in seg] for seg in rows])
    read_sets = [[frozenset(d for d, _ in r["read"]) for r in seg] for seg in rows]
    changes = np.array([[read_sets[s][b] != read_sets[s - 1][b] for b in range(B)] for s in range(1, S)])
    changes = changes.reshape(S - 1, B)
    dir_ok, angle = np.full(S, np.nan), np.full(S, np.nan)
    for s, seg in enumerate(rows):
        hits, angles = [], []
        for r in seg:
            read = {}
            for d, name in r["read"]:
                read.setdefault(d, []).append(name)
            for d, want in r["intended"]:
                if d in read:
                    hits.append(want in read[d])
                    angles.append(min(direction_angle(want, got) for got in read[d]))
        if hits:
            dir_ok[s], angle[s] = np.mean(hits), np.mean(angles)
    minutes = S * seconds_per_segment / 60.0
    per_segment = {
        "digit_accuracy": digits_ok.mean(1),
        "both_accuracy": both_ok.mean(1),
        "direction_accuracy": dir_ok,
        "angle_error_deg": angle,
    }
    metrics = {
        "videos": B,
        "segments": S,
        "segment_digit_accuracy": float(digits_ok.mean()),
        "segment_both_accuracy": float(both_ok.mean()),
        "segment_direction_accuracy": float(np.nanmean(dir_ok))
        if np.isfinite(dir_ok).any()
        else float("nan"),
        "first_segment_digit_accuracy": float(digits_ok[0].mean()),
        "first_quarter_digit_accuracy": _quarter(digits_ok.mean(1), last=False),
        "last_quarter_digit_accuracy": _quarter(digits_ok.mean(1), last=True),
        "videos_all_segments_digits_ok": float(digits_ok.all(0).mean()),
        "videos_identity_changed": float(changes.any(0).mean()) if S > 1 else 0.0,
        "identity_changes_per_minute": float(changes.sum(0).mean() / minutes) if minutes else 0.0,
        "first_quarter_angle_error_deg": _quarter(angle, last=False),
        "last_quarter_angle_error_deg": _quarter(angle, last=True),
    }
    return metrics, per_segment


def _seam_ratio(videos: np.ndarray, segments: Sequence[tuple[int, int]]) -> float:
    """Mean |frame change| across segment boundaries over the mean between consecutive frames inside them."""
    v = videos.astype(np.float32)
    steps = np.abs(np.diff(v, axis=1)).mean(axis=(0, 2, 3, 4))  # [N - 1]: change from frame i to i + 1
    seams = [start - 1 for start, _ in segments[1:] if start >= 1]
    inside = np.setdiff1d(np.arange(len(steps)), seams)
    if not seams or not inside.size:
        return float("nan")
    return float(steps[seams].mean() / max(steps[inside].mean(), 1e-6))


def score_long(
    videos: np.ndarray,
    segments: Sequence[tuple[int, int]],
    prompts: Sequence[str],
    frames: int,
    fps: float,
) -> tuple[dict, dict, list[list[dict]]]:
    """Reads long uint8 videos [B, N, H, W, 3] made of ``segments`` ((start, end) frame ranges) for
    ``prompts`` with the digit reader (``frames``-long windows, see ``segment_windows``).

    Returns (metrics of ``summarize_long`` plus ``seam_jump_ratio``, per-segment arrays [S], the reader's rows
    per segment and video)."""
    windows = segment_windows(videos, segments, frames)  # [S, B, T, ...]
    S, B = windows.shape[:2]
    _, flat = evaluate_prompts(
        windows.reshape(S * B, *windows.shape[2:]), [p for _ in range(S) for p in prompts]
    )
    rows = [flat[s * B : (s + 1) * B] for s in range(S)]
    seg_seconds = float(np.mean([end - start for start, end in segments])) / fps
    metrics, per_segment = summarize_long(rows, seg_seconds)
    metrics["seam_jump_ratio"] = _seam_ratio(videos, segments)
    metrics["seconds"] = videos.shape[1] / fps
    per_segment["end_seconds"] = np.array([end / fps for _, end in segments])
    return metrics, per_segment, rows


def plot_long(per_segment: dict, path: str | Path, title: str = "") -> Path:
    """Per-segment digit / both / direction accuracy against the video's time, as a PNG at ``path``."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    t = per_segment["end_seconds"]
    fig, ax = plt.subplots(figsize=(8, 3.2))
    for key, label in (
        ("digit_accuracy", "digits right"),
        ("both_accuracy", "digits and directions right"),
        ("direction_accuracy", "directions right (digits read)"),
    ):
        ax.plot(t, per_segment[key], marker=".", label=label)
    ax.set(xlabel="seconds into the video (segment end)", ylabel="fraction of videos", ylim=(-0.02, 1.02))
    ax.set_title(title, fontsize=10)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8, loc="lower left")
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
