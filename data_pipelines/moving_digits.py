"""``python -m data_pipelines.moving_digits --out DIR ...``: build the bundled moving-digits dataset.

The generator lives in the library (``sora_jax.data.moving_digits``: the trainer and the demo build the same
data when a workdir has none); this is its command line.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence

from sora_jax.data.moving_digits import INTERPOLATIONS, build


def main(argv: Sequence[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--out", required=True, help="output folder (ArrayRecord shards + metadata.json)")
    p.add_argument("--num_train", type=int, default=6000)
    p.add_argument("--num_test", type=int, default=512)
    p.add_argument("--num_frames", type=int, default=8)
    p.add_argument("--height", type=int, default=32)
    p.add_argument("--width", type=int, default=32)
    p.add_argument("--fps", type=int, default=8)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--num_shards", type=int, default=4)
    p.add_argument("--digit_size", type=int, default=None, help="default: min(height, width) // 2")
    p.add_argument("--interpolation", choices=INTERPOLATIONS, default="nearest")
    p.add_argument("--speed", type=float, nargs=2, default=None, metavar=("MIN", "MAX"), help="px/frame")
    p.add_argument(
        "--train_two_fraction", type=float, default=0.5, help="share of two-digit train clips (test: 0.5)"
    )
    p.add_argument(
        "--train_min_gap",
        type=float,
        default=0.0,
        help="px two train digits stay apart in every frame (test: 0)",
    )
    p.add_argument(
        "--train_left_to_right", action="store_true", help="train captions name the left digit first"
    )
    a = p.parse_args(argv)
    out = build(
        a.out,
        num_train=a.num_train,
        num_test=a.num_test,
        num_frames=a.num_frames,
        height=a.height,
        width=a.width,
        fps=a.fps,
        seed=a.seed,
        num_shards=a.num_shards,
        digit_size=a.digit_size,
        interpolation=a.interpolation,
        speed=a.speed,
        train_two_fraction=a.train_two_fraction,
        train_min_gap=a.train_min_gap,
        train_left_to_right=a.train_left_to_right,
    )
    print(out)


if __name__ == "__main__":
    main()
