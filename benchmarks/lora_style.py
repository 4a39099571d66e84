"""Does a LoRA trained on 8 clips of a new style produce that style on prompts it never saw, and does the
digits model still do what plain prompts say? (issue 22)

    sora-jax demo --workdir runs/demo                      # the base, once (or any trained quickstart workdir)
    python benchmarks/lora_style.py --base runs/demo       # ~5 min on a 2-core CPU

Steps, each a real user path:

  1. clips   8 moving-digits clips (the generator of the base's data, its clip shape and speeds, a seed the base
             never drew) recoloured to ``--style_rgb``, their captions with ``--trigger`` put before them, plus
             ``--prior_clips`` clips of the base's own data with their plain captions; written as MP4s with
             PyAV (the 8 style clips ``--style_repeat`` times each: 16 of 208 clips) with a
             ``captions.csv``; ``sora-jax ingest`` turns them into one dataset folder.
  2. train   ``sora-jax train --config configs/finetune_lora.py --config.lora.init_from=<base>
             --config.data.path=<ingested>`` (plus ``--set key=value`` overrides), adapters over the frozen base.
  3. style   base and LoRA sample the same ``--num_prompts`` test-split prompts (held out of the base's and the
             LoRA's training: the digits' split and held-out digit/direction pairs), the trigger put before
             them, with the same seed; ``style_score`` of their frames, of the 8 style clips (decoded from the
             ingested records) and of the base data's clips.
  4. adherence  the demo report's setting (96 plain test prompts, seed 0, the config's EMA weights) for base
             and LoRA, and their difference; the adherence of the styled videos of step 3 beside it.

Why a trigger word and the base's own clips (DreamBooth's "prior preservation", Ruiz et al. 2022): without
them (``--trigger '' --prior_clips 0 --style_repeat 1``) the adapters learn the 8 clips' whole distribution, the
style with their 8 digits' shapes, and every prompt pays: the LoRA that reached the style lost 0.12-0.18 of
digit accuracy on the plain test prompts (the ``runs`` of the results file). With them, the style is tied to
the trigger, and plain prompts are trained to keep giving the base's digits.

Why a grey level and not orange by default: ``configs/quickstart.py`` trains in the ``luma`` pixel codec
(C = 1, ``sora_jax/models/autoencoder.py``), so a colour's hue never reaches the model; what a colour leaves is
its luma. ``--style_rgb 128,128,128`` (mid-grey digits, a brightness the base never drew: its digits peak at
255; the adherence reader reads digits at half brightness as well as at full: 0.99 digits right either way)
is a style this model can represent; with an RGB model (``autoencoder.kind`` identity or vae) pass a colour
such as ``255,128,0`` and read ``fg_rgb``.

Writes ``<out>/<name>.json`` (every run with this name so far is kept in ``runs``: settings, numbers, timings)
and ``<out>/<name>.png`` (per prompt: the base's row, then the LoRA's, on the styled prompts).
"""

from __future__ import annotations

import argparse
import csv
import json
import os
import platform
import subprocess
import sys
import time
from pathlib import Path

import numpy as np

REPO = Path(__file__).resolve().parent.parent
LUMA = np.array([0.299, 0.587, 0.114])  # Rec.601, the luma codec's weights
STYLE_SEED = 22  # the style clips' generator seed (the base's data uses 0)


def style_score(videos: np.ndarray, threshold: float = 32.0) -> dict:
    """Colour statistics of the foreground of uint8 videos ``[..., H, W, 3]``: pixels whose Rec.601 luma is
    above ``threshold`` (the digits; the background is black).

    Returns ``fg_luma`` (mean luma of the foreground: the style's brightness, what a luma model can carry),
    ``fg_rgb`` (mean foreground RGB), ``fg_fraction`` (share of pixels in the foreground: stroke area) and
    ``bg_luma`` (mean luma of the rest). NaN where there is no foreground."""
    v = np.asarray(videos, np.float64)
    if v.ndim < 3 or v.shape[-1] != 3:
        raise ValueError(f"style_score: videos must be [..., H, W, 3], got shape {v.shape}")
    y = v @ LUMA
    fg = y > threshold
    nan = float("nan")
    return {
        "fg_luma": float(y[fg].mean()) if fg.any() else nan,
        "fg_rgb": [float(c) for c in v[fg].mean(axis=0)] if fg.any() else [nan] * 3,
        "fg_fraction": float(fg.mean()),
        "bg_luma": float(y[~fg].mean()) if (~fg).any() else nan,
        "threshold": float(threshold),
    }


