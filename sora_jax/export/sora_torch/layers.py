"""The DiT's building blocks in PyTorch, the same math as ``sora_jax/models/layers.py`` (float32 inside norms,
RoPE and the timestep embedding). Imports torch and numpy only.

Layouts inside the models are channels last: videos ``[B, T, H, W, C]``, tokens ``[B, N, D]``, heads
``[B, N, K, H]`` (K heads of width H).
"""

from __future__ import annotations

import math

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn


def layer_norm(x: torch.Tensor, eps: float = 1e-6) -> torch.Tensor:
    """Parameter-free LayerNorm over the last axis, float32 inside: ``[..., D]`` -> ``[..., D]``."""
    xf = x.float()
    mean = xf.mean(-1, keepdim=True)
    var = (xf - mean).square().mean(-1, keepdim=True)
    return ((xf - mean) * torch.rsqrt(var + eps)).to(x.dtype)


class RMSNorm(nn.Module):
    """RMSNorm over the last axis with a learned scale ``weight [D]``; float32 inside."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        xf = x.float()
        y = xf * torch.rsqrt(xf.square().mean(-1, keepdim=True) + self.eps)
        return (y * self.weight.float()).to(x.dtype)


class Mlp(nn.Module):
    """Linear(D -> F), GELU (tanh), Linear(F -> D)."""

    def __init__(self, dim: int, hidden: int):
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.fc2(F.gelu(self.fc1(x), approximate="tanh"))


def rope_split(head_dim: int) -> tuple[int, int, int]:
    """Rotary pairs given to (t, h, w): H/2 pairs in three, h and w equal, t the remainder."""
    pairs = head_dim // 2
    per = pairs // 3
    return pairs - 2 * per, per, per


def _axis_angles(pos: np.ndarray, pairs: int, theta: float) -> np.ndarray:
    inv_freq = theta ** (-np.arange(pairs, dtype=np.float64) / pairs)
    return pos[:, None].astype(np.float64) * inv_freq[None, :]


def _cos_sin(ang: np.ndarray, device) -> tuple[torch.Tensor, torch.Tensor]:
    cos = torch.from_numpy(np.cos(ang).astype(np.float32)).to(device)
    sin = torch.from_numpy(np.sin(ang).astype(np.float32)).to(device)
    return cos, sin


def rope_3d_angles(gt: int, gh: int, gw: int, head_dim: int, theta: float, device=None):
    """(cos, sin) float32 ``[N, head_dim/2]``, N = gt*gh*gw in (t, h, w) row-major order."""
    pt, ph, pw = rope_split(head_dim)
    t, h, w = np.meshgrid(np.arange(gt), np.arange(gh), np.arange(gw), indexing="ij")
    ang = np.concatenate(
        [
            _axis_angles(t.reshape(-1), pt, theta),
            _axis_angles(h.reshape(-1), ph, theta),
            _axis_angles(w.reshape(-1), pw, theta),
        ],
        axis=1,
    )
    return _cos_sin(ang, device)


def rope_1d_angles(n: int, head_dim: int, theta: float, device=None):
    """(cos, sin) float32 ``[n, head_dim/2]`` for positions 0..n-1."""
    return _cos_sin(_axis_angles(np.arange(n), head_dim // 2, theta), device)


def apply_rope(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor) -> torch.Tensor:
    """Rotates x ``[B, N, K, H]`` by angles ``[N, H/2]`` (rotate-half), float32 inside."""
    half = x.shape[-1] // 2
    xf = x.float()
    x1, x2 = xf[..., :half], xf[..., half:]
    c, s = cos[None, :, None, :], sin[None, :, None, :]
    return torch.cat([x1 * c - x2 * s, x2 * c + x1 * s], dim=-1).to(x.dtype)


class Attention(nn.Module):
    """Multi-head attention, q from x and k/v from ``context``; optional QK RMSNorm (over H, shared by heads)
    and RoPE on q and k. Projections ``to_q/to_k/to_v [K*H, D]`` and ``to_out [D, K*H]`` (torch Linear)."""

    def __init__(self, dim: int, num_heads: int, context_dim: int | None = None, qk_norm: bool = True):
        super().__init__()
        self.num_heads, self.head_dim = num_heads, dim // num_heads
        cdim = context_dim or dim
        self.to_q = nn.Linear(dim, dim)
        self.to_k = nn.Linear(cdim, dim)
        self.to_v = nn.Linear(cdim, dim)
        self.to_out = nn.Linear(dim, dim)
        self.q_norm = RMSNorm(self.head_dim) if qk_norm else None
        self.k_norm = RMSNorm(self.head_dim) if qk_norm else None

    def forward(self, x, context=None, mask=None, rope=None) -> torch.Tensor:
        """x ``[B, N, D]``, context ``[B, M, Dc]`` (default x), mask bool ``[B, M]`` -> ``[B, N, D]``."""
        ctx = x if context is None else context
        B, N, _ = x.shape
        M = ctx.shape[1]
        q = self.to_q(x).view(B, N, self.num_heads, self.head_dim)
        k = self.to_k(ctx).view(B, M, self.num_heads, self.head_dim)
        v = self.to_v(ctx).view(B, M, self.num_heads, self.head_dim)
        if self.q_norm is not None:
            q, k = self.q_norm(q), self.k_norm(k)
        if rope is not None:
            q, k = apply_rope(q, *rope), apply_rope(k, *rope)
        attn_mask = None if mask is None else mask.bool()[:, None, None, :]
        out = F.scaled_dot_product_attention(
            q.transpose(1, 2), k.transpose(1, 2), v.transpose(1, 2), attn_mask=attn_mask
        )  # [B, K, N, H]
        return self.to_out(out.transpose(1, 2).reshape(B, N, -1))


def timestep_embedding(t: torch.Tensor, dim: int, max_period: float = 10000.0) -> torch.Tensor:
    """DiT's sinusoidal embedding, float32: t ``[...]`` -> ``[..., dim]`` = ``[cos(t f), sin(t f)]``."""
    half = dim // 2
    freqs = torch.exp(-math.log(max_period) * torch.arange(half, dtype=torch.float32, device=t.device) / half)
    args = t.float()[..., None] * freqs
    emb = torch.cat([torch.cos(args), torch.sin(args)], dim=-1)
    if dim % 2:
        emb = torch.cat([emb, torch.zeros_like(emb[..., :1])], dim=-1)
    return emb


