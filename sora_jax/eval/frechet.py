"""The Fréchet distance between two Gaussians fitted to feature sets (FID, FVD), in float64.

    a, b = gaussian_stats(feats_a), gaussian_stats(feats_b)      # [N, F] -> mean [F], covariance [F, F]
    frechet_distance(a, b)   # |mu_a - mu_b|^2 + tr(S_a) + tr(S_b) - 2 tr((S_a S_b)^(1/2))

The matrix square root is ``scipy.linalg.sqrtm`` of S_a S_b, as the reference implementations compute it
(TTUR/pytorch-fid, StyleGAN-V's FVD): when the product is near singular (fewer samples than features) it
retries with ``eps`` added to both diagonals, and it keeps the real part (an imaginary residue from rounding
is allowed up to 1e-3 of the largest diagonal entry, else a ValueError).
"""

from __future__ import annotations

import dataclasses
import json
import os
from pathlib import Path

import numpy as np
import scipy.linalg

__all__ = ["Stats", "frechet_distance", "gaussian_stats", "load_stats", "save_stats"]


@dataclasses.dataclass(frozen=True)
class Stats:
    """A Gaussian fitted to ``count`` feature vectors: ``mu`` float64 [F], ``sigma`` float64 [F, F]."""

    mu: np.ndarray
    sigma: np.ndarray
    count: int
    meta: dict = dataclasses.field(default_factory=dict, compare=False)


def gaussian_stats(features: np.ndarray, meta: dict | None = None) -> Stats:
    """Mean and unbiased covariance (``np.cov``, rowvar False) of features [N, F], N >= 2, in float64."""
    x = np.asarray(features, np.float64)
    if x.ndim != 2 or len(x) < 2:
        raise ValueError(f"features must be [N >= 2, F], got {x.shape}")
    return Stats(x.mean(0), np.cov(x, rowvar=False).reshape(x.shape[1], x.shape[1]), len(x), meta or {})


def frechet_distance(a: Stats, b: Stats, eps: float = 1e-6) -> float:
    """The Fréchet distance of N(mu_a, S_a) and N(mu_b, S_b) (see the module docstring)."""
    if a.mu.shape != b.mu.shape:
        raise ValueError(f"feature sizes differ: {a.mu.shape} vs {b.mu.shape}")
    diff = a.mu - b.mu
    covmean, _ = scipy.linalg.sqrtm(a.sigma @ b.sigma, disp=False)
    if not np.isfinite(covmean).all():
        offset = np.eye(len(a.mu)) * eps
        covmean = scipy.linalg.sqrtm((a.sigma + offset) @ (b.sigma + offset))
    if np.iscomplexobj(covmean):
        scale = max(np.abs(np.diagonal(covmean)).max(), 1e-12)
        if not np.allclose(np.diagonal(covmean).imag, 0, atol=1e-3 * scale):
            raise ValueError(
                f"imaginary component {np.abs(covmean.imag).max():.3g} in the matrix square root"
            )
        covmean = covmean.real
    return float(diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2.0 * np.trace(covmean))


def save_stats(path: str | os.PathLike, stats: Stats) -> Path:
    """Writes ``stats`` as .npz (mu, sigma, count, meta JSON), atomically."""
    path = Path(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(path.name + ".tmp")
    try:
        with open(tmp, "wb") as fh:
            np.savez(fh, mu=stats.mu, sigma=stats.sigma, count=stats.count, meta=json.dumps(stats.meta))
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return path


def load_stats(path: str | os.PathLike) -> Stats:
    with np.load(path, allow_pickle=False) as z:
        return Stats(z["mu"], z["sigma"], int(z["count"]), json.loads(str(z["meta"])))
