"""``sora-jax eval --prompting``: how a moving-digits model does at image-to-video, extension, connection and
minute-long videos, scored by the digit reader (``sora_jax/eval/digit_reader.py``).

On ``num`` test clips (captions name digits and directions the training split never combined):
  i2v       animate the clip's first frame with its caption: PSNR of frame 0 against the input (after
            decoding), and adherence of the clip to the caption (read with the given frame replaced by the
            first generated one, so only generated frames count);
  extend    forward from the clip (and backward to it): the newly generated T-frame window (given frames
            replaced likewise) is read and compared with the source clip's caption (same digits, same
            directions across the seam);
  connect   clip a -> clip b under a's caption: PSNR of the transition's first frame against a's last and of
            its last frame against b's first; the seam jump (mean |frame difference| at the two seams over the
            mean within real clips);
  long      ``seconds``-long videos by autoregressive extension, read segment by segment
            (``sora_jax/eval/long_video.py``: digits kept in every segment, identity changes, direction drift,
            decay from the first to the last quarter, seams), and a plot of accuracy along the video.
Writes ``prompting.json`` + ``prompting.md`` and a few example MP4s to the report folder.
"""

from __future__ import annotations

import json
import time
from pathlib import Path

import numpy as np

from sora_jax.eval.adherence import evaluate_prompts
from sora_jax.eval.clips import sample_clips as split_clips
from sora_jax.eval.long_video import plot_long, score_long
from sora_jax.eval.reconstruction import psnr


def _seam_jump(video: np.ndarray, seam: int) -> float:
    """Mean |frame[seam] - frame[seam - 1]| in levels."""
    return float(np.mean(np.abs(video[seam].astype(np.float32) - video[seam - 1].astype(np.float32))))


def _generated_only(videos: np.ndarray, given: slice, nearest: int) -> np.ndarray:
    """Copies of uint8 [B, T, ...] whose given frames are replaced by the nearest generated frame, so the
    reader judges what the model made, not the frames it was handed."""
    v = videos.copy()
    v[:, given] = v[:, nearest : nearest + 1]
    return v


def _mean_step(videos: np.ndarray) -> float:
    d = np.abs(np.diff(videos.astype(np.float32), axis=1))
    return float(d.mean())


