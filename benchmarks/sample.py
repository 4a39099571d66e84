"""Sampling speed: seconds per video and videos per hour per device, for a config, step count and length.

    python benchmarks/sample.py --config configs/digits_small.py --steps 32 --batch 16
    python benchmarks/sample.py --config configs/quickstart.py --steps 32 8 --batch 1 8 --frames 8 32

The model is the config's, with freshly initialised parameters (speed does not depend on the weights), run
through the ``JitSampler`` that ``sora-jax sample`` uses (classifier-free guidance doubles each model call
unless the config's cfg_scale is 1). For each (frames, steps, batch) it times ``--repeats`` calls after one
warm-up (compile) call, and reports seconds per video, videos per hour per device, the analytic model FLOPs
per video (``sora_jax.models.dit.flops_per_token``) and the achieved TFLOP/s. ``--long_seconds 2 10 60``
also generates one long video of each length by autoregressive extension (``Prompter.long_video``, frames
streamed to a sink that drops them), each in a fresh process, and reports its time and the peak memory while
it generates (``PeakWhile``: resident-set high-water mark reset after a warm-up clip, device bytes polled),
which should stay flat with length. Prints a table and writes
``benchmarks/results/sample.json`` (or ``--out``).
"""

from __future__ import annotations

import argparse
import json
import platform
import time
from pathlib import Path

import jax
import numpy as np


def measure(cfg, *, frames: int, steps: int, batch: int, repeats: int) -> dict:
    from flax import nnx

    from sora_jax import factory
    from sora_jax.choices import Sampler
    from sora_jax.models.dit import flops_per_token
    from sora_jax.sample.sampler import JitSampler

    cfg = cfg.copy_and_resolve_references()
    cfg.data.num_frames = frames
    model = factory.make_model(cfg, cfg.seed)
    graphdef, params = nnx.split(model, nnx.Param)
    shape = factory.latent_shape(cfg)
    sampler = JitSampler(
        graphdef,
        params,
        factory.make_text_input(cfg),
        factory.make_process(cfg),
        shape,
        sampler=cfg.diffusion.sampler,
        num_steps=steps,
        cfg_scale=cfg.diffusion.cfg_scale,
    )
    prompts = [f"a {i % 10} moving left" for i in range(batch)]
    t0 = time.perf_counter()
    sampler.sample(prompts, seed=0)
    compile_s = time.perf_counter() - t0
    times = []
    for r in range(repeats):
        t0 = time.perf_counter()
        sampler.sample(prompts, seed=r + 1)
        times.append(time.perf_counter() - t0)
    sec = float(np.median(times))
    dit = factory.model_config(cfg)
    pt, ph, pw = dit.patch_size
    tokens = shape[0] // pt * (shape[1] // ph) * (shape[2] // pw)
    calls = steps * (1 if cfg.diffusion.cfg_scale == 1 else 2)
    if Sampler(cfg.diffusion.sampler) is Sampler.HEUN:
        calls = (2 * steps - 1) * calls // steps
    flops = flops_per_token(dit, tokens, cfg.text.max_length) * tokens * calls
    devices = 1  # JitSampler without a mesh runs on one device
    return {
        "frames": frames,
        "latent_shape": list(shape),
        "tokens": tokens,
        "steps": steps,
        "batch": batch,
        "compile_s": round(compile_s, 3),
        "seconds_per_batch": sec,
        "seconds_per_video": sec / batch,
        "videos_per_hour_per_device": 3600.0 * batch / sec / devices,
        "model_gflop_per_video": flops / 1e9,
        "achieved_tflops": flops * batch / sec / 1e12,
    }


class PeakWhile:
    """The peak memory of the work done inside ``with PeakWhile() as peak:``, measured while it runs: the
    kernel's resident-set high-water mark reset on entry (Linux ``/proc/self/clear_refs``), and a thread that
    polls the first device's ``bytes_in_use`` every 5 ms (where the backend reports it; not on CPU)."""

    def __enter__(self):
        import threading

        self.rss_reset = _reset_rss_peak()
        self.device_peak, self._stop = 0, threading.Event()
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        dev = jax.local_devices()[0]
        while not self._stop.is_set():
            stats = dev.memory_stats() or {}
            self.device_peak = max(self.device_peak, int(stats.get("bytes_in_use", 0)))
            self._stop.wait(0.005)

    def __exit__(self, *exc):
        self._stop.set()
        self._thread.join()
        self.rss_peak_mb = _rss_peak_kb() / 1024 if self.rss_reset else float("nan")
        self.device_peak_mb = self.device_peak / 2**20 if self.device_peak else None


def _reset_rss_peak() -> bool:
    try:
        Path("/proc/self/clear_refs").write_text("5")  # resets VmHWM to the current RSS
        return True
    except OSError:
        return False


def _rss_peak_kb() -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1])
    return 0


