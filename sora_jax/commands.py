"""What the ``sora-jax`` commands do, as library functions: the CLI parses, then calls one of these.

``run_mode``: ``sora-jax sample --mode ...`` (video prompting: t2v, i2v, extend, connect, edit, loop, long).
"""

from __future__ import annotations

import numpy as np

from sora_jax import api
from sora_jax.sample.prompter import Prompter, read_image


def _need(value, what: str, mode: str):
    if not value:
        raise ValueError(f"--mode {mode} needs {what}")
    return value


def run_mode(args) -> str:
    """``sora-jax sample --mode ...``: runs one mode, writes MP4 + GIF (+ a contact sheet) to ``args.out``;
    returns a one-line summary. Inputs are checked before the model loads."""
    from pathlib import Path

    from sora_jax.sample.video_io import contact_sheet, read_video, save_video

    mode, prompt = args.mode, args.prompt[0]
    if mode != "t2v" and len(args.prompt) > 1:
        raise ValueError(f"--mode {mode} takes one --prompt, got {len(args.prompt)}")
    inputs = []
    if mode == "i2v":
        inputs = [read_image(_need(args.image, "--image FILE", mode))]
    elif mode in ("extend", "edit"):
        videos = _need(args.video, "--video FILE", mode)
        if len(videos) != 1:
            raise ValueError(f"--mode {mode} takes one --video, got {len(videos)}")
        inputs = [read_video(videos[0])]
    elif mode == "connect":
        videos = _need(args.video, "two --video FILE", mode)
        if len(videos) != 2:
            raise ValueError(f"--mode connect takes two --video files (A then B), got {len(videos)}")
        inputs = [read_video(v) for v in videos]
    if mode == "edit" and not 0.0 < args.strength <= 1.0:
        raise ValueError(f"--strength must be in (0, 1], got {args.strength}")
    pipe = api.load_pipeline(args.workdir, sample_steps=args.steps, cfg_scale=args.cfg_scale)
    p = Prompter.from_pipeline(
        pipe, bucket=args.bucket, fsdp=args.fsdp, guidance_rescale=args.guidance_rescale
    )
    kw = {"seed": args.seed}
    if args.negative_prompt:
        kw["negative_prompts"] = [args.negative_prompt] * (len(args.prompt) if mode == "t2v" else 1)
    out = Path(args.out)
    if mode == "t2v":
        results = list(p.generate(list(args.prompt), **kw))
    elif mode == "i2v":
        results = [p.i2v(prompt, inputs[0], **kw)]
    elif mode == "extend":
        results = [p.extend(prompt, inputs[0], direction=args.direction, overlap=args.overlap, **kw)]
    elif mode == "connect":
        results = [p.connect(prompt, inputs[0], inputs[1], overlap=args.overlap, **kw)[0]]
    elif mode == "edit":
        results = [p.edit(prompt, inputs[0], strength=args.strength, **kw)]
    elif mode == "loop":
        results = [p.loop(prompt, overlap=args.overlap, **kw)]
    else:
        video, _ = p.long_video([prompt], seconds=args.seconds, overlap=args.overlap, progress=True, **kw)
        results = [video[0]]
    prompts = list(args.prompt) if mode == "t2v" else [prompt]
    for i, video in enumerate(results):
        save_video(out / f"{mode}_{i:02d}.mp4", video, fps=p.fps)
        save_video(out / f"{mode}_{i:02d}.gif", video, fps=p.fps)
    sheet = np.stack([r[np.linspace(0, len(r) - 1, min(len(r), 16)).round().astype(int)] for r in results])
    contact_sheet(sheet, prompts, out / f"{mode}_contact_sheet.png")
    return f"wrote {len(results)} {mode} video(s) of {len(results[0])} frames to {out}"
