"""Where a CPU train step spends its time: the compiled step's ops from a ``jax.profiler`` trace, summed by the
part of the step they belong to (the DiT's scanned blocks forward / backward, the rest of the model, REPA's
encoder and term, the optimizer, the EMA) and by kind (matmuls and convolutions, data movement, the rest).

    python benchmarks/cpu_step_profile.py                         # the demo's step (configs/quickstart.py)
    python benchmarks/cpu_step_profile.py --override optim.optimizer=adamw repa.layer=0

The parts come from the ops' names (``jax.named_scope`` "blocks" in ``sora_jax/models/dit.py``, "optimizer",
"ema", "repa" in ``sora_jax/train``; backward: the transposed ops). XLA's CPU runtime runs
independent ops at the same time on its threads, so the op milliseconds of a step add up to more than its
wall milliseconds (both are reported). Prints a table and writes ``benchmarks/results/cpu_step_profile.json``.
"""

from __future__ import annotations

import argparse
import collections
import gzip
import json
import re
import sys
import tempfile
import time
from pathlib import Path

from host_malloc import compiled_step, write_json

PARTS = ("blocks forward", "blocks backward", "model, rest forward", "model, rest backward")
PARTS += ("REPA encoder and term", "optimizer", "EMA")
MOVES = ("copy", "dynamic-update-slice", "dynamic-slice", "broadcast", "transpose", "slice", "concatenate")


def part_of(op_name: str) -> str:
    """The part of the train step an op belongs to, from its HLO ``op_name`` metadata."""
    scopes = set(re.split(r"[/()]", op_name))  # "jit(sharded_step)/transpose(jvp(repa))/mul": repa, ...
    if "optimizer" in scopes:
        return "optimizer"
    if "ema" in scopes:
        return "EMA"
    if "repa" in scopes:
        return "REPA encoder and term"
    backward = "transpose(" in op_name
    if "blocks" in scopes:
        return "blocks backward" if backward else "blocks forward"
    return "model, rest backward" if backward else "model, rest forward"


def kind_of(instruction: str, hlo_line: str) -> str:
    """matmul (YNNPACK / Eigen dots and convolutions), data movement (copies, slices, broadcasts), or other."""
    if instruction.startswith(("ynn_fusion", "dot", "convolution")) or "__ynn_fusion" in hlo_line:
        return "matmul / conv"
    name = re.sub(r"\.\d+$", "", instruction)
    if name.startswith(("wrapped_", "copy")) or any(m in name.split("_") for m in MOVES) or name == "while":
        return "data movement" if name != "while" else "loop control"
    return "elementwise / reduce"


def profile(config: str, overrides: list[str], steps: int) -> dict:
    import jax

    step, state, batch, frozen = compiled_step(config, overrides)
    hlo = step.as_text()
    ops = {}  # instruction name -> (op_name, the HLO line)
    for line in hlo.splitlines():
        m = re.match(r"\s*(?:ROOT )?%(\S+) = .*?metadata=\{op_name=\"([^\"]+)\"", line)
        if m:
            ops[m.group(1)] = (m.group(2), line)
    for _ in range(5):
        state, metrics = step(state, batch, frozen)
    jax.block_until_ready(metrics)
    t0 = time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch, frozen)
    jax.block_until_ready(metrics)
    wall_ms = 1000 * (time.perf_counter() - t0) / steps
    with tempfile.TemporaryDirectory() as d:
        jax.profiler.start_trace(d)
        for _ in range(steps):
            state, metrics = step(state, batch, frozen)
        jax.block_until_ready(metrics)
        jax.profiler.stop_trace()
        with gzip.open(next(Path(d).rglob("*.trace.json.gz"))) as f:
            trace = json.load(f)
    events = trace["traceEvents"]
    threads = {
        (e["pid"], e["tid"]) for e in events if e.get("name") == "thread_name" and "XLA" in e["args"]["name"]
    }
    by_part, by_kind, by_op = collections.Counter(), collections.Counter(), collections.Counter()
    for e in events:
        if e.get("ph") != "X" or (e["pid"], e["tid"]) not in threads or e["name"] not in ops:
            continue
        op_name, line = ops[e["name"]]
        ms = e["dur"] / 1000 / steps
        part, kind = part_of(op_name), kind_of(e["name"], line)
        by_part[part] += ms
        by_kind[(part, kind)] += ms
        by_op[(e["name"], part, op_name.split("/")[-1])] += ms
    return {
        "date": time.strftime("%Y-%m-%d"),
        "config": config,
        "overrides": overrides,
        "steps": steps,
        "wall_ms_per_step": wall_ms,
        "op_ms_per_step": sum(by_part.values()),
        "parts": {p: by_part[p] for p in PARTS},
        "parts_by_kind": {f"{p} | {k}": v for (p, k), v in sorted(by_kind.items())},
        "top_ops": [{"op": n, "part": p, "last_name": o, "ms": v} for (n, p, o), v in by_op.most_common(15)],
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/quickstart.py")
    p.add_argument("--override", nargs="*", default=[], help="config overrides key=value")
    p.add_argument("--steps", type=int, default=20, help="steps timed, then as many traced")
    p.add_argument("--out", default="benchmarks/results/cpu_step_profile.json")
    args = p.parse_args(argv)
    if args.steps < 1:
        print("cpu_step_profile: --steps must be positive", file=sys.stderr)
        return 2
    r = profile(args.config, args.override, args.steps)
    total = r["op_ms_per_step"]
    print(f"{'part of the step':24s} {'op ms':>7s} {'share':>6s}   of which matmul / data movement")
    for part in PARTS:
        ms = r["parts"][part]
        mm = r["parts_by_kind"].get(f"{part} | matmul / conv", 0.0)
        mv = r["parts_by_kind"].get(f"{part} | data movement", 0.0)
        print(f"{part:24s} {ms:7.1f} {ms / total:6.1%}   {mm:6.1f} / {mv:5.1f}")
    print(f"{'all ops':24s} {total:7.1f}          wall {r['wall_ms_per_step']:.1f} ms per step")
    write_json(r, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
