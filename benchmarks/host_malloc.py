"""What the host's C allocator costs a CPU train step: glibc's malloc as it comes against malloc advising
transparent huge pages (``sora_jax.host_malloc``, what ``sora-jax`` runs under), interleaved in fresh processes.

    python benchmarks/host_malloc.py                       # the demo's step (configs/quickstart.py), 3 pairs
    python benchmarks/host_malloc.py --pairs 1 --steps 20 --config configs/quickstart.py:smoke

Each process compiles the config's train step (the trainer's own ``build_train_fns``, a random batch of the
data's shapes), runs ``--warmup`` steps, then times ``--steps`` more and reads its own resource usage around
them: wall milliseconds per step, minor page faults, kernel and user CPU milliseconds per step, and the peak
resident memory of the whole process. The two settings alternate (default first) so that a machine's drift
hits both. Prints a table and writes ``benchmarks/results/host_malloc.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

SETTINGS = ("default", "huge_pages")


def compiled_step(config: str, overrides: list[str]):
    """The config's train step as the trainer builds it (``build_train_fns``), compiled for one device, with
    its initial state, a random batch of the data's shapes and the frozen inputs: ``(step, state, batch,
    frozen)``, ``step(state, batch, frozen) -> (state, metrics)``."""
    import jax
    import jax.numpy as jnp
    import numpy as np

    from sora_jax import loading
    from sora_jax.config import load_config
    from sora_jax.parallel import mesh as mesh_lib
    from sora_jax.train import data as data_lib
    from sora_jax.train import loop

    cfg = loading.resolve_autoencoder(load_config(config, overrides))
    mesh = mesh_lib.make_mesh(cfg.mesh, jax.devices()[:1])
    fns = loop.build_train_fns(cfg, mesh, shapes_only=True)
    spec = data_lib.abstract_batch(cfg, mesh)
    rng = np.random.default_rng(0)

    def host(v: jax.ShapeDtypeStruct) -> np.ndarray:
        if v.dtype == jnp.uint8:
            return rng.integers(0, 255, v.shape).astype(v.dtype)
        if jnp.issubdtype(v.dtype, jnp.floating):
            return rng.standard_normal(v.shape).astype(v.dtype)
        return np.ones(v.shape, v.dtype)

    batch = {k: jax.device_put(host(v), v.sharding) for k, v in spec.items()}
    step = fns.step.lower(fns.abstract_state, spec, fns.frozen).compile()
    return step, fns.init(), batch, fns.frozen


def measure(config: str, overrides: list[str], warmup: int, steps: int) -> dict:
    """One process's numbers for the compiled train step of ``config`` (see the module docstring)."""
    import jax

    step, state, batch, frozen = compiled_step(config, overrides)
    for _ in range(warmup):
        state, metrics = step(state, batch, frozen)
    jax.block_until_ready(metrics)
    r0, t0 = resource.getrusage(resource.RUSAGE_SELF), time.perf_counter()
    for _ in range(steps):
        state, metrics = step(state, batch, frozen)
    jax.block_until_ready(metrics)
    wall, r1 = time.perf_counter() - t0, resource.getrusage(resource.RUSAGE_SELF)
    return {
        "glibc_tunables": os.environ.get("GLIBC_TUNABLES", ""),
        "ms_per_step": 1000 * wall / steps,
        "minor_faults_per_step": (r1.ru_minflt - r0.ru_minflt) / steps,
        "kernel_ms_per_step": 1000 * (r1.ru_stime - r0.ru_stime) / steps,
        "user_ms_per_step": 1000 * (r1.ru_utime - r0.ru_utime) / steps,
        "peak_rss_mib": r1.ru_maxrss / 1024,  # Linux: KiB; the process's peak while it ran
        "loss": float(metrics["loss"]),
    }


def write_json(result: dict, path: str) -> None:
    """``result`` as indented JSON at ``path`` (its folder made), and a line saying so."""
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(result, indent=1) + "\n")
    print(f"wrote {out}")


def child_env(setting: str) -> dict[str, str]:
    from sora_jax import host_malloc

    env = {k: v for k, v in os.environ.items() if k != "GLIBC_TUNABLES"} | {host_malloc.OPT_OUT: "default"}
    if setting == "huge_pages":
        env["GLIBC_TUNABLES"] = host_malloc.TUNABLE
    return env


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/quickstart.py")
    p.add_argument("--override", nargs="*", default=[], help="config overrides key=value")
    p.add_argument("--pairs", type=int, default=3, help="processes per setting, alternating")
    p.add_argument("--warmup", type=int, default=5)
    p.add_argument("--steps", type=int, default=100)
    p.add_argument("--out", default="benchmarks/results/host_malloc.json")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    if min(args.pairs, args.steps) < 1 or args.warmup < 1:
        print("host_malloc: --pairs, --steps and --warmup must be positive", file=sys.stderr)
        return 2
    if args.child:
        print(json.dumps(measure(args.config, args.override, args.warmup, args.steps)))
        return 0
    from sora_jax import host_malloc

    cmd = [sys.executable, __file__, "--child", "--config", args.config, "--warmup", str(args.warmup)]
    cmd += ["--steps", str(args.steps), "--override", *args.override]
    runs = []
    for i in range(args.pairs):
        for setting in SETTINGS:
            print(f"pair {i + 1}/{args.pairs}: {setting} ...", file=sys.stderr, flush=True)
            done = subprocess.run(cmd, env=child_env(setting), capture_output=True, text=True, check=False)
            if done.returncode:
                sys.stderr.write(done.stderr)
                print(f"host_malloc: the {setting} process failed (exit {done.returncode})", file=sys.stderr)
                return 1
            runs.append({"setting": setting, "pair": i} | json.loads(done.stdout.strip().splitlines()[-1]))
    keys = ("ms_per_step", "minor_faults_per_step", "kernel_ms_per_step", "user_ms_per_step", "peak_rss_mib")
    mean = {s: {k: sum(r[k] for r in runs if r["setting"] == s) / args.pairs for k in keys} for s in SETTINGS}
    result = {
        "date": time.strftime("%Y-%m-%d"),
        "config": args.config,
        "overrides": args.override,
        "steps": args.steps,
        "pairs": args.pairs,
        "cpus": os.cpu_count(),
        "thp_mode": host_malloc.thp_mode(),
        "glibc": ".".join(map(str, host_malloc.glibc_version() or ())),
        "runs": runs,
        "mean": mean,
        "speedup": mean["default"]["ms_per_step"] / mean["huge_pages"]["ms_per_step"],
        "faster_in_pairs": sum(
            a["ms_per_step"] > b["ms_per_step"] for a, b in zip(runs[::2], runs[1::2], strict=True)
        ),
    }
    print(
        f"{'':12s} {'ms/step':>8s} {'faults/step':>12s} {'kernel ms':>10s} {'user ms':>8s} {'peak MiB':>9s}"
    )
    for s in SETTINGS:
        m = mean[s]
        print(
            f"{s:12s} {m['ms_per_step']:8.1f} {m['minor_faults_per_step']:12.0f} {m['kernel_ms_per_step']:10.1f} "
            f"{m['user_ms_per_step']:8.1f} {m['peak_rss_mib']:9.0f}"
        )
    print(
        f"huge pages: {result['speedup']:.3f}x the steps per second, faster in "
        f"{result['faster_in_pairs']} of {args.pairs} pairs (THP mode {result['thp_mode']!r}, glibc {result['glibc']})"
    )
    write_json(result, args.out)
    return 0


if __name__ == "__main__":
    sys.exit(main())
