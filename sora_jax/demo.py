"""``sora-jax demo``: the embedded default, end to end on a CPU in minutes.

Builds the bundled moving-digits data (if missing), trains ``configs/quickstart.py``, samples its prompts to
MP4/GIF with a contact sheet, scores prompt adherence on test-split captions, shows video prompting (a test
clip's first frame animated, a test clip extended, a 60-second video) and writes ``report.md``.
"""

from __future__ import annotations

import functools
import json
import logging
import os
import time
from pathlib import Path

from configs import quickstart
from sora_jax import api
from sora_jax.config import load_config
from sora_jax.data.pipeline import dataset_dir
from sora_jax.eval.adherence import evaluate_prompts, write_report
from sora_jax.eval.evaluate import evaluate_workdir
from sora_jax.safety.stamp import Stamp
from sora_jax.sample.outputs import write_samples
from sora_jax.train.loop import train

log = logging.getLogger("sora_jax.demo")

EVAL_PROMPTS = 96


def run_demo(
    workdir: str | Path,
    *,
    config_arg: str = "",
    num_eval_prompts: int = EVAL_PROMPTS,
    long_seconds: float = 60.0,
) -> dict:
    """Trains ``configs/quickstart.py[:config_arg]`` in ``workdir``, samples, evaluates ``num_eval_prompts``
    test and paraphrased prompts, shows prompting (with a ``long_seconds`` video); writes report.md / .json
    and returns the summary."""
    workdir = Path(workdir)
    cfg = load_config(quickstart.__file__ + (f":{config_arg}" if config_arg else ""))
    timings = {}

    t0 = time.perf_counter()
    train_metrics = train(cfg, workdir)
    timings["train_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    pipe = api.load_pipeline(workdir)
    stamp = Stamp.for_run(pipe.config, workdir, pipe.step)  # the videos' watermark and provenance
    prompts = list(cfg.sample.prompts)
    videos = pipe.generate(prompts, seed=cfg.sample.seed, progress=True)
    write = functools.partial(stamp.write, seed=cfg.sample.seed)
    paths = write_samples(workdir / "samples", videos, prompts, fps=cfg.data.fps, write=write)
    marks = _check_marks(paths["mp4"], stamp)
    demo_metrics, demo_rows = evaluate_prompts(videos, prompts)
    write_report(workdir / "eval" / "adherence_demo_prompts.json", demo_metrics, demo_rows)
    timings["sample_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    test = evaluate_workdir(workdir, num_prompts=num_eval_prompts, split="test", pipeline=pipe)
    para = evaluate_workdir(workdir, num_prompts=num_eval_prompts, split="paraphrase", pipeline=pipe)
    timings["eval_s"] = time.perf_counter() - t0

    t0 = time.perf_counter()
    prompting = _prompting_samples(workdir, pipe, stamp, long_seconds)
    timings["prompting_s"] = time.perf_counter() - t0

    summary = {
        "step": pipe.step,
        "train": train_metrics,
        "demo_prompts": demo_metrics,
        "test_prompts": test["metrics"],
        "paraphrase_prompts": para["metrics"],
        "text_encoder": cfg.text.encoder,
        "timings": timings,
        "contact_sheet": str(paths["contact_sheet"]),
        "prompting": prompting,
        "marks": marks,
    }
    _write_report(workdir, summary, demo_rows)
    return summary


def _check_marks(mp4s: list[Path], stamp) -> dict:
    """``sora-jax detect``'s reading of the written MP4s: how many carry the watermark, how many with the run's
    payload exactly and within ``stamp.MATCH_BITS`` bits, how many have a valid provenance record."""
    from sora_jax.safety.stamp import MATCH_BITS, inspect_video, payload_distance

    reports = [inspect_video(p) for p in mp4s]
    found = [r["watermark"]["payload"] for r in reports if r["watermark"]["detected"]]
    return {
        "videos": len(reports),
        "payload": stamp.payload,
        "watermarked": len(found),
        "payload_exact": sum(p == stamp.payload for p in found),
        "payload_near": sum(payload_distance(p, stamp.payload) <= MATCH_BITS for p in found),
        "provenance_valid": sum(bool(r["provenance"] and r["provenance"]["valid"]) for r in reports),
        "max_log10_p": max(r["watermark"]["log10_p"] for r in reports),
    }


def _prompting_samples(workdir: Path, pipe, stamp, long_seconds: float = 60.0) -> list[dict]:
    """i2v of a test clip's first frame, a test clip extended forward, a ``long_seconds`` video: MP4 + GIF in
    ``samples/prompting/`` and what the reader sees in each (the long video: per segment, with its consistency
    metrics of ``eval.long_video`` and a plot of them along the video)."""
    import numpy as np

    from sora_jax.eval.long_video import plot_long, score_long
    from sora_jax.eval.prompting import split_clips
    from sora_jax.sample.prompter import Prompter

    cfg = pipe.config
    p = Prompter.from_pipeline(pipe)
    clips, captions = split_clips(dataset_dir(cfg, workdir), "test", 2, seed=0)
    long_prompt = cfg.sample.prompts[0]
    long, segments = p.long_video([long_prompt], seconds=long_seconds, seed=cfg.sample.seed)
    made = [
        ("i2v", captions[0], p.i2v(captions[0], clips[0][0], seed=cfg.sample.seed)),
        ("extend", captions[1], p.extend(captions[1], clips[1], seed=cfg.sample.seed)),
        (f"long_{long_seconds:g}s", long_prompt, long[0]),
    ]
    out, rows = workdir / "samples" / "prompting", []
    T = p.frames
    for name, prompt, video in made:
        for suffix in (".mp4", ".gif"):
            stamp.write(out / f"{name}{suffix}", video, cfg.data.fps, prompt=prompt, seed=cfg.sample.seed)
        windows = (
            [video[max(0, end - T) : max(0, end - T) + T] for _, end in segments]
            if name.startswith("long")
            else [video[-T:]]
        )
        read = api.read_videos(np.stack(windows))
        rows.append(
            {"mode": name, "prompt": prompt, "frames": len(video), "read": read if len(read) > 1 else read[0]}
        )
    m, per_segment, _ = score_long(long, segments, [long_prompt], T, p.fps)
    plot_long(
        per_segment, out / f"long_{long_seconds:g}s_accuracy.png", f"'{long_prompt}', {long_seconds:g} s"
    )
    rows[-1]["consistency"] = m
    return rows


def _write_report(workdir: Path, summary: dict, rows: list[dict]) -> None:
    t, d, p = summary["test_prompts"], summary["demo_prompts"], summary["paraphrase_prompts"]
    lines = [
        "# sora-jax demo report",
        "",
        f"Trained `configs/quickstart.py` for {summary['step']} steps in {summary['timings']['train_s']:.0f} s "
        f"(final loss {summary['train'].get('loss', float('nan')):.4f}), text encoder `{summary['text_encoder']}`.",
        "",
        "## Prompt adherence (read by the bundled digit reader)",
        "",
        "| prompts | videos | digits right | directions right | both right | chance (digits) |",
        "|---|---|---|---|---|---|",
        f"| test split (unseen digit/direction combinations) | {t['count']} | {t['digit_accuracy']:.3f} | "
        f"{t['direction_accuracy']:.3f} | {t['both_accuracy']:.3f} | {t['chance_digit_accuracy']:.3f} |",
        f"| paraphrases (wordings the captions never use) | {p['count']} | {p['digit_accuracy']:.3f} | "
        f"{p['direction_accuracy']:.3f} | {p['both_accuracy']:.3f} | {p['chance_digit_accuracy']:.3f} |",
        f"| demo prompts | {d['count']} | {d['digit_accuracy']:.3f} | {d['direction_accuracy']:.3f} | "
        f"{d['both_accuracy']:.3f} | {d['chance_digit_accuracy']:.3f} |",
        "",
        "## Demo videos",
        "",
        "![contact sheet](samples/contact_sheet.png)",
        "",
        "| prompt | read by the evaluator |",
        "|---|---|",
    ]
    lines += [f"| {r['prompt']} | {r['read']} |" for r in rows]
    lines += [
        "",
        "## Video prompting (`samples/prompting/`)",
        "",
        "| mode | prompt | frames | read by the evaluator (the last clip-length window; long: per segment) |",
        "|---|---|---|---|",
    ]
    lines += [f"| {r['mode']} | {r['prompt']} | {r['frames']} | {r['read']} |" for r in summary["prompting"]]
    long = summary["prompting"][-1]
    c = long["consistency"]
    lines += [
        "",
        f"## The {c['seconds']:g}-second video (`samples/prompting/{long['mode']}.mp4`)",
        "",
        f"'{long['prompt']}', {c['segments']} segments, read segment by segment: "
        + ", ".join(" + ".join(f"{d} {r}" for d, r in seg) or "nothing" for seg in long["read"]),
        "",
        "| segments with the prompt's digits | digits and directions | first quarter | last quarter "
        "| identity changes per minute | seam jump / frame change |",
        "|---|---|---|---|---|---|",
        f"| {c['segment_digit_accuracy']:.3f} | {c['segment_both_accuracy']:.3f} | "
        f"{c['first_quarter_digit_accuracy']:.3f} | {c['last_quarter_digit_accuracy']:.3f} | "
        f"{c['identity_changes_per_minute']:.1f} | {c['seam_jump_ratio']:.2f} |",
        "",
        f"![accuracy along the video](samples/prompting/{long['mode']}_accuracy.png)",
        "",
        "## Safeguards",
        "",
        f"`sora-jax detect samples/*.mp4`: {summary['marks']['watermarked']} of {summary['marks']['videos']} "
        f"written MP4s carry the watermark (the weakest at p = 10^{summary['marks']['max_log10_p']:.1f}), "
        f"{summary['marks']['payload_exact']} with this run's payload {summary['marks']['payload']} exactly and "
        f"{summary['marks']['payload_near']} within 4 of its 32 bits (`detect --workdir` names the run); {summary['marks']['provenance_valid']} have a valid "
        "provenance record (unsigned sidecars: set config.safety.provenance.cert_chain / private_key to sign "
        "C2PA manifests).",
    ]
    text = "\n".join(lines) + "\n"
    for name, content in (("report.md", text), ("report.json", json.dumps(summary, indent=2, default=str))):
        tmp = workdir / (name + ".tmp")
        tmp.write_text(content)
        os.replace(tmp, workdir / name)
    print(text)
