"""Does the model carry an object from given frames into the frames it generates? The question under long-video
permanence (issue 19): a segment that redraws its digit from the prompt, whatever the frames before it show,
changes identity as often as a fresh clip gets the digit wrong.

    python benchmarks/context_copy.py --workdir runs/demo --num 64 --frames 1 2 --cfg_scale 6 1 \
        --out benchmarks/results/context_copy_demo.json

``num`` real test-split clips (the data's generator at the model's clip shape) give their first k frames to the
model, which generates the rest; only the generated frames are read (stretched to the clip length by repeating
frames, so the reader never sees a given frame). Per (cfg_scale, history_guidance, k):

  own prompt       the clip's caption: digits read right
  conflict         another clip's caption: digits read as the *frames'* digits (copied from the frames) or as
                   the *prompt's* (redrawn from the text)

plus text-to-video with no frames (the generated frames read the same way) and the reader on real frames read
the same way (its ceiling). Prints a table, writes JSON and a PNG beside it (per clip: the real clip, then the
given frames and what the model made of them under another clip's prompt, for the last row).
"""

from __future__ import annotations

import argparse
import json
import platform
from pathlib import Path

import numpy as np


def _stretch(videos: np.ndarray, k: int) -> np.ndarray:
    """Frames k..T-1 of ``videos`` [B, T, ...] repeated to T frames (frame k + floor(i (T - k) / T))."""
    T = videos.shape[1]
    return videos[:, k + (np.arange(T) * (T - k)) // T]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--workdir", required=True)
    ap.add_argument("--num", type=int, default=64, help="real test clips")
    ap.add_argument("--frames", type=int, nargs="+", default=[1, 2], help="given (latent) frames k")
    ap.add_argument("--cfg_scale", type=float, nargs="+", default=[None], help="default: the config's")
    ap.add_argument("--history_guidance", type=float, nargs="+", default=[0.0])
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="JSON results file")
    args = ap.parse_args()

    from sora_jax.data import moving_digits
    from sora_jax.eval.adherence import evaluate_prompts
    from sora_jax.sample.pipeline import load_pipeline
    from sora_jax.sample.prompter import Prompter
    from sora_jax.sample.video_io import contact_sheet

    def digits_right(videos, prompts) -> float:
        return float(evaluate_prompts(videos, prompts)[0]["digit_accuracy"])

    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    rows, sheet = [], None
    for cfg_scale in args.cfg_scale:
        pipe = load_pipeline(args.workdir, **({"cfg_scale": cfg_scale} if cfg_scale is not None else {}))
        cfg = pipe.config
        base = None
        for w in args.history_guidance:
            p = Prompter.from_pipeline(pipe, history_guidance=w)
            if not rows:
                speed = tuple(cfg.data.speed) or None
                real = moving_digits.generate(
                    "test", args.num, seed=args.seed, num_frames=p.frames, height=p.height, width=p.width,
                    speed=speed,
                )  # fmt: skip
                V, caps = real["video"], real["captions"]
                other = [caps[(i + 1) % len(caps)] for i in range(len(caps))]
                ref = {k: digits_right(_stretch(V, p.pixel_overlap(k)), caps) for k in args.frames}
            if base is None:  # text-to-video at this guidance scale (no frames: history guidance is moot)
                t2v = p.generate(caps, seed=args.seed)
                base = {k: digits_right(_stretch(t2v, p.pixel_overlap(k)), caps) for k in args.frames}
            for k in args.frames:
                P = p.pixel_overlap(k)
                given = [{i: c[i] for i in range(P)} for c in V]
                own = p.generate(caps, given=given, seed=args.seed)
                swap = p.generate(other, given=given, seed=args.seed)
                rows.append(
                    {
                        "cfg_scale": cfg.diffusion.cfg_scale,
                        "history_guidance": w,
                        "frames": k,
                        "own_prompt_digits_right": digits_right(_stretch(own, P), caps),
                        "conflict_follows_frames": digits_right(_stretch(swap, P), caps),
                        "conflict_follows_prompt": digits_right(_stretch(swap, P), other),
                        "t2v_digits_right": base[k],
                        "reader_on_real_frames": ref[k],
                        "step": pipe.step,
                    }
                )
                sheet = (np.concatenate([V[:6], swap[:6]], axis=1), [f"prompt: {c}" for c in other[:6]])
    head = ["cfg", "history g.", "k", "own prompt", "conflict: frames", "conflict: prompt", "t2v", "real"]
    print("| " + " | ".join(head) + " |\n|" + "---|" * len(head))
    for r in rows:
        cells = [f"{r['cfg_scale']:g}", f"{r['history_guidance']:g}", str(r["frames"])] + [
            f"{r[k]:.3f}"
            for k in (
                "own_prompt_digits_right",
                "conflict_follows_frames",
                "conflict_follows_prompt",
                "t2v_digits_right",
                "reader_on_real_frames",
            )
        ]
        print("| " + " | ".join(cells) + " |")
    contact_sheet(sheet[0], sheet[1], out.with_suffix(".png"))
    result = {
        "command": "python benchmarks/context_copy.py "
        + " ".join(
            f"--{k} {' '.join(map(str, v)) if isinstance(v, list) else v}" for k, v in vars(args).items()
        ),
        "workdir": args.workdir,
        "rows": rows,
        "machine": platform.platform(),
    }
    out.write_text(json.dumps(result, indent=2) + "\n")
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
