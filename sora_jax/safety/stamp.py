"""What makes a written video say that it was generated: the invisible watermark (``safety.watermark``) in its
frames at the size they are written, and a provenance record (``safety.provenance``: a signed C2PA manifest,
or a sidecar JSON when no key is configured) beside each MP4. ``Stamp`` is built once per sampling run from
the config's ``safety`` section; ``sora-jax sample``, ``api.save_video`` and the exported pipeline's
``generate.py`` write through it. ``inspect_video`` is what ``sora-jax detect`` reports for one file.

    stamp = Stamp.for_run(cfg, "runs/demo", 4000, steps=32, seed=0)   # settings the record states
    stamp.write("out/000.mp4", video, fps=8, prompt="a 3 moving left")   # marked, upscaled, recorded

The payload (32 bits, ``watermark.payload_bits``): 16 bits of a hash of the model id
(``<arch>:<variant>``) and 16 of the run id (``<workdir name>@<step>``); ``detect`` prints them as hex.
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np

from sora_jax.config import safety_defaults
from sora_jax.errors import UserError
from sora_jax.safety import provenance
from sora_jax.safety.watermark import Watermark, bits_to_hex, detect, embed, payload_bits
from sora_jax.sample.video_io import atomic_target, default_scale, read_video, upscale, write_gif, write_mp4

__all__ = [
    "Stamp",
    "checkpoint_hash",
    "inspect_video",
    "model_id",
    "payload_distance",
    "run_id",
    "safety_section",
]


def safety_section(cfg, name: str) -> dict:
    """``config.safety.<name>`` over its defaults (``config.safety_defaults``: on)."""
    given = ((cfg.get("safety") if cfg is not None else None) or {}).get(name)
    return dict(safety_defaults()[name]) | (dict(given) if given is not None else {})


def model_id(cfg) -> str:
    """The watermark's model id: ``<arch>:<variant>`` (e.g. ``dit:DiT-S/4``, ``wan:wan2.1-t2v``); "unknown"
    without a config."""
    if cfg is None:
        return "unknown"
    return f"{cfg.model.get('arch', 'dit')}:{cfg.model.get('variant', '')}"


def run_id(workdir: str | os.PathLike, step: int) -> str:
    """The watermark's run id: ``<workdir folder name>@<step>``."""
    return f"{Path(workdir).name}@{int(step)}"


HASH_CACHE = "checkpoint_sha256.json"  # in a workdir: its checkpoints' hashes (``checkpoint_hash``)


def checkpoint_hash(checkpoint: str | os.PathLike, cache: str | os.PathLike | None = None) -> str:
    """``provenance.checkpoint_sha256`` of a checkpoint folder, remembered in the JSON file ``cache`` (keyed by
    the folder's file names, sizes and modification times) so that a large checkpoint is read once, not at
    every sampling run; a cache that cannot be written (a read-only workdir) is skipped."""
    checkpoint = Path(checkpoint)
    files = sorted(p for p in checkpoint.rglob("*") if p.is_file())
    listing = [(f.relative_to(checkpoint).as_posix(), f.stat().st_size, f.stat().st_mtime_ns) for f in files]
    key = hashlib.sha256(json.dumps(listing).encode()).hexdigest()
    name, known = f"{checkpoint.parent.name}/{checkpoint.name}", {}
    if cache is not None and Path(cache).is_file():
        known = json.loads(Path(cache).read_text())
    if known.get(name, {}).get("key") == key:
        return known[name]["sha256"]
    digest = provenance.checkpoint_sha256(checkpoint)
    if cache is not None:
        known[name] = {"key": key, "sha256": digest}
        with contextlib.suppress(OSError), atomic_target(cache) as tmp:  # a read-only workdir: not remembered
            tmp.write_text(json.dumps(known, indent=1))
    return digest


