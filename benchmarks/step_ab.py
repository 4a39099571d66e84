"""Two variants of a config's train step, timed against each other in one process: both compiled, then run in
alternating blocks of steps, so that a shared machine's drift (minutes-long swings of 10-20% on the 2-core
machines here) hits both alike.

    python benchmarks/step_ab.py --a model.scan_layers=True --b model.scan_layers=False

Each variant is ``--config`` with its overrides (``--a`` / ``--b``), built by the trainer's ``build_train_fns``
on one device with a random batch of the data's shapes (``benchmarks/host_malloc.py``'s ``compiled_step``).
Reports the median milliseconds per step of each over ``--rounds`` blocks of ``--block`` steps, and in how many
rounds B beat A. Prints a table and writes ``benchmarks/results/step_ab.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time

from host_malloc import compiled_step, write_json


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/quickstart.py")
    p.add_argument("--a", nargs="*", default=[], help="variant A's overrides key=value")
    p.add_argument("--b", nargs="*", default=[], help="variant B's overrides key=value")
    p.add_argument("--rounds", type=int, default=12)
    p.add_argument("--block", type=int, default=10, help="steps per block")
    p.add_argument("--out", default="benchmarks/results/step_ab.json")
    args = p.parse_args(argv)
    if min(args.rounds, args.block) < 1:
        print("step_ab: --rounds and --block must be positive", file=sys.stderr)
        return 2
    import jax

    variants = {"A": list(compiled_step(args.config, args.a)), "B": list(compiled_step(args.config, args.b))}

    def block(name: str, n: int) -> float:
        v = variants[name]
        step, state, batch, frozen = v
        t0 = time.perf_counter()
        for _ in range(n):
            state, metrics = step(state, batch, frozen)
        jax.block_until_ready(metrics)
        v[1] = state
        return 1000 * (time.perf_counter() - t0) / n

    block("A", 5), block("B", 5)  # warm-up
    times = {"A": [], "B": []}
    for _ in range(args.rounds):
        for name in ("A", "B"):
            times[name].append(block(name, args.block))
    med = {k: statistics.median(v) for k, v in times.items()}
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "config": args.config,
        "a": args.a,
        "b": args.b,
        "rounds": args.rounds,
        "block": args.block,
        "cpus": os.cpu_count(),
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "ms_per_step": times,
        "median_ms_per_step": med,
        "speedup_b_over_a": med["A"] / med["B"],
        "b_faster_in_rounds": sum(b < a for a, b in zip(times["A"], times["B"], strict=True)),
    }
    for name, over in (("A", args.a), ("B", args.b)):
        print(
            f"{name}  {med[name]:7.1f} ms/step (median of {args.rounds})  {' '.join(over) or '(the config)'}"
        )
    print(
        f"B: {result['speedup_b_over_a']:.3f}x the steps per second of A, faster in "
        f"{result['b_faster_in_rounds']} of {args.rounds} rounds"
    )
    write_json(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