def recolour(videos: np.ndarray, rgb: tuple[int, int, int]) -> np.ndarray:
    """White-on-black uint8 videos ``[..., 3]`` -> the same shapes in ``rgb`` (each pixel's grey level scales
    the colour, so anti-aliased edges stay anti-aliased)."""
    grey = np.asarray(videos, np.float32)[..., :1] / 255.0
    return np.rint(grey * np.asarray(rgb, np.float32)).astype(np.uint8)


def style_clips(num: int, rgb: tuple[int, int, int], *, num_frames: int, height: int, width: int, speed=None):
    """``num`` train-split moving-digits clips at the base's clip shape, recoloured: (uint8 [N, T, H, W, 3],
    captions)."""
    from sora_jax.data import moving_digits

    g = moving_digits.generate(
        "train", num, seed=STYLE_SEED, num_frames=num_frames, height=height, width=width, speed=speed
    )
    return recolour(g["video"], rgb), list(g["captions"])


def write_clips(folder: str | os.PathLike, videos: np.ndarray, captions: list[str], fps: float) -> Path:
    """Writes ``videos`` uint8 [N, T, H, W, 3] as ``clip_<i>.mp4`` (PyAV, H.264, native size) and a
    ``captions.csv`` (``video,caption,split,license,source``: the format ``sora-jax ingest`` reads); returns
    its path."""
    from sora_jax.sample.video_io import write_mp4

    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / "captions.csv"
    with open(path, "w", newline="") as f:
        w = csv.writer(f)
        w.writerow(["video", "caption", "split", "license", "source"])
        for i, (video, caption) in enumerate(zip(videos, captions)):
            write_mp4(folder / f"clip_{i:02d}.mp4", video, fps, scale=1, crf=10)
            w.writerow(
                [f"clip_{i:02d}.mp4", caption, "train", "CC0-1.0", "sora_jax moving_digits (recoloured)"]
            )
    return path


def ingest_clips(
    videos: str | os.PathLike, captions: str | os.PathLike, out: str | os.PathLike, *, seconds: float
):
    """``sora-jax ingest`` (the CLI's own entry point) of the clips into the dataset folder ``out``; raises on
    failure."""
    from sora_jax import cli

    argv = ["ingest", "--videos", str(videos), "--captions", str(captions), "--out", str(out)]
    argv += ["--clip_seconds", f"{seconds:g}", "--workers", "1", "--crf", "10", "--no_progress"]
    rc = cli.main(argv)
    if rc != 0:
        raise RuntimeError(f"sora-jax {' '.join(argv)} exited {rc}")
    return Path(out)


def dataset_clips(data: str | os.PathLike, cfg, split: str = "train") -> tuple[np.ndarray, list[str]]:
    """Every clip of ``split`` in a dataset folder, decoded and cut to ``cfg``'s clip shape as training reads
    them: (uint8 [N, T, H, W, 3], captions)."""
    from sora_jax.eval.clips import clip_shape, read_clips

    return read_clips(data, split, clip=clip_shape(cfg))


def _train(base: Path, data: Path, workdir: Path, sets: list[str], config: str) -> float:
    cmd = [sys.executable, "-m", "sora_jax.cli", "train", "--config", config, "--workdir", str(workdir)]
    cmd += [f"--config.lora.init_from={base}", f"--config.data.path={data}"]
    cmd += [f"--config.{s}" for s in sets]
    env = dict(os.environ, PYTHONPATH=os.pathsep.join([str(REPO), os.environ.get("PYTHONPATH", "")]))
    print("+", " ".join(cmd), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True, env=env, cwd=REPO)
    return time.perf_counter() - t0


