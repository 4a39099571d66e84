"""Long videos that keep their objects? ``num`` test-split captions, each made into a ``seconds``-long video by
autoregressive extension, read segment by segment (``sora_jax/eval/long_video.py``), for one or more settings.

    python benchmarks/long_video.py --workdir runs/demo --num 16 --seconds 60 --overlap 1 2 --cfg_scale 6 9 \
        --out benchmarks/results/long_video_demo.json

Each (overlap, cfg_scale) pair is one row: the share of segments showing the prompt's digits (and directions),
the first segment's (a single clip's), first vs last quarter, the share of videos whose every segment is right,
the share whose digit set ever changes, identity changes per minute, the angle between asked and read
directions, the seam ratio, and the seconds it took. Prints a table, writes JSON and one PNG per row beside it.
"""

from __future__ import annotations

import argparse
import itertools
import json
import platform
import time
from pathlib import Path

KEYS = (
    ("segment_digit_accuracy", "segments: digits"),
    ("segment_both_accuracy", "segments: both"),
    ("first_segment_digit_accuracy", "first segment"),
    ("first_quarter_digit_accuracy", "first quarter"),
    ("last_quarter_digit_accuracy", "last quarter"),
    ("videos_all_segments_digits_ok", "videos: every segment"),
    ("videos_identity_changed", "videos: identity changes"),
    ("identity_changes_per_minute", "changes / min"),
    ("last_quarter_angle_error_deg", "angle error (deg)"),
    ("seam_jump_ratio", "seam ratio"),
)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--num", type=int, default=16, help="videos (test-split captions)")
    ap.add_argument("--seconds", type=float, default=60.0)
    ap.add_argument("--overlap", type=int, nargs="+", default=[1], help="latent frames given at each seam")
    ap.add_argument("--cfg_scale", type=float, nargs="+", default=[None], help="default: the config's")
    for flag, default, text in (
        (
            "--history_guidance",
            0.0,
            "history guidance scales w (0: plain conditioning on the previous frames)",
        ),
        ("--init_strength", 1.0, "later segments start from the last frame held, noised to this (1: noise)"),
    ):
        ap.add_argument(flag, type=float, nargs="+", default=[default], help=text)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="JSON results file")
    ap.add_argument(
        "--reference",
        action="store_true",
        help="also score real moving-digit videos of the same length, cut into the last run's segments: "
        "what the reader gives a video that truly keeps its digits (its ceiling)",
    )
    args = ap.parse_args()

    from sora_jax.data.pipeline import dataset_dir
    from sora_jax.eval.evaluate import split_prompts
    from sora_jax.eval.long_video import plot_long, score_long
    from sora_jax.sample.pipeline import load_pipeline
    from sora_jax.sample.prompter import Prompter

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows = []
    for cfg_scale in args.cfg_scale:
        pipe = load_pipeline(args.workdir, **({"cfg_scale": cfg_scale} if cfg_scale is not None else {}))
        prompts = split_prompts(dataset_dir(pipe.config, args.workdir), "test", args.num, args.seed)
        for w in args.history_guidance:
            p = Prompter.from_pipeline(pipe, history_guidance=w)
            for overlap, strength in itertools.product(args.overlap, args.init_strength):
                t0 = time.perf_counter()
                videos, segments = p.long_video(
                    prompts,
                    seconds=args.seconds,
                    overlap=overlap,
                    seed=args.seed,
                    progress=True,
                    init_strength=strength,
                )
                seconds = time.perf_counter() - t0
                m, per_segment, _ = score_long(videos, segments, prompts, p.frames, p.fps)
                tag = f"overlap{overlap}_cfg{pipe.config.diffusion.cfg_scale:g}_hg{w:g}"
                tag += f"_init{strength:g}" if strength < 1 else ""
                plot_long(per_segment, out.with_name(f"{out.stem}_{tag}.png"), f"{args.workdir} {tag}")
                row = {"source": "model", "overlap": overlap, "cfg_scale": pipe.config.diffusion.cfg_scale}
                row |= {"init_strength": strength}
                rows.append(
                    row | {"history_guidance": w, "step": pipe.step} | m | {"generate_seconds": seconds}
                )
    if args.reference:
        rows.append(_reference(pipe.config, p, segments, args))
    head = ["source", "overlap", "cfg", "history g.", "init"] + [label for _, label in KEYS]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        cells = [r["source"], str(r["overlap"]), f"{r['cfg_scale']:g}", f"{r['history_guidance']:g}"]
        cells.append(f"{r.get('init_strength', 1.0):g}")
        print("| " + " | ".join(cells + [f"{r[k]:.3f}" for k, _ in KEYS]) + " |")
    result = {
        "command": "python benchmarks/long_video.py "
        + " ".join(
            f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items()
        ),
        "prompts": prompts,
        "rows": rows,
        "machine": platform.platform(),
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


def _reference(config, p, segments, args) -> dict:
    """The metrics of ``args.num`` real test-split videos of the data's generator (its speed, seed
    ``args.seed``), ``segments``' length, read like the generated ones; bounces make their directions drift."""
    from sora_jax.data import moving_digits
    from sora_jax.eval.long_video import score_long

    n = segments[-1][1]
    speed = tuple(config.data.speed) or None
    real = moving_digits.generate(
        "test", args.num, seed=args.seed, num_frames=n, height=p.height, width=p.width, speed=speed
    )
    m, _, _ = score_long(real["video"], segments, real["captions"], p.frames, p.fps)
    return {"source": "real videos", "overlap": 0, "cfg_scale": 0.0, "history_guidance": 0.0} | m


if __name__ == "__main__":
    main()