def evaluate_prompting(
    workdir: str | Path,
    *,
    num: int = 32,
    seconds: float = 60.0,
    num_long: int = 8,
    overlap: int = 1,
    seed: int = 0,
    out: str | Path | None = None,
    split: str = "test",
    pipeline=None,
    use_ema: bool | None = None,
    data: str | Path | None = None,
) -> dict:
    """Runs the four checks (module docstring) on ``num`` clips of ``split`` and writes the report; returns
    the metrics. ``pipeline``: an already loaded one (else the workdir's, EMA weights unless ``use_ema`` is
    False); ``data``: the dataset of the clips (default: ``eval.clips.eval_dataset``'s)."""
    from sora_jax.eval.clips import eval_dataset
    from sora_jax.sample.pipeline import load_pipeline
    from sora_jax.sample.prompter import Prompter
    from sora_jax.sample.video_io import write_mp4

    pipe = pipeline or load_pipeline(workdir, use_ema=use_ema)
    p = Prompter.from_pipeline(pipe)
    out = Path(out) if out else Path(workdir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    clips, captions = split_clips(eval_dataset(pipe.config, workdir, data), split, num, seed)
    T, P = p.frames, p.pixel_overlap(overlap)
    n = len(clips)
    m: dict = {
        "step": pipe.step,
        "clips": n,
        "frames": T,
        "overlap_latent_frames": overlap,
        "overlap_frames": P,
    }
    timings = {}

    # i2v: condition on frame 0 of each clip
    t0 = time.perf_counter()
    i2v = p.generate(captions, given=[{0: c[0]} for c in clips], seed=seed)
    timings["i2v"] = time.perf_counter() - t0
    m["i2v_frame0_psnr"] = float(np.mean(psnr(i2v[:, 0], clips[:, 0])))
    m["i2v_frame0_psnr_min"] = float(np.min(psnr(i2v[:, 0], clips[:, 0])))
    met, _ = evaluate_prompts(_generated_only(i2v, slice(0, 1), 1), captions)
    m |= {f"i2v_{k}": met[k] for k in ("digit_accuracy", "direction_accuracy", "both_accuracy")}

    # extend forward / backward: read the new T-frame window against the source caption
    t0 = time.perf_counter()
    fwd = p.generate(captions, given=[{i: c[T - P + i] for i in range(P)} for c in clips], seed=seed + 1)
    bwd = p.generate(captions, given=[{T - P + i: c[i] for i in range(P)} for c in clips], seed=seed + 2)
    timings["extend"] = time.perf_counter() - t0
    for name, gen in (
        ("forward", _generated_only(fwd, slice(0, P), P)),
        ("backward", _generated_only(bwd, slice(T - P, T), T - P - 1)),
    ):
        met, _ = evaluate_prompts(gen, captions)
        m |= {f"extend_{name}_{k}": met[k] for k in ("digit_accuracy", "direction_accuracy", "both_accuracy")}
    real_step = _mean_step(clips)
    m["real_mean_frame_step"] = real_step
    seam = [_seam_jump(np.concatenate([c, g[P:]]), T) for c, g in zip(clips, fwd)]
    m["extend_forward_seam_jump_ratio"] = float(np.mean(seam) / real_step)
    m["extend_forward_mean_frame_step_ratio"] = _mean_step(fwd) / real_step

    # connect a -> b (b: the next clip in the list), prompt: a's caption
    t0 = time.perf_counter()
    b = np.roll(clips, -1, axis=0)
    given = [
        {i: a[T - P + i] for i in range(P)} | {T - P + i: bb[i] for i in range(P)} for a, bb in zip(clips, b)
    ]
    con = p.generate(captions, given=given, seed=seed + 3)
    timings["connect"] = time.perf_counter() - t0
    m["connect_start_psnr"] = float(np.mean(psnr(con[:, :P], clips[:, -P:])))
    m["connect_end_psnr"] = float(np.mean(psnr(con[:, -P:], b[:, :P])))
    joined = [np.concatenate([a, g[P : T - P], bb]) for a, g, bb in zip(clips, con, b)]
    jumps = [(_seam_jump(v, T) + _seam_jump(v, 2 * T - 2 * P)) / 2 for v in joined]
    m["connect_seam_jump_ratio"] = float(np.mean(jumps) / real_step)

    # long videos
    t0 = time.perf_counter()
    prompts = captions[:num_long]
    videos, segments = p.long_video(prompts, seconds=seconds, overlap=overlap, seed=seed + 4, progress=True)
    timings["long"] = time.perf_counter() - t0
    long_m, per_segment, _ = score_long(videos, segments, prompts, T, p.fps)
    m |= {"long_seconds": float(seconds), "long_frames": int(videos.shape[1]), "long_videos": len(prompts)}
    m |= {f"long_{k}": v for k, v in long_m.items() if k not in ("videos", "seconds")}
    plot_long(
        per_segment, out / "prompting_long.png", f"{len(prompts)} videos of {seconds:g} s, split {split}"
    )
    m["seconds"] = {k: round(v, 2) for k, v in timings.items()}
    fps = p.fps
    write_mp4(out / "prompting_i2v.mp4", np.concatenate(list(i2v[:4]), axis=2), fps)
    write_mp4(out / "prompting_connect.mp4", np.concatenate([clips[0], con[0][P : T - P], b[0]]), fps)
    write_mp4(out / "prompting_long.mp4", videos[0], fps)
    (out / "prompting.json").write_text(json.dumps({"metrics": m, "long_prompts": prompts}, indent=1))
    lines = ["| check | value |", "|---|---|"] + [
        f"| {k} | {v:.3f} |" if isinstance(v, float) else f"| {k} | {v} |" for k, v in m.items()
    ]
    (out / "prompting.md").write_text("\n".join(lines) + "\n")
    return m
