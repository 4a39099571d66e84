"""The trainer's setup (data build, caption table, REPA's table, compile, initial state) of two checkouts timed
against each other: fresh processes, alternating, each training a config for a few steps in a new workdir.

    python benchmarks/train_setup_ab.py --a /path/to/old/checkout --b . --pairs 3

Each run is ``train(config, workdir)`` with ``train.num_steps=--steps`` imported from that checkout
(``PYTHONPATH``), timed from the call to its return, with the trainer's own timings beside it. Prints a table
and writes ``benchmarks/results/train_setup_ab.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

_CHILD = """
import json, sys, time
from sora_jax.config import load_config
from sora_jax.train.loop import train
cfg = load_config(sys.argv[1], ["train.num_steps=" + sys.argv[3]])
t0 = time.perf_counter()
m = train(cfg, sys.argv[2], progress=False)
print(json.dumps({"train_call_s": time.perf_counter() - t0, **{k: v for k, v in m.items() if "seconds" in k}}))
"""


def run_one(tree: Path, config: str, steps: int) -> dict:
    """One fresh process training ``config`` of ``tree`` for ``steps`` steps in a new workdir."""
    env = dict(os.environ, PYTHONPATH=str(tree))
    with tempfile.TemporaryDirectory(prefix="setup_ab_") as work:
        out = subprocess.run(
            [sys.executable, "-c", _CHILD, str(tree / config), work, str(steps)],
            cwd=tree,
            env=env,
            capture_output=True,
            text=True,
            check=True,
        )
    return json.loads(out.stdout.strip().splitlines()[-1])


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--a", required=True, help="checkout A (a git worktree of the old commit)")
    p.add_argument("--b", required=True, help="checkout B")
    p.add_argument("--config", default="configs/quickstart.py", help="file[:arg], relative to each checkout")
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--pairs", type=int, default=3)
    p.add_argument("--out", default="benchmarks/results/train_setup_ab.json")
    args = p.parse_args(argv)
    trees = {"A": Path(args.a).resolve(), "B": Path(args.b).resolve()}
    for name, tree in trees.items():
        if not (tree / args.config.split(":")[0]).is_file():  # file[:arg]
            print(f"train_setup_ab: no {args.config} in checkout {name} ({tree})", file=sys.stderr)
            return 2
    if min(args.steps, args.pairs) < 1:
        print("train_setup_ab: --steps and --pairs must be positive", file=sys.stderr)
        return 2
    runs = {"A": [], "B": []}
    for i in range(args.pairs):
        for name in ("A", "B"):
            runs[name].append(run_one(trees[name], args.config, args.steps))
            print(f"pair {i + 1} {name}: {runs[name][-1]['train_call_s']:.1f} s", flush=True)
    med = {k: statistics.median(r["train_call_s"] for r in v) for k, v in runs.items()}
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "config": args.config,
        "steps": args.steps,
        "a": str(trees["A"]),
        "b": str(trees["B"]),
        "median_train_call_s": med,
        "b_saves_s": med["A"] - med["B"],
        "b_faster_pairs": sum(a["train_call_s"] > b["train_call_s"] for a, b in zip(runs["A"], runs["B"])),
        "runs": runs,
    }
    print(f"| checkout | median s ({args.steps} steps, setup included) | runs |\n|---|---|---|")
    for k in ("A", "B"):
        seconds = ", ".join(f"{r['train_call_s']:.1f}" for r in runs[k])
        print(f"| {k} {trees[k]} | {med[k]:.1f} | {seconds} |")
    print(f"B saves {result['b_saves_s']:.1f} s, faster in {result['b_faster_pairs']} of {args.pairs} pairs")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(result, indent=1))
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