def _adherence(workdir: Path, out: Path, num: int, seed: int, data: Path) -> dict:
    from sora_jax.eval.evaluate import evaluate_workdir

    t0 = time.perf_counter()
    r = evaluate_workdir(workdir, num_prompts=num, split="test", seed=seed, out=out, data=data)
    return {
        "metrics": r["metrics"],
        "videos": r["videos"],
        "prompts": r["prompts"],
        "seconds": time.perf_counter() - t0,
    }


def _base_adherence(base: Path, work: Path, num: int, seed: int, data: Path) -> dict:
    """``_adherence`` of the base, kept in ``work`` for the next setting (keyed by the base's path and its
    checkpoints, so another or a retrained base is sampled again)."""
    import hashlib

    steps = sorted(p.name for p in (base / "checkpoints").iterdir())
    key = hashlib.sha256(json.dumps([str(base), steps, num, seed, str(data)]).encode()).hexdigest()[:12]
    cache = work / f"base_eval_{key}.npz"
    if cache.exists():
        z = np.load(cache)
        meta = json.loads(str(z["meta"]))
        return {"videos": z["videos"], **meta}
    r = _adherence(base, work / "eval_base", num, seed, data)
    meta = {k: r[k] for k in ("metrics", "prompts", "seconds")}
    np.savez(cache, videos=r["videos"], meta=json.dumps(meta))
    return r


def _generate(workdir: Path, prompts: list[str], seed: int) -> dict:
    """Videos of ``prompts`` from ``workdir``'s checkpoint (the config's EMA choice) and their adherence."""
    from sora_jax.eval.adherence import evaluate_prompts
    from sora_jax.sample.pipeline import load_pipeline

    t0 = time.perf_counter()
    videos = load_pipeline(workdir).generate(prompts, seed=seed, progress=True)
    metrics, _ = evaluate_prompts(videos, prompts)
    return {"metrics": metrics, "videos": videos, "prompts": prompts, "seconds": time.perf_counter() - t0}


def _with_trigger(trigger: str, caption: str) -> str:
    """``trigger`` with ``{}`` is a template for the caption ("{}, in grey"); else it goes before it."""
    if not trigger:
        return caption
    return trigger.replace("{}", caption) if "{}" in trigger else f"{trigger} {caption}"


