"""The exported folder's command line (``python DIR/generate.py``): one prompt to one video file.

    python DIR/generate.py --prompt "a 3 moves left" --seed 0 --out a.mp4 [--steps N] [--guidance_scale S]
        [--image first_frame.png] [--video clip.mp4] [--negative_prompt "..."] [--device cpu|cuda]

Writes MP4 / GIF with PyAV or imageio when installed, else the frames as ``.npy``; the frames are upscaled
(nearest neighbour, shorter side >= 128) and carry the invisible watermark of ``watermark.json`` (the payload
``sora-jax sample`` puts in this checkpoint's videos; ``sora_torch/watermark.py``, ``sora-jax detect`` reads
it). A prompt the safety policy refuses (``policy.json``) is one line and exit code 3.
"""

from __future__ import annotations

import argparse
import os
import sys

import numpy as np


def _read_frames(path: str) -> np.ndarray:
    """uint8 frames ``[T, H, W, 3]`` of an image (Pillow) or a video file (PyAV)."""
    if path.lower().endswith((".png", ".jpg", ".jpeg", ".bmp", ".webp")):
        from PIL import Image

        return np.asarray(Image.open(path).convert("RGB"))[None]
    import av

    with av.open(path) as f:
        return np.stack([fr.to_ndarray(format="rgb24") for fr in f.decode(video=0)])


def write_video(path: str, frames: np.ndarray, fps: float) -> str:
    """Writes uint8 ``[T, H, W, 3]`` to ``path`` (MP4 / GIF); returns the path written."""
    try:
        import imageio.v3 as iio

        iio.imwrite(path, frames, fps=fps) if path.endswith(".mp4") else iio.imwrite(
            path, frames, duration=1000 / fps, loop=0
        )
        return path
    except (ImportError, OSError, ValueError, TypeError):
        pass
    try:
        import av

        with av.open(path, "w") as out:
            stream = out.add_stream("libx264" if path.endswith(".mp4") else "gif", rate=int(round(fps)))
            stream.width, stream.height = frames.shape[2], frames.shape[1]
            stream.pix_fmt = "yuv420p" if path.endswith(".mp4") else "rgb8"
            for frame in frames:
                for packet in stream.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")):
                    out.mux(packet)
            for packet in stream.encode():
                out.mux(packet)
        return path
    except ImportError:
        np.save(path + ".npy", frames)
        return path + ".npy"


def mark(folder: str, video: np.ndarray) -> np.ndarray:
    """uint8 ``[T, H, W, 3]`` -> upscaled to a shorter side >= 128 (nearest neighbour, as sora_jax writes
    videos) with the watermark of ``<folder>/watermark.json`` when it is enabled."""
    import json

    from . import watermark as wm

    scale = max(1, -(-128 // min(video.shape[1:3])))
    video = np.repeat(np.repeat(video, scale, axis=1), scale, axis=2)
    path = os.path.join(folder, "watermark.json")
    if not os.path.isfile(path):
        print(f"generate.py: warning: {path} is missing; the video is not watermarked", file=sys.stderr)
        return video
    with open(path) as f:
        conf = json.load(f)
    if not conf["enabled"]:
        return video
    bits = wm.payload_bits(conf["model_id"], conf["run_id"])
    return wm.embed(video, bits, wm.Watermark(strength=float(conf["strength"])))


def main(argv: list[str] | None = None, folder: str | None = None) -> int:
    folder = folder or os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    p = argparse.ArgumentParser(description="Generate a video with an exported sora_jax model (PyTorch).")
    p.add_argument("--prompt", required=True)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", required=True, help="video file: .mp4 or .gif")
    p.add_argument("--steps", type=int, default=None, help="sampling steps (default: the model's)")
    p.add_argument("--guidance_scale", type=float, default=None)
    p.add_argument("--negative_prompt", default=None)
    p.add_argument("--image", default=None, help="i2v: the first frame")
    p.add_argument("--video", default=None, help="extend: frames that lead the clip")
    p.add_argument("--device", default="cpu")
    args = p.parse_args(argv)

    import torch

    from .pipeline import SoraPipeline

    pipe = SoraPipeline.from_pretrained(folder).to(args.device)
    c = pipe.config
    given = {}
    if args.image or args.video:
        frames = _read_frames(args.image or args.video).astype(np.float32) / 255.0
        if frames.shape[1:3] != (c.height, c.width):
            raise SystemExit(
                f"generate.py: frames are {frames.shape[1:3]}, the model makes {c.height}x{c.width}"
            )
        given = {"image": frames[0]} if args.image else {"video": frames}
    from .pipeline import PromptRefused

    try:
        out = pipe(
            args.prompt,
            num_inference_steps=args.steps,
            guidance_scale=args.guidance_scale,
            negative_prompt=args.negative_prompt,
            generator=torch.Generator().manual_seed(args.seed),
            **given,
        )
    except PromptRefused as e:
        print(f"generate.py: error: {str(e).splitlines()[0]}", file=sys.stderr)
        return 3
    video = np.clip(np.round(out.frames[0] * 255.0), 0, 255).astype(np.uint8)
    print(write_video(args.out, mark(folder, video), float(c.fps)))
    return 0


if __name__ == "__main__":
    sys.exit(main())
