"""Writes a sampling run to a folder: one MP4 and one GIF per prompt, prompts.json, a contact-sheet PNG."""

from __future__ import annotations

import json
import os
import re
from pathlib import Path

import numpy as np

from sora_jax.sample.video_io import contact_sheet, save_video


def _slug(text: str, limit: int = 40) -> str:
    return re.sub(r"[^a-z0-9]+", "_", text.lower()).strip("_")[:limit] or "video"


def write_samples(
    out_dir: str | os.PathLike, videos: np.ndarray, prompts: list[str], *, fps: float, write=None
) -> dict:
    """videos uint8 [B, T, H, W, 3] with one prompt each -> {"mp4": [...], "gif": [...], "contact_sheet": path}.

    ``write(path, video, fps, prompt=)`` writes each MP4 and GIF (default ``video_io.save_video``; the CLI
    passes ``safety.stamp.Stamp.write``: watermark and provenance)."""
    if write is None:
        write = lambda path, video, fps, prompt: save_video(path, video, fps)  # noqa: E731
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    mp4s, gifs, index = [], [], []
    for i, (video, prompt) in enumerate(zip(videos, prompts)):
        stem = f"{i:03d}_{_slug(prompt)}"
        mp4s.append(write(out / f"{stem}.mp4", video, fps, prompt=prompt))
        gifs.append(write(out / f"{stem}.gif", video, fps, prompt=prompt))
        index.append({"prompt": prompt, "mp4": mp4s[-1].name, "gif": gifs[-1].name})
    sheet = out / "contact_sheet.png"
    contact_sheet(videos, list(prompts), sheet)
    tmp = out / "prompts.json.tmp"
    tmp.write_text(json.dumps(index, indent=2))
    os.replace(tmp, out / "prompts.json")
    return {"mp4": mp4s, "gif": gifs, "contact_sheet": sheet}