def measure_long(cfg, seconds: float, steps: int, overlap: int) -> dict:
    """One long video in this process: seconds of generation and the peak memory while generating (after a
    warm-up clip compiled the sampler, so the peak is the generation's own, not the compiler's)."""
    from flax import nnx

    from sora_jax import factory
    from sora_jax.sample.prompter import Prompter
    from sora_jax.sample.sampler import JitSampler

    model = factory.make_model(cfg, cfg.seed)
    graphdef, params = nnx.split(model, nnx.Param)
    sampler = JitSampler(
        graphdef,
        params,
        factory.make_text_input(cfg),
        factory.make_process(cfg),
        factory.latent_shape(cfg),
        sampler=cfg.diffusion.sampler,
        num_steps=steps,
        cfg_scale=cfg.diffusion.cfg_scale,
        autoencoder=factory.make_autoencoder(cfg),
    )
    d = cfg.data
    p = Prompter(sampler, d.num_frames, d.height, d.width, float(d.fps))
    p.long_video(
        ["a 3 moving left"], num_frames=2 * d.num_frames, overlap=overlap, sink=lambda f: None
    )  # compile
    frames = []
    t0 = time.perf_counter()
    with PeakWhile() as peak:
        _, segments = p.long_video(
            ["a 3 moving left"], seconds=seconds, overlap=overlap, sink=lambda f: frames.append(f.shape[1])
        )
    sec = time.perf_counter() - t0
    return {
        "long_seconds": seconds,
        "frames": int(sum(frames)),
        "segments": len(segments),
        "steps": steps,
        "seconds": sec,
        "peak_rss_mb": peak.rss_peak_mb,
        "peak_device_mb": peak.device_peak_mb,
        "peak_measured": "while generating: VmHWM reset after a warm-up clip; device bytes_in_use polled",
    }


def main(argv=None) -> None:
    from sora_jax.config import load_config

    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--config", default="configs/quickstart.py")
    p.add_argument("--frames", type=int, nargs="+", default=[0], help="clip frames (0: the config's)")
    p.add_argument("--steps", type=int, nargs="+", default=[32])
    p.add_argument("--batch", type=int, nargs="+", default=[1, 8])
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--override", nargs="*", default=[], help="config overrides key=value")
    p.add_argument("--out", default="benchmarks/results/sample.json")
    p.add_argument("--long_seconds", type=float, nargs="*", default=[], help="also time long videos")
    p.add_argument("--overlap", type=int, default=1)
    p.add_argument("--_long_child", type=float, default=None, help=argparse.SUPPRESS)
    args = p.parse_args(argv)
    cfg = load_config(args.config, args.override)
    if args._long_child is not None:  # one long video in a fresh process: its peak memory is its own
        print(json.dumps(measure_long(cfg, args._long_child, args.steps[0], args.overlap)))
        return
    rows = []
    for frames in args.frames:
        for steps in args.steps:
            for batch in args.batch:
                rows.append(
                    measure(
                        cfg,
                        frames=frames or cfg.data.num_frames,
                        steps=steps,
                        batch=batch,
                        repeats=args.repeats,
                    )
                )
                r = rows[-1]
                print(
                    f"frames {r['frames']:4d}  steps {steps:3d}  batch {batch:3d}  "
                    f"{r['seconds_per_video']:8.4f} s/video  {r['videos_per_hour_per_device']:10.0f} videos/h/device  "
                    f"{r['achieved_tflops']:7.3f} TFLOP/s  (compile {r['compile_s']:.1f} s)",
                    flush=True,
                )
    long_rows = []
    for sec in args.long_seconds:
        import subprocess
        import sys

        cmd = [sys.executable, __file__, "--config", args.config, "--steps", str(args.steps[0])]
        cmd += ["--overlap", str(args.overlap), "--_long_child", str(sec)]
        cmd += ["--override", *args.override] if args.override else []
        res = subprocess.run(cmd, capture_output=True, text=True, check=True)
        long_rows.append(json.loads(res.stdout.strip().splitlines()[-1]))
        r = long_rows[-1]
        print(
            f"long video {sec:6.1f} s: {r['frames']:5d} frames in {r['segments']:4d} segments, "
            f"{r['seconds']:8.2f} s, peak while generating: RSS {r['peak_rss_mb']:8.1f} MB, "
            f"device {r['peak_device_mb'] or float('nan'):8.1f} MB",
            flush=True,
        )
    result = {
        "config": args.config,
        "overrides": args.override,
        "device": str(jax.devices()[0].device_kind),
        "backend": jax.default_backend(),
        "host": platform.node(),
        "rows": rows,
        "long_videos": long_rows,
    }
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    tmp = out.with_suffix(".tmp")
    tmp.write_text(json.dumps(result, indent=1))
    tmp.replace(out)
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
