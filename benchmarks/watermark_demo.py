"""The watermark on the demo model's own videos: detection after edits, false positives on its unmarked videos
and on real clips, and what it does to prompt adherence. One table, one JSON (written by this script).

    python benchmarks/watermark_demo.py --workdir runs/demo --num 200 \
        --out benchmarks/results/watermark_demo.json

For ``--num`` test-split captions the model's videos (32x32, 8 frames) are written as ``sora-jax sample``
writes them (``safety.stamp.Stamp.write``: upscaled 4x to 128 px, or 8x to 256 px with ``--sizes``, watermark
with the run's payload, H.264 CRF 18) and again with the watermark off; real test clips of the dataset go
through the same writer unmarked. Each MP4 is decoded and edited as ``benchmarks/watermark.py`` edits
(H.264 CRF 23 / 28, half size, 10% crop, 8 -> 24 fps, first half, all combined), then detected. Adherence:
the decoded MP4s, shrunk back to 32x32 (mean of each 4x4 / 8x8 block), read by the digit reader; marked vs
unmarked is what the watermark costs.
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from tqdm.auto import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from benchmarks.watermark import TRANSFORMS  # noqa: E402
from sora_jax import api  # noqa: E402
from sora_jax.eval.adherence import evaluate_prompts  # noqa: E402
from sora_jax.eval.clips import sample_clips  # noqa: E402
from sora_jax.eval.evaluate import split_prompts  # noqa: E402
from sora_jax.safety.stamp import Stamp, inspect_video  # noqa: E402
from sora_jax.safety.watermark import Watermark, detect  # noqa: E402
from sora_jax.sample.video_io import read_video  # noqa: E402


def shrink(video: np.ndarray, k: int) -> np.ndarray:
    """uint8 [T, kH, kW, 3] -> [T, H, W, 3]: the mean of each k x k block, rounded."""
    t, h, w, c = video.shape
    v = video[:, : h - h % k, : w - w % k].reshape(t, h // k, k, w // k, k, c).astype(np.float32)
    return np.round(v.mean(axis=(2, 4))).astype(np.uint8)


def _through_writer(
    stamp: Stamp, video: np.ndarray, scale: int, fps: float, prompt: str, tmp: Path
) -> np.ndarray:
    path = stamp.write(tmp / "v.mp4", video, fps, prompt=prompt, seed=0, scale=scale)
    return read_video(path)


def run_size(pipe, stamp_on, stamp_off, videos, prompts, clips, scale: int, seed: int, tmp: Path) -> dict:
    fps = float(pipe.config.data.fps)
    wm = stamp_on.watermark
    sets = {"marked": [], "unmarked_generated": [], "unmarked_real": []}
    readback = {"marked": [], "unmarked_generated": []}
    for video, prompt in zip(tqdm(videos, desc=f"write x{scale}", leave=False), prompts):
        on = _through_writer(stamp_on, video, scale, fps, prompt, tmp)
        off = _through_writer(stamp_off, video, scale, fps, prompt, tmp)
        sets["marked"].append(on)
        sets["unmarked_generated"].append(off)
        readback["marked"].append(shrink(on, scale))
        readback["unmarked_generated"].append(shrink(off, scale))
    for clip in clips:
        sets["unmarked_real"].append(_through_writer(stamp_off, clip, scale, fps, "", tmp))
    adherence = {k: evaluate_prompts(np.stack(v), prompts)[0]["both_accuracy"] for k, v in readback.items()}
    adherence["arrays"] = evaluate_prompts(videos, prompts)[0]["both_accuracy"]
    results = {}
    for name, fn in tqdm(TRANSFORMS.items(), desc=f"edits x{scale}", leave=False):
        row = {}
        for label, vids in sets.items():
            dets = [detect(fn(v, np.random.default_rng([seed, i])), wm) for i, v in enumerate(vids)]
            row[label] = {
                "detected": [int(d.detected) for d in dets],
                "log10_p": [round(d.log10_p, 2) for d in dets],
            }
            if label == "marked":
                row[label]["bits_right"] = [int(np.sum(d.bits == stamp_on.bits)) for d in dets]
        results[name] = row
    psnr = [
        float(10 * np.log10(255**2 / max(np.mean((a.astype(np.float64) - b) ** 2), 1e-12)))
        for a, b in zip(
            (stamp_on.mark(np.repeat(np.repeat(v, scale, 1), scale, 2)) for v in videos[:32]),
            (np.repeat(np.repeat(v, scale, 1), scale, 2) for v in videos[:32]),
        )
    ]
    return {"size": 32 * scale, "adherence": adherence, "results": results, "psnr_db": psnr}


def table(runs: list[dict], n_bits: int) -> str:
    lines = [
        "| size | edit | TPR (marked demo videos) | bit accuracy | FPR generated unmarked | FPR real clips |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        for name, row in r["results"].items():
            m = row["marked"]
            lines.append(
                f"| {r['size']} | {name} | {np.mean(m['detected']):.3f} | "
                f"{np.mean(m['bits_right']) / n_bits:.3f} | {np.mean(row['unmarked_generated']['detected']):.3f} | "
                f"{np.mean(row['unmarked_real']['detected']):.3f} |"
            )
    lines += [
        "",
        "| size | adherence: arrays | unmarked MP4 | marked MP4 | change | PSNR dB (mean) |",
        "|---|---|---|---|---|---|",
    ]
    for r in runs:
        a = r["adherence"]
        lines.append(
            f"| {r['size']} | {a['arrays']:.4f} | {a['unmarked_generated']:.4f} | {a['marked']:.4f} | "
            f"{a['marked'] - a['unmarked_generated']:+.4f} | {np.mean(r['psnr_db']):.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--workdir", required=True, help="a trained digits workdir (the demo's: runs/demo)")
    p.add_argument("--num", type=int, default=200, help="test captions (and as many real test clips)")
    p.add_argument(
        "--sizes", type=int, nargs="+", default=[4, 8], help="upscaling factors of the 32 px videos"
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", default="benchmarks/results/watermark_demo.json")
    args = p.parse_args()
    t0 = time.time()
    pipe = api.load_pipeline(args.workdir)
    data = api.data_dir(args.workdir)
    prompts = split_prompts(data, "test", args.num, args.seed)
    videos = pipe.generate(prompts, seed=args.seed, progress=True)
    clips, _ = sample_clips(data, "test", args.num, args.seed + 1)
    stamp_on = Stamp.for_run(pipe.config, args.workdir, pipe.step)
    stamp_off = Stamp(None, None, False, None, stamp_on.facts)
    runs = []
    with tempfile.TemporaryDirectory() as tmp:
        for scale in args.sizes:
            runs.append(
                run_size(pipe, stamp_on, stamp_off, videos, prompts, clips, scale, args.seed, Path(tmp))
            )
        check = stamp_on.write(
            Path(tmp) / "check.mp4", videos[0], float(pipe.config.data.fps), prompt=prompts[0]
        )
        provenance_valid = inspect_video(check)["provenance"]["valid"]
    text = table(runs, Watermark().n_bits)
    print(text)
    out = {
        "command": " ".join(sys.argv),
        "workdir": str(args.workdir),
        "step": int(pipe.step),
        "num": len(prompts),
        "real_clips": len(clips),
        "payload": stamp_on.payload,
        "watermark": {"strength": stamp_on.watermark.strength, "tile": stamp_on.watermark.tile},
        "writer": "safety.stamp.Stamp.write: nearest-neighbour upscale, watermark, H.264 CRF 18 (PyAV)",
        "provenance_record_valid": bool(provenance_valid),
        "seconds": round(time.time() - t0, 1),
        "table": text,
        "runs": runs,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(out) + "\n")
    print(f"wrote {args.out}")


if __name__ == "__main__":
    main()
