"""Do the Fréchet distances behave on moving digits? Real clips against real clips, against the same clips with
their frames shuffled, and against noise.

    python benchmarks/fvd_sanity.py --data runs/demo/data --num 256 --out benchmarks/results/fvd_sanity.json

Set A: the first ``num`` clips of the test split (its statistics are the reference); set B: the next ``num``
(disjoint); "B, frames shuffled": B with each clip's frames in a random order (same frames, wrong motion);
"B, one frame": every frame of a B clip replaced by its first (no motion at all); "noise": uniform uint8 noise.
Each metric of ``sora_jax.eval.distances`` (fvd, fd_digits, fd_frames) of every set against A, with the counts.
A metric behaves when A-vs-B is far below the broken sets and noise is largest. Prints a table, writes JSON.
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import numpy as np

from sora_jax.eval import distances
from sora_jax.eval.frechet import frechet_distance, gaussian_stats


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--data", required=True, help="dataset folder (metadata.json + ArrayRecord shards)")
    ap.add_argument("--split", default="test")
    ap.add_argument("--num", type=int, default=256, help="clips per set (the split needs 2 x num)")
    ap.add_argument("--metrics", default="fd_digits,fd_frames,fvd")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", required=True, help="JSON results file")
    args = ap.parse_args()

    clips = distances._split_videos(Path(args.data), args.split, 2 * args.num)
    if len(clips) < 2 * args.num:
        raise SystemExit(
            f"{args.data} {args.split} has {len(clips)} clips; --num {args.num} needs {2 * args.num}"
        )
    b = clips[args.num :]  # set A, clips[: args.num], is the reference below
    rng = np.random.default_rng(args.seed)
    t = b.shape[1]
    shuffled = np.stack([v[rng.permutation(t)] for v in b])
    still = np.repeat(b[:, :1], t, axis=1)
    noise = rng.integers(0, 256, b.shape, dtype=np.uint8)
    sets = {"B (disjoint real)": b, "B, frames shuffled": shuffled, "B, one frame": still, "noise": noise}

    rows, t_all = [], time.perf_counter()
    for name in args.metrics.split(","):
        t0 = time.perf_counter()
        ref = distances.reference_stats(name, args.data, args.split, args.num)  # set A, cached with the data
        info = {"frames": ref.meta["frames"]}
        for label, videos in sets.items():
            feats, _ = distances.features(name, videos, progress=True)
            rows.append(
                {
                    "metric": name,
                    "set": label,
                    "value": frechet_distance(gaussian_stats(feats), ref),
                    "count": len(videos),
                    "samples": len(feats),
                    "ref_count": ref.meta["videos"],
                    "frames": info["frames"],
                }
            )
        print(f"{name}: {time.perf_counter() - t0:.1f} s")

    print("\n| metric | " + " | ".join(sets) + " |")
    print("|---|" + "---|" * len(sets))
    for name in args.metrics.split(","):
        vals = [next(r["value"] for r in rows if r["metric"] == name and r["set"] == s) for s in sets]
        print(f"| {name} | " + " | ".join(f"{v:.4g}" for v in vals) + " |")
    print(f"\n{args.num} clips per set, reference: {args.num} other clips of {args.split}")
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {
                "command": "python benchmarks/fvd_sanity.py "
                + " ".join(f"--{k} {v}" for k, v in vars(args).items()),
                "rows": rows,
                "seconds": time.perf_counter() - t_all,
                "machine": platform.platform(),
                "cpu_count": __import__("os").cpu_count(),
            },
            indent=2,
        )
        + "\n"
    )
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
