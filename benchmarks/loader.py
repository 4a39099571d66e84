"""Loader throughput: clips/s and MB/s per CPU worker for 256p and 512p clips, and the workers one accelerator needs.

    python benchmarks/loader.py                       # 256x256 and 512x512, 0 / 1 / 2 workers
    python benchmarks/loader.py --sizes 256 --workers 0 4 8 --step_time 0.5 --batch 64

It writes synthetic H.264 clip records (a textured pattern drifting across the frame plus grain, so the
codec has real work: ~``--source_seconds`` at 24 fps each) into an ArrayRecord shard -- the format
``sora-jax ingest`` produces -- and reads them through the real bucketed grain pipeline
(``sora_jax.data.buckets``: sample ``--frames`` frames at ``--fps``, decode only those, resize in FFmpeg, crop),
timing ``--batches`` batches after one warm-up batch. "MB/s" counts the decoded uint8 pixels handed to the
trainer (and, separately, the compressed bytes read). Workers needed = ceil(clips per step / step time /
clips per second per worker), for a DiT step time you give (``--step_time``, seconds; ``--batch``: clips per
step per accelerator). Prints a table and writes ``benchmarks/results/loader.json``.
"""

from __future__ import annotations

import argparse
import json
import math
import os
import platform
import tempfile
import time
from pathlib import Path

import numpy as np
from array_record.python.array_record_module import ArrayRecordWriter

from sora_jax.data import buckets as bk
from sora_jax.data.records import encode_encoded_clip
from sora_jax.data.video_codec import encode_mp4


def _synthetic(size: int, frames: int, seed: int) -> np.ndarray:
    """uint8 [frames, size, size, 3]: a smooth colour texture drifting 2 px/frame plus per-frame grain."""
    rng = np.random.default_rng(seed)
    big = size + 2 * frames
    coarse = rng.integers(0, 255, (big // 16 + 2, big // 16 + 2, 3)).astype(np.float32)
    tex = np.kron(coarse, np.ones((16, 16, 1), np.float32))[:big, :big]
    for axis in (0, 1):  # soften the blocks
        tex = (tex + np.roll(tex, 8, axis) + np.roll(tex, -8, axis)) / 3
    out = np.empty((frames, size, size, 3), np.uint8)
    for t in range(frames):
        frame = tex[2 * t : 2 * t + size, t : t + size] + rng.normal(0, 6, (size, size, 3))
        out[t] = frame.clip(0, 255)
    return out


def _write(path: Path, size: int, clips: int, frames: int) -> tuple[np.ndarray, int]:
    writer = ArrayRecordWriter(str(path), "group_size:1")
    payload_bytes = 0
    for i in range(clips):
        payload = encode_mp4(_synthetic(size, frames, i), 24.0)
        payload_bytes += len(payload)
        writer.write(encode_encoded_clip(payload, shape=(frames, size, size), fps=24.0, caption=f"clip {i}"))
    writer.close()
    return np.tile(np.asarray([[frames, size, size, 24.0]], np.float32), (clips, 1)), payload_bytes


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sizes", type=int, nargs="+", default=[256, 512])
    p.add_argument("--workers", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--frames", type=int, default=16, help="frames per training clip")
    p.add_argument("--fps", type=float, default=8.0, help="training fps (sources are 24 fps: stride 3)")
    p.add_argument("--source_seconds", type=float, default=4.0)
    p.add_argument("--clips", type=int, default=16, help="distinct clips written per size")
    p.add_argument("--batch_clips", type=int, default=4, help="clips per loader batch")
    p.add_argument("--batches", type=int, default=8, help="batches timed per setting")
    p.add_argument("--step_time", type=float, default=1.0, help="DiT step time, s (for workers needed)")
    p.add_argument(
        "--batch", type=int, default=32, help="clips per step per accelerator (for workers needed)"
    )
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()

    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        for size in args.sizes:
            src_frames = int(round(args.source_seconds * 24))
            shard = Path(tmp) / f"clips{size}.array_record"
            t0 = time.perf_counter()
            index, payload_bytes = _write(shard, size, args.clips, src_frames)
            print(
                f"{size}p: wrote {args.clips} clips of {src_frames} frames in {time.perf_counter() - t0:.1f} s"
            )
            from grain.sources import ArrayRecordDataSource

            source = ArrayRecordDataSource([str(shard)])
            plan = bk.BucketPlan(
                index,
                [bk.Bucket(args.frames, size, size)],
                token_budget=0,
                tokens_fn=lambda b: 1,
                default_batch=args.batch_clips,
                target_fps=args.fps,
            )
            for workers in args.workers:
                it = iter(bk.make_bucketed_dataset(source, plan, num_workers=workers))
                next(it)  # warm-up (starts the workers)
                t0 = time.perf_counter()
                for _ in range(args.batches):
                    batch = next(it)
                dt = time.perf_counter() - t0
                clips_s = args.batches * args.batch_clips / dt
                out_mb = clips_s * batch["video"][0].nbytes / 1e6
                in_mb = clips_s * payload_bytes / args.clips / 1e6
                per_worker = clips_s / max(1, workers)
                need = math.ceil(args.batch / args.step_time / per_worker)
                rows.append(
                    {
                        "size": size,
                        "workers": workers,
                        "clips_per_s": clips_s,
                        "clips_per_s_per_worker": per_worker,
                        "decoded_MB_per_s": out_mb,
                        "compressed_MB_per_s": in_mb,
                        "workers_needed": need,
                    }
                )
                del it
    head = (
        f"{'size':>5} {'workers':>7} {'clips/s':>8} {'/worker':>8} {'MB/s out':>9} {'MB/s in':>8} {'need':>5}"
    )
    print(
        f"\nclip: {args.frames} frames at {args.fps} fps from 24 fps sources; need: workers for {args.batch} "
        f"clips per {args.step_time} s step"
    )
    print(head)
    for r in rows:
        print(
            f"{r['size']:>5} {r['workers']:>7} {r['clips_per_s']:>8.2f} {r['clips_per_s_per_worker']:>8.2f} "
            f"{r['decoded_MB_per_s']:>9.1f} {r['compressed_MB_per_s']:>8.2f} {r['workers_needed']:>5}"
        )
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "args": vars(args),
        "rows": rows,
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / "loader.json"
    tmp_path = path.with_name(path.name + ".tmp")
    tmp_path.write_text(json.dumps(result, indent=1))
    os.replace(tmp_path, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