KEYS = ("digit_accuracy", "direction_accuracy", "both_accuracy", "count_accuracy")


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--base", default="runs/demo", help="the trained digits workdir (configs/quickstart.py)")
    ap.add_argument("--work", default="runs/lora_style", help="clips, dataset and LoRA workdirs go here")
    ap.add_argument(
        "--style_rgb", default="128,128,128", help="the style's colour, R,G,B (see the docstring)"
    )
    ap.add_argument("--num_clips", type=int, default=8, help="clips of the style")
    ap.add_argument(
        "--trigger",
        default="grey style:",
        help="put before the style clips' captions, or a template with {} ('': none; see above)",
    )
    ap.add_argument(
        "--prior_clips",
        type=int,
        default=192,
        help="clips of the base's own data mixed in (0: none; see above)",
    )
    ap.add_argument(
        "--style_repeat",
        type=int,
        default=2,
        help="each style clip is ingested this many times (oversampling)",
    )
    ap.add_argument("--num_prompts", type=int, default=96, help="test prompts (the demo report's 96)")
    ap.add_argument("--seed", type=int, default=0, help="prompt draw and sampling noise (the demo's 0)")
    ap.add_argument("--config", default="configs/finetune_lora.py")
    ap.add_argument(
        "--set", action="append", default=[], help="config override key=value, e.g. optim.lr=3e-3"
    )
    ap.add_argument("--tag", default="default", help="names this setting's LoRA workdir and its row")
    ap.add_argument("--out", default="benchmarks/results")
    ap.add_argument("--name", default="lora_style_demo")
    args = ap.parse_args(argv)

    base = Path(args.base).resolve()
    if not (base / "checkpoints").is_dir():
        msg = f"lora_style: no trained base at {base} (run `sora-jax demo --workdir {args.base}` first)"
        print(msg, file=sys.stderr)
        return 2
    rgb = tuple(int(c) for c in args.style_rgb.split(","))
    if len(rgb) != 3 or not all(0 <= c <= 255 for c in rgb):
        print(f"lora_style: --style_rgb must be R,G,B in 0..255, got {args.style_rgb!r}", file=sys.stderr)
        return 2

    from sora_jax.data import moving_digits
    from sora_jax.eval.evaluate import split_prompts
    from sora_jax.loading import saved_config
    from sora_jax.sample.video_io import contact_sheet

    _, base_cfg = saved_config(base)
    base_data = Path(base_cfg.data.path or base / "data")
    work = Path(args.work).resolve()
    trig = "".join(c if c.isalnum() else "_" for c in args.trigger).strip("_") or "none"
    data_name = (
        f"{'x'.join(map(str, rgb))}_{args.num_clips}x{args.style_repeat}_{trig}_prior{args.prior_clips}"
    )
    clips_dir, data_dir = work / f"clips_{data_name}", work / f"data_{data_name}"
    lora_dir = work / f"lora_{data_name}_{args.tag}"
    timings = {}

    # 1. the style clips (+ the base's own clips): MP4s + captions -> sora-jax ingest
    t0 = time.perf_counter()
    shape = dict(num_frames=base_cfg.data.num_frames, height=base_cfg.data.height, width=base_cfg.data.width)
    speed = tuple(base_cfg.data.speed) or None
    videos, captions = style_clips(args.num_clips, rgb, speed=speed, **shape)
    captions = [_with_trigger(args.trigger, c) for c in captions]
    if not (data_dir / "metadata.json").exists():
        prior = moving_digits.generate("train", args.prior_clips, seed=0, speed=speed, **shape)
        rep = max(1, args.style_repeat)
        all_videos = np.concatenate([np.tile(videos, (rep, 1, 1, 1, 1)), prior["video"]])
        caps = write_clips(clips_dir, all_videos, captions * rep + list(prior["captions"]), base_cfg.data.fps)
        ingest_clips(clips_dir, caps, data_dir, seconds=base_cfg.data.num_frames / base_cfg.data.fps)
    timings["clips_and_ingest_s"] = time.perf_counter() - t0
    clips, clip_captions = dataset_clips(data_dir, base_cfg)
    train_clips = clips[np.isin(clip_captions, captions)]

    # 2. the LoRA
    timings["train_s"] = _train(base, data_dir, lora_dir, args.set, args.config)

    # 3 + 4. the same held-out prompts and seeds through both: plain (adherence, the demo's setting) and, with
    # a trigger, with the trigger put before them (the style asked for)
    plain = split_prompts(base_data, "test", args.num_prompts, args.seed)
    rows = {"base": _base_adherence(base, work, args.num_prompts, args.seed, base_data)}
    rows["lora"] = _adherence(
        lora_dir, work / f"eval_lora_{args.tag}", args.num_prompts, args.seed, base_data
    )
    assert rows["base"]["prompts"] == rows["lora"]["prompts"] == plain
    styled = {who: rows[who] for who in rows}
    if args.trigger:
        asked = [_with_trigger(args.trigger, p) for p in plain]
        styled = {"base": _generate(base, asked, args.seed), "lora": _generate(lora_dir, asked, args.seed)}
    for k, r in {
        **{f"{w}_plain": rows[w] for w in rows},
        **{f"{w}_styled": styled[w] for w in styled},
    }.items():
        timings[f"sample_and_eval_{k}_s"] = r["seconds"]
    ref = moving_digits.generate("test", 256, seed=0, speed=speed, **shape)["video"]
    scores = {
        "base_data_clips": style_score(ref),
        "style_train_clips": style_score(train_clips),
        "base_generated": style_score(styled["base"]["videos"]),
        "lora_generated": style_score(styled["lora"]["videos"]),
        "lora_generated_plain_prompts": style_score(rows["lora"]["videos"]),
    }
    b, lo, s, d = (
        scores[k]["fg_luma"]
        for k in ("base_generated", "lora_generated", "style_train_clips", "base_data_clips")
    )
    adherence = {who: {k: rows[who]["metrics"][k] for k in KEYS} for who in rows}
    delta = {k: adherence["lora"][k] - adherence["base"][k] for k in KEYS}
    per_video = [style_score(v)["fg_luma"] for v in styled["lora"]["videos"]]
    run = {
        "tag": args.tag,
        "settings": {
            "config": args.config,
            "overrides": args.set,
            "style_rgb": list(rgb),
            "num_clips": args.num_clips,
            "trigger": args.trigger,
            "prior_clips": args.prior_clips,
            "style_repeat": args.style_repeat,
            "train_clips": len(clips),
        },
        "style_prompts": "test prompts with the trigger before them" if args.trigger else "test prompts",
        "style": scores,
        "fg_luma": {"base": b, "lora": lo, "style_clips": s, "base_data": d},
        # 1.0: the LoRA's foreground is as bright as the style clips'; 0: as the base's
        "style_transfer": (lo - b) / (s - b),
        "lora_within_10_of_style": abs(lo - s) <= 10.0,
        "share_of_lora_videos_nearer_style_than_white": float(
            np.mean([abs(x - s) < abs(x - d) for x in per_video if x == x])
        ),
        "adherence": adherence,
        "adherence_delta_lora_minus_base": delta,
        "adherence_within_0.02": all(abs(v) <= 0.02 for v in delta.values()),
        "adherence_styled_prompts": {who: {k: styled[who]["metrics"][k] for k in KEYS} for who in styled},
        "timings_s": timings,
        "date": time.strftime("%Y-%m-%d %H:%M:%S"),
    }

    out = Path(args.out)
    out.mkdir(parents=True, exist_ok=True)
    path = out / f"{args.name}.json"
    old = json.loads(path.read_text()) if path.exists() else {}
    runs = [r for r in old.get("runs", []) if r["tag"] != args.tag] + [run]
    report = {
        **old,  # notes added to the file by hand stay
        "command": "python benchmarks/lora_style.py " + " ".join(argv if argv is not None else sys.argv[1:]),
        "base": str(args.base),
        "eval": {"split": "test", "num_prompts": args.num_prompts, "seed": args.seed, "data": str(base_data)},
        "style_score": "style_score(): mean Rec.601 luma of pixels with luma > 32 (fg_luma); fg_rgb beside",
        "platform": {
            "machine": platform.machine(),
            "cpus": os.cpu_count(),
            "python": platform.python_version(),
        },
        "latest": args.tag,
        "runs": runs,
    }
    path.write_text(json.dumps(report, indent=1) + "\n")

    n = 8
    sheet = np.stack([styled[who]["videos"][i] for i in range(n) for who in ("base", "lora")])
    caps = [f"{who}: {styled['base']['prompts'][i]}"[:60] for i in range(n) for who in ("base", "lora")]
    contact_sheet(sheet, caps, out / f"{args.name}.png", scale=4)

    print(f"\n{'':24s}{'fg_luma':>9s}{'digits':>8s}{'direction':>10s}{'both':>7s}{'count':>7s}")
    print(f"{'base data clips':24s}{d:9.1f}")
    print(f"{'style clips (train)':24s}{s:9.1f}")
    for who in ("base", "lora"):
        a = adherence[who]
        print(
            f"{who + ' (style prompts)':24s}{scores[who + '_generated']['fg_luma']:9.1f}"
            + "".join(f"{a[k]:{w}.3f}" for k, w in zip(KEYS, (8, 10, 7, 7)))
            + "   <- adherence on the plain test prompts"
        )
    print(
        f"style transfer {run['style_transfer']:.2f}; adherence delta "
        + ", ".join(f"{k.split('_')[0]} {v:+.3f}" for k, v in delta.items())
    )
    print(f"wrote {path} and {out / (args.name + '.png')}")
    return 0


if __name__ == "__main__":
    sys.path.insert(0, str(REPO))
    sys.exit(main())
