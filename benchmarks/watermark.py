"""Watermark robustness: detection rate, false-positive rate, payload bit accuracy and PSNR after edits.

    python benchmarks/watermark.py                    # 200 marked + 200 unmarked videos, demo size and 256
    python benchmarks/watermark.py --num 8            # quick run

Content (synthetic, deterministic, since no real or generated videos are available here; the integrator adds
real demo videos later): 16 frames at 8 fps of four kinds in turn -- sklearn 8x8 digits, scaled and moving,
over a drifting smooth colour texture; the same over a 1/f ("natural-ish") texture with film grain; a smooth
colour gradient with a moving soft blob and light noise; a 1/f texture panning and zooming slowly. "demo":
the demo's format, 32x32 content upscaled 4x by nearest neighbour to 128x128 and marked at 128x128; "256":
content rendered at 256x256. Each video gets a random 32-bit payload (``--seed``).

Transforms, applied to the marked and the unmarked copy alike: H.264 CRF 23 and CRF 28 (libx264 through
PyAV, yuv420p, preset medium, encoded to MP4 in memory and decoded back to RGB), resize to half (PIL
bilinear, antialiased), a 10% crop (keep int(0.9 H) x int(0.9 W) at a random offset, not resized back),
8 -> 24 fps (each frame 3x), trim to the first half of the frames, and all combined (24 fps, trim, crop,
half size, cut to even sizes, H.264 CRF 28). TPR: marked videos detected (p < threshold); FPR: unmarked ones
detected; bit accuracy: mean fraction of payload bits decoded right on marked videos (all of them, detected
or not); score: the detector's statistic (``Detection.score``). Prints a markdown table and writes ``--out``
(JSON: settings, command, time, per-video raw results).
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
import time
from pathlib import Path

import numpy as np
from PIL import Image
from sklearn.datasets import load_digits
from tqdm import tqdm

from sora_jax.data.video_codec import decode_frames, encode_mp4
from sora_jax.safety import watermark as wmk

FRAMES, FPS = 16, 8.0
CONTENT = [
    "digits over a drifting smooth colour texture",
    "digits over a 1/f texture with film grain",
    "smooth colour gradient with a moving soft blob and light noise",
    "1/f texture panning and zooming",
]


def _one_over_f(rng: np.random.Generator, size: int, alpha: float = 1.0) -> np.ndarray:
    """float [size, size, 3] in [0, 1]: colour noise with a 1/f^alpha amplitude spectrum."""
    f = np.hypot(*np.meshgrid(np.fft.fftfreq(size), np.fft.fftfreq(size), indexing="ij"))
    amp = 1 / np.maximum(f, 1 / size) ** alpha
    out = np.stack(
        [np.fft.ifft2(amp * np.exp(2j * np.pi * rng.random((size, size)))).real for _ in range(3)], -1
    )
    out = (out - out.mean()) / (out.std() + 1e-9)
    return np.clip(0.5 + 0.18 * out, 0, 1)


def _smooth(rng: np.random.Generator, size: int) -> np.ndarray:
    return _one_over_f(rng, size, alpha=2.0)


def synth_video(index: int, size: int) -> np.ndarray:
    """uint8 [16, size, size, 3]: content kind ``index % 4`` (see CONTENT), seeded by ``index``."""
    rng = np.random.default_rng(1000 + index)
    kind = index % 4
    t = np.arange(FRAMES)
    yy, xx = np.mgrid[0:size, 0:size] / size
    if kind in (0, 1):
        big = 2 * size
        tex = _smooth(rng, big) if kind == 0 else _one_over_f(rng, big)
        vy, vx = rng.uniform(-1.5, 1.5, 2) * size / 64
        frames = np.stack([np.roll(tex, (int(vy * k), int(vx * k)), (0, 1))[:size, :size] for k in t]).astype(
            np.float32
        )
        digits = load_digits().images
        for _ in range(rng.integers(2, 5)):
            img = digits[rng.integers(len(digits))] / 16.0
            cell = max(1, int(size * rng.uniform(0.25, 0.5)) // 8)
            glyph = np.kron(img, np.ones((cell, cell)))
            g = glyph.shape[0]
            colour = rng.uniform(0, 1, 3)
            p0, v = rng.uniform(0, size - g, 2), rng.uniform(-2, 2, 2) * size / 64
            for k in t:
                y, x = (np.clip(p0 + v * k, 0, size - g)).astype(int)
                patch = frames[k, y : y + g, x : x + g]
                patch[:] = patch * (1 - glyph[..., None]) + colour * glyph[..., None]
        if kind == 1:
            frames += rng.normal(0, 0.02, frames.shape)
    elif kind == 2:
        c0, c1 = rng.uniform(0, 1, 3), rng.uniform(0, 1, 3)
        ang = rng.uniform(0, 2 * np.pi)
        ramp = (np.cos(ang) * yy + np.sin(ang) * xx)[..., None]
        ramp = (ramp - ramp.min()) / (np.ptp(ramp) + 1e-9)
        base = c0 * (1 - ramp) + c1 * ramp
        colour, p0, v = rng.uniform(0, 1, 3), rng.uniform(0.2, 0.8, 2), rng.uniform(-0.02, 0.02, 2)
        frames = []
        for k in t:
            cy, cx = p0 + v * k
            blob = np.exp(-((yy - cy) ** 2 + (xx - cx) ** 2) / 0.02)[..., None]
            frames.append(base * (1 - blob) + colour * blob + rng.normal(0, 0.01, base.shape))
        frames = np.stack(frames)
    else:
        tex = _one_over_f(rng, 2 * size, alpha=1.2)
        frames = []
        for k in t:
            zoom = 1 + 0.01 * k
            n = int(size * zoom)
            y0, x0 = int(k * size / 64), int(k * size / 48)
            crop = tex[y0 : y0 + n, x0 : x0 + n]
            idx = (np.arange(size) * crop.shape[0] / size).astype(int)
            frames.append(crop[idx][:, idx])
        frames = np.stack(frames)
    return (np.clip(frames, 0, 1) * 255).round().astype(np.uint8)


def content_video(index: int, size: str) -> np.ndarray:
    """uint8 [16, S, S, 3] for size "demo" (32x32 upscaled 4x nearest -> 128) or a pixel size like "256"."""
    if size == "demo":
        return synth_video(index, 32).repeat(4, 1).repeat(4, 2)
    return synth_video(index, int(size))


def _h264(video: np.ndarray, crf: int, fps: float = FPS) -> np.ndarray:
    h, w = (video.shape[1] // 2) * 2, (video.shape[2] // 2) * 2
    video = np.ascontiguousarray(video[:, :h, :w])
    return decode_frames(encode_mp4(video, fps, crf=crf, preset="medium"))


def _half(video: np.ndarray) -> np.ndarray:
    h, w = video.shape[1] // 2, video.shape[2] // 2
    return np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.BILINEAR)) for f in video])


def _crop(video: np.ndarray, rng: np.random.Generator) -> np.ndarray:
    h, w = int(0.9 * video.shape[1]), int(0.9 * video.shape[2])
    y, x = rng.integers(0, video.shape[1] - h + 1), rng.integers(0, video.shape[2] - w + 1)
    return video[:, y : y + h, x : x + w]


def _fps24(video: np.ndarray) -> np.ndarray:
    return video.repeat(3, 0)


def _trim(video: np.ndarray) -> np.ndarray:
    return video[: max(1, len(video) // 2)]


TRANSFORMS = {
    "none": lambda v, rng: v,
    "h264_crf23": lambda v, rng: _h264(v, 23),
    "h264_crf28": lambda v, rng: _h264(v, 28),
    "resize_half": lambda v, rng: _half(v),
    "crop_10pct": _crop,
    "fps_8_to_24": lambda v, rng: _fps24(v),
    "trim_half": lambda v, rng: _trim(v),
    "combined": lambda v, rng: _h264(_half(_crop(_trim(_fps24(v)), rng)), 28, fps=3 * FPS),
}


def psnr(a: np.ndarray, b: np.ndarray) -> float:
    mse = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2)
    return float(10 * np.log10(255**2 / max(mse, 1e-12)))


def run_size(size: str, num: int, wm: wmk.Watermark, seed: int) -> dict:
    """Raw results for one size, one list entry per video: content kind, payload, PSNR, and per transform and
    copy (marked / unmarked) the decision, score, log10 p-value, scale found and (marked) payload bits right."""
    raw = {"kind": [], "payload": [], "psnr": [], "results": {}}
    for name in TRANSFORMS:
        raw["results"][name] = {
            "marked": {"detected": [], "score": [], "log10_p": [], "scale": [], "bits_right": []},
            "unmarked": {"detected": [], "score": [], "log10_p": [], "scale": []},
        }
    times = {"embed": 0.0, "detect": 0.0, "n_detect": 0}
    for i in tqdm(range(num), desc=f"size {size}", leave=False):
        rng = np.random.default_rng([seed, i])
        bits = rng.integers(0, 2, wm.n_bits).astype(np.uint8)
        clean = content_video(i, size)
        t0 = time.perf_counter()
        marked = wmk.embed(clean, bits, wm)
        times["embed"] += time.perf_counter() - t0
        raw["kind"].append(i % 4)
        raw["payload"].append(wmk.bits_to_hex(bits))
        raw["psnr"].append(round(psnr(marked, clean), 2))
        for name, fn in TRANSFORMS.items():
            crop_seed = rng.integers(1 << 31)
            for label, video in (("marked", marked), ("unmarked", clean)):
                edited = fn(video, np.random.default_rng(crop_seed))
                t0 = time.perf_counter()
                det = wmk.detect(edited, wm)
                times["detect"] += time.perf_counter() - t0
                times["n_detect"] += 1
                out = raw["results"][name][label]
                out["detected"].append(int(det.detected))
                out["score"].append(round(det.score, 1))
                out["log10_p"].append(round(det.log10_p, 2))
                out["scale"].append(det.scale)
                if label == "marked":
                    out["bits_right"].append(int(np.sum(det.bits == bits)))
    raw["embed_s_per_video"] = times["embed"] / num
    raw["detect_s"] = times["detect"] / times["n_detect"]
    return raw


def summarise(size: str, raw: dict, n_bits: int) -> list[dict]:
    out = []
    for name in TRANSFORMS:
        m, u = raw["results"][name]["marked"], raw["results"][name]["unmarked"]
        out.append(
            {
                "size": size,
                "transform": name,
                "tpr": float(np.mean(m["detected"])),
                "fpr": float(np.mean(u["detected"])),
                "bit_acc": float(np.mean(m["bits_right"]) / n_bits),
                "min_score_marked": float(np.min(m["score"])),
                "max_score_unmarked": float(np.max(u["score"])),
                "frac_p_below_0.1_unmarked": float(np.mean(np.asarray(u["log10_p"]) < -1)),
                "psnr_mean": float(np.mean(raw["psnr"])),
                "psnr_min": float(np.min(raw["psnr"])),
            }
        )
    return out


def _score_at(p: float) -> float:
    """The score (Fisher chi^2_4) whose p-value is p."""
    lo, hi = 0.0, 1e4
    for _ in range(100):
        mid = (lo + hi) / 2
        lo, hi = (mid, hi) if wmk._log_chi2_sf(mid, 4) > np.log(p) else (lo, mid)
    return lo


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--num", type=int, default=200, help="marked videos (and as many unmarked) per size")
    p.add_argument(
        "--sizes", nargs="+", default=["demo", "256"], help='"demo" (32 -> 128 upscaled) or pixels'
    )
    p.add_argument("--strength", type=float, default=wmk.Watermark().strength)
    p.add_argument("--tile", type=int, default=wmk.Watermark().tile)
    p.add_argument("--sync_fraction", type=float, default=wmk.Watermark().sync_fraction)
    p.add_argument("--threshold", type=float, default=wmk.Watermark().threshold)
    p.add_argument("--seed", type=int, default=0, help="payloads and crop offsets")
    p.add_argument("--out", default=str(Path(__file__).parent / "results" / "watermark.json"))
    args = p.parse_args()

    wm = wmk.Watermark(
        strength=args.strength, threshold=args.threshold, tile=args.tile, sync_fraction=args.sync_fraction
    )
    t_start = time.time()
    raw, table = {}, []
    for size in args.sizes:
        raw[size] = run_size(size, args.num, wm, args.seed)
        table += summarise(size, raw[size], wm.n_bits)

    print(
        f"\nwatermark: {args.num} marked + {args.num} unmarked videos per size, threshold p < {wm.threshold:g}\n"
    )
    print(
        "| size | transform | TPR | FPR | bit acc | min score marked | max score unmarked | PSNR dB (mean/min) |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for r in table:
        print(
            f"| {r['size']} | {r['transform']} | {r['tpr']:.3f} | {r['fpr']:.3f} | {r['bit_acc']:.3f} | "
            f"{r['min_score_marked']:.1f} | {r['max_score_unmarked']:.1f} | "
            f"{r['psnr_mean']:.1f} / {r['psnr_min']:.1f} |"
        )
    for size in args.sizes:
        print(
            f"{size}: embed {raw[size]['embed_s_per_video'] * 1e3:.0f} ms/video, "
            f"detect {raw[size]['detect_s'] * 1e3:.0f} ms/video (mean over all transforms)"
        )
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    settings = {k: list(v) if isinstance(v, tuple) else v for k, v in vars(wm).items()}
    result = {
        "command": " ".join([Path(sys.executable).name, *sys.argv]),
        "time_utc": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t_start)),
        "wall_s": time.time() - t_start,
        "host": platform.node(),
        "settings": {**vars(args), "watermark": settings, "frames": FRAMES, "fps": FPS},
        "content": CONTENT,
        "content_note": "synthetic, deterministic (benchmarks/watermark.py synth_video); no real or generated videos",
        "summary": table,
        "raw": raw,
    }
    out.write_text(json.dumps(result, separators=(",", ":")))
    print(f"wrote {out}")


if __name__ == "__main__":
    main()
