"""Data preparation speed: moving-digits generation rate, and how long a rerun over a finished dataset takes
(``moving_digits.build`` and ``sora-jax ingest`` only check what is there and rewrite nothing).

    python benchmarks/data_prep.py                    # 2000 clips, 3 repeats
    python benchmarks/data_prep.py --clips 6000 --repeats 5

These numbers were once wall-clock asserts inside tests (generate 2000 clips < 6 s, build rerun < 0.5 s, ingest
rerun < 3 s); the tests now check only what the code does, and the times live here, each the median of
``--repeats`` runs next to that old limit. Prints a table and writes ``benchmarks/results/data_prep.json``.
"""

from __future__ import annotations

import argparse
import contextlib
import io
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import numpy as np

from data_pipelines import ingest
from data_pipelines import moving_digits as md

# clip_seconds / min_frames / max_short_side as tests/test_ingest.py
INGEST_OPTS = ["--clip_seconds", "1.0", "--min_frames", "8", "--max_short_side", "32", "--no_progress"]


def _median_s(fn, repeats: int) -> float:
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def _write_video(path: Path, frames: np.ndarray, fps: int) -> None:
    import av

    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=fps)
        s.width, s.height, s.pix_fmt = frames.shape[2], frames.shape[1], "yuv420p"
        for f in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(f, format="rgb24")))
        c.mux(s.encode())


def _videos(folder: Path, count: int) -> Path:
    """``count`` 2-second 32x48 videos (a drifting ramp) and a captions CSV naming them."""
    y, x = np.mgrid[0:32, 0:48]
    lines = ["video,caption"]
    for i in range(count):
        frames = np.stack([(x * 5 + y * 3 + 7 * t + 20 * i) % 256 for t in range(48)]).astype(np.uint8)
        _write_video(folder / f"v{i}.mp4", np.repeat(frames[..., None], 3, axis=-1), 24)
        lines.append(f"v{i}.mp4,clip {i}")
    (folder / "captions.csv").write_text("\n".join(lines) + "\n")
    return folder / "captions.csv"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--clips", type=int, default=2000, help="clips generated per timed run (8x32x32)")
    p.add_argument("--videos", type=int, default=8, help="source videos ingested")
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--out", default=str(Path(__file__).parent / "results"))
    args = p.parse_args()

    rows = []
    gen_s = _median_s(lambda: md.generate("train", args.clips, seed=0), args.repeats)
    rows.append({"what": f"moving_digits.generate, {args.clips} clips", "seconds": gen_s, "old_limit_s": 6.0,
                 "clips_per_s": args.clips / gen_s})  # fmt: skip
    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        build = dict(num_train=24, num_test=8, num_frames=4, height=16, width=16, fps=4, seed=3, num_shards=3)
        t0 = time.perf_counter()
        md.build(tmp / "digits", progress=False, **build)
        rows.append(
            {"what": "moving_digits.build, 32 clips (first run)", "seconds": time.perf_counter() - t0}
        )
        rerun_s = _median_s(lambda: md.build(tmp / "digits", progress=False, **build), args.repeats)
        rows.append(
            {"what": "moving_digits.build rerun (nothing to do)", "seconds": rerun_s, "old_limit_s": 0.5}
        )

        src = tmp / "videos"
        src.mkdir()
        captions = _videos(src, args.videos)
        argv = ["--videos", str(src), "--captions", str(captions), "--out", str(tmp / "ds"), *INGEST_OPTS]
        argv += ["--videos_per_unit", "3", "--workers", "1"]
        quiet = contextlib.redirect_stdout(io.StringIO())
        t0 = time.perf_counter()
        with quiet:
            assert ingest.main(argv) == 0
        rows.append(
            {"what": f"ingest, {args.videos} videos (first run)", "seconds": time.perf_counter() - t0}
        )

        def rerun():
            with contextlib.redirect_stdout(io.StringIO()):
                assert ingest.main(argv) == 0

        rows.append({"what": "ingest rerun (nothing to do)", "seconds": _median_s(rerun, args.repeats),
                     "old_limit_s": 3.0})  # fmt: skip

    print(f"\n{'what':<46} {'seconds':>8} {'old limit':>9}")
    for r in rows:
        limit = f"{r['old_limit_s']:.1f}" if "old_limit_s" in r else "-"
        print(f"{r['what']:<46} {r['seconds']:>8.3f} {limit:>9}")
    print(f"generation: {rows[0]['clips_per_s']:.0f} clips/s")
    result = {
        "machine": {"platform": platform.platform(), "cpus": os.cpu_count()},
        "args": vars(args),
        "rows": rows,
    }
    Path(args.out).mkdir(parents=True, exist_ok=True)
    path = Path(args.out) / "data_prep.json"
    tmp_path = path.with_name(path.name + ".tmp")
    tmp_path.write_text(json.dumps(result, indent=1))
    os.replace(tmp_path, path)
    print(f"wrote {path}")


if __name__ == "__main__":
    main()
