"""Reconstruction quality of a trained VAE: PSNR and SSIM on a split's clips, a side-by-side contact sheet.

``psnr`` / ``ssim`` work on uint8 videos (SSIM: Wang et al. 2004, 11x11 Gaussian window with sigma 1.5,
K1 = 0.01, K2 = 0.03, on luma, averaged over frames); ``evaluate_vae(workdir)`` encodes and decodes
``num_clips`` clips of the split with the workdir's checkpoint (EMA weights) and writes
``<out>/reconstruction_<split>.{json,md}`` and ``reconstruction_<split>.png`` (originals above
reconstructions), atomically; it also measures the latent shift/scale on training clips into
``<workdir>/latent_stats.json``, which latent diffusion (``autoencoder.kind = "vae"``) needs.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx
from tqdm.auto import tqdm

from sora_jax.errors import UserError
from sora_jax.models.autoencoder import float_to_video, video_to_float
from sora_jax.models.vae import LATENT_STATS, latent_statistics

_LUMA = np.asarray([0.299, 0.587, 0.114], np.float64)


def psnr(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """PSNR in dB per clip of uint8 videos ``[B, T, H, W, C]`` (peak 255); identical clips give inf."""
    err = np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2, axis=tuple(range(1, a.ndim)))
    with np.errstate(divide="ignore"):
        return 10.0 * np.log10(255.0**2 / err)


def _gaussian_window(size: int = 11, sigma: float = 1.5) -> np.ndarray:
    x = np.arange(size, dtype=np.float64) - (size - 1) / 2
    g = np.exp(-(x**2) / (2 * sigma**2))
    return g / g.sum()


def _filter(img: np.ndarray, g: np.ndarray) -> np.ndarray:
    """'valid' separable filtering of img [..., H, W] with the 1D window g."""
    k = len(g)
    h = sum(g[i] * img[..., i : img.shape[-2] - k + 1 + i, :] for i in range(k))
    return sum(g[i] * h[..., :, i : img.shape[-1] - k + 1 + i] for i in range(k))


def ssim(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    """Mean SSIM per clip of uint8 videos ``[B, T, H, W, C]`` on luma (frames at least 11x11)."""
    x = np.einsum("bthwc,c->bthw", a.astype(np.float64), _LUMA[: a.shape[-1]] / _LUMA[: a.shape[-1]].sum())
    y = np.einsum("bthwc,c->bthw", b.astype(np.float64), _LUMA[: b.shape[-1]] / _LUMA[: b.shape[-1]].sum())
    g = _gaussian_window()
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    mx, my = _filter(x, g), _filter(y, g)
    sxx = _filter(x * x, g) - mx**2
    syy = _filter(y * y, g) - my**2
    sxy = _filter(x * y, g) - mx * my
    s = ((2 * mx * my + c1) * (2 * sxy + c2)) / ((mx**2 + my**2 + c1) * (sxx + syy + c2))
    return s.mean(axis=(1, 2, 3))


def _contact_sheet(originals: np.ndarray, recons: np.ndarray, path: Path) -> None:
    """Rows: clip i original, clip i reconstruction; columns: frames. uint8 PNG, 2x upscaled."""
    from PIL import Image

    rows = []
    for o, r in zip(originals, recons):
        rows += [np.concatenate(list(o), axis=1), np.concatenate(list(r), axis=1)]
    sheet = np.concatenate(rows, axis=0)
    sheet = np.repeat(np.repeat(sheet, 2, axis=0), 2, axis=1)
    tmp = path.with_suffix(".tmp.png")
    Image.fromarray(sheet).save(tmp)
    os.replace(tmp, path)


def _latent_shape(vcfg, thw: tuple[int, int, int]) -> list[int]:
    f, s = vcfg.temporal_downsample, vcfg.spatial_downsample
    return [1 + (thw[0] - 1) // f, thw[1] // s, thw[2] // s, vcfg.latent_channels]


def _write_atomic(path: Path, text: str) -> None:
    tmp = path.with_suffix(path.suffix + ".tmp")
    tmp.write_text(text)
    os.replace(tmp, path)


def measure_latent_statistics(workdir, graphdef, params, train_clips, step: int, num_clips: int) -> dict:
    """Shift/scale of the posterior means over ``num_clips`` training clips, written atomically to
    ``<workdir>/latent_stats.json`` (what ``VAECodec`` normalises latents with)."""

    @jax.jit
    def encode(p, video):
        return nnx.merge(graphdef, p).encode(video_to_float(video))

    means, seen = [], 0
    for batch in train_clips:
        video = np.asarray(batch["video"])[: num_clips - seen]
        means.append(np.asarray(encode(params, jnp.asarray(video))))
        seen += len(video)
        if seen >= num_clips:
            break
    stats = {"step": step, "split": "train", "clips": seen, **latent_statistics(np.concatenate(means))}
    _write_atomic(Path(workdir) / LATENT_STATS, json.dumps(stats, indent=2) + "\n")
    return stats


def evaluate_vae(
    workdir: str | Path,
    *,
    num_clips: int = 256,
    split: str = "test",
    batch_size: int = 16,
    out: str | Path | None = None,
    progress: bool = True,
    use_ema: bool | None = None,
) -> dict:
    """PSNR / SSIM of the workdir's VAE on ``num_clips`` clips of ``split``; writes the report; returns it.
    ``use_ema`` False scores the raw parameters (default: the config's ``sample.use_ema``)."""
    from sora_jax import factory, loading
    from sora_jax.data import pipeline

    cfg, step, abstract, params = loading.restore(workdir, use_ema=use_ema)
    graphdef, params = abstract.graphdef, jax.device_get(params)
    data = pipeline.dataset_dir(cfg, workdir)

    def clips(which: str):
        return pipeline.in_order(data, which, batch_size)

    ds = clips(split)

    @jax.jit
    def reconstruct(p, video):
        model = nnx.merge(graphdef, p)
        return float_to_video(model.decode(model.encode(video_to_float(video))))

    originals, recons = [], []
    seen = 0
    bar = tqdm(total=num_clips, desc=f"reconstruct {split}", disable=not progress)
    for batch in ds:
        video = np.asarray(batch["video"])[: num_clips - seen]
        originals.append(video)
        recons.append(np.asarray(reconstruct(params, jnp.asarray(video))))
        seen += len(video)
        bar.update(len(video))
        if seen >= num_clips:
            break
    bar.close()
    if not seen:
        raise UserError(f"split {split!r} of {data} has no clips")
    originals, recons = np.concatenate(originals), np.concatenate(recons)
    p, s = psnr(originals, recons), ssim(originals, recons)
    metrics = {
        "split": split,
        "step": int(step),
        "weights": "ema" if (cfg.sample.use_ema if use_ema is None else use_ema) else "raw",
        "clips": int(seen),
        "frames": int(originals.shape[1]),
        "size": f"{originals.shape[2]}x{originals.shape[3]}",
        "latent_shape": _latent_shape(factory.vae_config(cfg), originals.shape[1:4]),
        "psnr_db": float(np.mean(np.minimum(p, 100.0))),
        "psnr_db_min": float(np.min(p)),
        "ssim": float(np.mean(s)),
    }
    metrics["latent_stats"] = measure_latent_statistics(
        workdir, graphdef, params, clips("train"), int(step), num_clips
    )
    out = Path(out) if out else Path(workdir) / "eval"
    out.mkdir(parents=True, exist_ok=True)
    _write_atomic(out / f"reconstruction_{split}.json", json.dumps(metrics, indent=2) + "\n")
    md = [
        f"# VAE reconstruction, {split} split (step {step})",
        "",
        "| clips | PSNR (dB) | min PSNR (dB) | SSIM |",
        "|---|---|---|---|",
        f"| {seen} | {metrics['psnr_db']:.2f} | {metrics['psnr_db_min']:.2f} | {metrics['ssim']:.4f} |",
        "",
        f"![originals over reconstructions](reconstruction_{split}.png)",
    ]
    _write_atomic(out / f"reconstruction_{split}.md", "\n".join(md) + "\n")
    _contact_sheet(originals[:6], recons[:6], out / f"reconstruction_{split}.png")
    return metrics
