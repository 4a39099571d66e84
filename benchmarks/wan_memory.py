"""Per-device memory of Wan 2.1 14B fine-tuning (``configs/wan_t2v_14b.py``) on FSDP meshes of 8 / 16 / 64
devices, from the trainer's ``--compile_only`` path on fake CPU devices: nothing is allocated, the step is
lowered and compiled for the mesh and XLA's memory analysis of the executable is read (``train.loop._memory``).

    python -m benchmarks.wan_memory                                   # fsdp 8, 16, 64; one clip per device
    python -m benchmarks.wan_memory --meshes 8 --override data.num_frames=17 --out /tmp/m.json

Each mesh compiles in its own process (the fake device count is fixed when JAX starts); the table is printed
and the JSON (``--out``) rewritten after every mesh, so an interrupted run keeps what it measured. The numbers
are XLA's CPU memory analysis: the CPU backend has no flash attention, so the attention scores
``[K, N, N]`` of one block are materialised (counted in ``temp_gib``; ``scores_gib`` gives their size, what a
flash kernel such as cuDNN's, ``model.attention_impl = "cudnn"`` on the GPU, does not hold).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]

_CHILD = """
import json, sys
from sora_jax import commands
config, n, overrides = sys.argv[1], int(sys.argv[2]), json.loads(sys.argv[3])
out = commands.train(config, sys.argv[4], overrides=overrides, compile_only=True, cpu_devices=n)
print("RESULT " + json.dumps(out))
"""


def _scores_gib(config: str, overrides: list[str]) -> tuple[int, float]:
    """(tokens per clip, GiB of one block's attention scores ``[K, N, N]`` for one clip in the compute dtype)."""
    from sora_jax import factory
    from sora_jax.config import load_config

    cfg = load_config(config, overrides)
    n = factory.tokens_per_clip(cfg, cfg.data.num_frames, cfg.data.height, cfg.data.width)
    itemsize = 2 if cfg.model.dtype == "bfloat16" else 4
    return n, cfg.model.wan.num_heads * n * n * itemsize / 2**30


def measure(config: str, devices: int, overrides: list[str], timeout: float) -> dict:
    """One mesh of ``devices`` fake CPU devices, FSDP over all of them, one clip per device."""
    overrides = [f"data.batch_size={devices}", "mesh.data=1", f"mesh.fsdp={devices}", *overrides]
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory() as workdir:
        proc = subprocess.run(
            [sys.executable, "-c", _CHILD, config, str(devices), json.dumps(overrides), workdir],
            cwd=ROOT,
            capture_output=True,
            text=True,
            timeout=timeout,
        )
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("RESULT ")]
    if proc.returncode or not lines:
        return {"devices": devices, "error": proc.stderr.strip().splitlines()[-1:]}
    out = json.loads(lines[-1].removeprefix("RESULT "))
    tokens, scores = _scores_gib(config, overrides)
    keep = (
        "peak_gib",
        "argument_gib",
        "output_gib",
        "alias_gib",
        "temp_gib",
        "compile_seconds",
        "peak_batch",
    )
    return {
        "devices": devices,
        "mesh": {"data": 1, "fsdp": devices, "tensor": 1, "seq": 1},
        "global_batch": devices,
        "tokens_per_clip": tokens,
        "scores_gib": scores,
        **{k: out[k] for k in keep if k in out},
        "wall_seconds": time.perf_counter() - t0,
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--config", default="configs/wan_t2v_14b.py")
    p.add_argument("--meshes", default="8,16,64", help="device counts, comma-separated")
    p.add_argument("--override", action="append", default=[], help="config key=value (repeatable)")
    p.add_argument("--out", default="benchmarks/results/wan14b_memory_cpu.json")
    p.add_argument("--timeout", type=float, default=3600.0, help="seconds per mesh")
    args = p.parse_args(argv)
    import jax

    rows = []
    meta = {"config": args.config, "overrides": args.override, "jax": jax.__version__, "backend": "cpu"}
    print(f"{'devices':>8} {'peak GiB':>9} {'args':>7} {'temps':>7} {'scores':>7} {'compile s':>9}")
    for n in (int(v) for v in args.meshes.split(",")):
        row = measure(args.config, n, args.override, args.timeout)
        rows.append(row)
        if "error" in row:
            print(f"{n:>8} error: {row['error']}")
        else:
            print(
                f"{n:>8} {row['peak_gib']:9.2f} {row['argument_gib']:7.2f} {row['temp_gib']:7.2f} "
                f"{row['scores_gib']:7.2f} {row['compile_seconds']:9.1f}"
            )
        Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out).write_text(json.dumps({**meta, "meshes": rows}, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
