"""How far apart the two digits of a moving-digits train clip stay, per ``data.two_digit_gap``, and a contact sheet
of two-digit train clips built with each setting (what the DiT is shown).

    python benchmarks/two_digit_data.py --gaps 0 10 12 --clips 4000 --out benchmarks/results/two_digit_data.json

For each gap: the share of two-digit clips whose corners stay >= gap px apart (max-norm) in every frame, and
percentiles of the closest approach over each clip. Writes the JSON and ``<out stem>.png`` (8 two-digit clips
per setting, the same objects, the demo's shape and speed). Prints a table.
"""

from __future__ import annotations

import argparse
import json
from pathlib import Path

import numpy as np

from sora_jax.data import moving_digits as md
from sora_jax.sample.video_io import contact_sheet

PERCENTILES = (5, 10, 25, 50, 75)


def closest_approach(corners: np.ndarray) -> np.ndarray:
    """corners int [N, 2, T, 2] -> the two objects' smallest max-norm distance over the frames, float [N]."""
    return np.abs(corners[:, 0] - corners[:, 1]).max(-1).min(-1).astype(np.float64)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--gaps", type=float, nargs="+", default=[0.0, 10.0, 12.0])
    p.add_argument(
        "--clips", type=int, default=4000, help="train clips generated per gap (half have two digits)"
    )
    p.add_argument(
        "--speed", type=float, nargs=2, default=[1.0, 2.0], help="px/frame (configs/quickstart.py)"
    )
    p.add_argument("--out", default="benchmarks/results/two_digit_data.json")
    args = p.parse_args(argv)
    if args.clips < 16 or any(g < 0 for g in args.gaps):
        p.error("--clips must be >= 16 and every --gaps value >= 0")
    shape = dict(num_frames=8, height=32, width=32)
    rows, sheet, captions = [], [], []
    for gap in args.gaps:
        g = md.generate("train", args.clips, seed=0, speed=tuple(args.speed), min_gap=gap, **shape)
        two = np.flatnonzero(g["digits"][:, 1] >= 0)
        d = closest_approach(g["corners"][two])
        row = {
            "gap_px": gap,
            "two_digit_clips": int(two.size),
            "reach_gap": float((d >= gap).mean()),
            "closest_approach_px": {f"p{q}": float(np.percentile(d, q)) for q in PERCENTILES},
        }
        rows.append(row)
        sheet.append(g["video"][two[:8]])
        captions += [f"gap {gap:g}: {g['captions'][i]}" for i in two[:8]]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    report = {"clips_per_gap": args.clips, "speed": list(args.speed), "shape": shape, "rows": rows}
    out.write_text(json.dumps(report, indent=1))
    contact_sheet(np.concatenate(sheet), captions, out.with_suffix(".png"), scale=2)
    print(f"{'gap px':>7} {'reach':>6} " + " ".join(f"{'p' + str(q):>5}" for q in PERCENTILES))
    for r in rows:
        pct = " ".join(f"{r['closest_approach_px'][f'p{q}']:5.0f}" for q in PERCENTILES)
        print(f"{r['gap_px']:7g} {r['reach_gap']:6.3f} {pct}")
    print(f"wrote {out} and {out.with_suffix('.png')}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