def _per_group(x: torch.Tensor, v: torch.Tensor):
    if v.ndim == 2:
        return x, v[:, None]
    B, N, D = x.shape
    G = v.shape[1]
    return x.reshape(B, G, N // G, D), v[:, :, None]


def modulate(x: torch.Tensor, shift: torch.Tensor, scale: torch.Tensor) -> torch.Tensor:
    """``x * (1 + scale) + shift``; x ``[B, N, D]``, shift/scale ``[B, D]`` or per frame group ``[B, G, D]``."""
    xg, sc = _per_group(x, scale)
    _, sh = _per_group(x, shift)
    return (xg * (1 + sc) + sh).reshape(x.shape)


def gate(g: torch.Tensor, h: torch.Tensor) -> torch.Tensor:
    """``g * h``: h ``[B, N, D]``, g ``[B, D]`` or ``[B, G, D]``."""
    hg, gg = _per_group(h, g)
    return (gg * hg).reshape(h.shape)


def patchify(x: torch.Tensor, patch_size) -> torch.Tensor:
    """``[B, T, H, W, C]`` -> tokens ``[B, N, pt*ph*pw*C]``, N in (t, h, w) order, patches flattened (pt, ph, pw, C)."""
    B, T, H, W, C = x.shape
    pt, ph, pw = patch_size
    x = x.reshape(B, T // pt, pt, H // ph, ph, W // pw, pw, C).permute(0, 1, 3, 5, 2, 4, 6, 7)
    return x.reshape(B, -1, pt * ph * pw * C)


def unpatchify(x: torch.Tensor, patch_size, grid) -> torch.Tensor:
    """Inverse of ``patchify``: ``[B, N, P]`` and grid (gt, gh, gw) -> ``[B, T, H, W, C]``."""
    B, N, P = x.shape
    pt, ph, pw = patch_size
    gt, gh, gw = grid
    C = P // (pt * ph * pw)
    x = x.reshape(B, gt, gh, gw, pt, ph, pw, C).permute(0, 1, 4, 2, 5, 3, 6, 7)
    return x.reshape(B, gt * pt, gh * ph, gw * pw, C)