@dataclasses.dataclass(frozen=True)
class Stamp:
    """How one run's videos are written. ``watermark`` None: no watermark; ``provenance`` False: no record;
    ``signing`` None with provenance: sidecar JSON. ``facts``: the provenance facts but the prompt and seed
    (model, model_kind, checkpoint_sha256, sampler settings)."""

    watermark: Watermark | None
    bits: np.ndarray | None
    provenance: bool
    signing: provenance.SigningConfig | None
    facts: dict[str, Any]

    @classmethod
    def for_run(
        cls,
        cfg,
        workdir: str | os.PathLike | None,
        step: int,
        *,
        steps: int | None = None,
        cfg_scale: float | None = None,
        **settings: Any,
    ) -> Stamp:
        """The stamp of a sampling run of ``workdir``'s checkpoint ``step`` under ``cfg.safety`` (``cfg`` None:
        the safeguards' defaults; ``workdir`` None: no checkpoint to name). The record states the config's
        sampler with ``steps`` / ``cfg_scale`` where the run replaces them, and ``settings`` (``mode``,
        ``seed``, ...; ``seed`` is also set per video by ``write``); the checkpoint folder is hashed once
        (``checkpoint_hash``, remembered in ``<workdir>/checkpoint_sha256.json``). A configured key or
        certificate that cannot be read is a one-line UserError here, before anything is generated."""
        from sora_jax.train.checkpoint import checkpoint_dir

        sampler = dict(settings)
        if cfg is not None:
            d = cfg.diffusion
            sampler |= {
                "sampler": str(d.sampler),
                "steps": int(steps or d.sample_steps),
                "cfg_scale": float(cfg_scale if cfg_scale is not None else d.cfg_scale),
            }
        checkpoint = checkpoint_dir(workdir) / str(step) if workdir is not None else None
        wm_cfg, prov_cfg = safety_section(cfg, "watermark"), safety_section(cfg, "provenance")
        wm = Watermark(strength=float(wm_cfg["strength"])) if wm_cfg["enabled"] else None
        bits = payload_bits(model_id(cfg), run_id(workdir or "api", step)) if wm is not None else None
        signing = None
        if prov_cfg["enabled"] and prov_cfg["cert_chain"]:  # with private_key (config.validate)
            signing = provenance.SigningConfig(
                prov_cfg["cert_chain"], prov_cfg["private_key"], algorithm=prov_cfg["algorithm"]
            )
        facts = {
            "model": model_id(cfg),
            "model_kind": "text-to-video",
            "checkpoint_sha256": (
                checkpoint_hash(checkpoint, Path(workdir) / HASH_CACHE)
                if prov_cfg["enabled"] and checkpoint is not None and checkpoint.is_dir()
                else None
            ),
            "sampler": sampler,
        }
        return cls(wm, bits, bool(prov_cfg["enabled"]), signing, facts)

    @property
    def payload(self) -> str | None:
        return None if self.bits is None else bits_to_hex(self.bits)

    def mark(self, video: np.ndarray) -> np.ndarray:
        """uint8 ``[T, H, W, 3]`` -> the same with the watermark (unchanged when it is off or the frames are
        smaller than the watermark's 32 pixels)."""
        if self.watermark is None or min(video.shape[1:3]) < 32:
            return video
        return embed(video, self.bits, self.watermark)

    def write(
        self,
        path: str | os.PathLike,
        video: np.ndarray,
        fps: float,
        *,
        prompt: str,
        seed: int | None = None,
        scale: int | None = None,
    ) -> Path:
        """Writes uint8 ``video`` [T, H, W, 3] as an MP4 or GIF (by suffix), upscaled as ``video_io`` does
        (``scale``; default: shorter side >= 128), watermarked at that size; an MP4 gets its provenance
        record (the prompt's sha256 only). Returns the path."""
        path = Path(path)
        video = np.asarray(video)
        frames = self.mark(upscale(video, default_scale(*video.shape[1:3]) if scale is None else scale))
        suffix = path.suffix.lower()
        if suffix == ".gif":
            return write_gif(path, frames, fps, scale=1)
        if suffix != ".mp4":
            raise ValueError(f"cannot write video {path}: unknown suffix {suffix!r}; use .mp4 or .gif")
        write_mp4(path, frames, fps, scale=1)
        if self.provenance:
            sampler = (
                {"seed": None} | self.facts["sampler"] | ({"seed": int(seed)} if seed is not None else {})
            )
            sampler |= {"frames": int(video.shape[0]), "height": int(frames.shape[1])}
            sampler |= {"width": int(frames.shape[2]), "fps": float(fps)}
            facts = provenance.GenerationFacts.from_prompt(
                prompt, **{k: v for k, v in self.facts.items() if k != "sampler"}, sampler=sampler
            )
            provenance.record(path, facts, self.signing)
        return path


MATCH_BITS = 4  # payloads within this many of 32 bits name the same run (bit errors of a weak copy)


def payload_distance(a: str, b: str) -> int:
    """Bits that differ between two payloads as ``bits_to_hex`` writes them ('mmmm-rrrr')."""
    return bin(int(a.replace("-", ""), 16) ^ int(b.replace("-", ""), 16)).count("1")


def inspect_video(
    path: str | os.PathLike,
    *,
    wm: Watermark | None = None,
    trust_anchors: str | os.PathLike | None = None,
) -> dict[str, Any]:
    """What ``sora-jax detect`` says of one video file: {"path", "watermark": {"detected", "p_value",
    "log10_p", "score", "payload", "bit_confidence"}, "provenance": ``ProvenanceReport`` as a dict with its
    one-line "summary"}. A file that is not a readable video is a one-line UserError."""
    path = Path(path)
    if not path.is_file():
        raise UserError(f"{path}: no such file")
    try:
        video = read_video(path)
    except ValueError as e:
        raise UserError(f"{path}: not a readable video ({str(e).splitlines()[0]})") from None
    if min(video.shape[1:3]) < 32:
        raise UserError(
            f"{path}: {video.shape[2]}x{video.shape[1]} frames are too small to carry a watermark"
        )
    d = detect(video, wm or Watermark())
    report = provenance.verify(path, trust_anchors=trust_anchors) if path.suffix.lower() == ".mp4" else None
    return {
        "path": str(path),
        "watermark": {
            "detected": bool(d.detected),
            "p_value": float(d.p_value),
            "log10_p": float(d.log10_p),
            "score": float(d.score),
            "payload": bits_to_hex(d.bits) if d.detected else None,
            "bit_confidence": float(np.mean(d.bit_confidence)) if d.detected else None,
        },
        "provenance": None if report is None else dataclasses.asdict(report) | {"summary": report.summary()},
    }
