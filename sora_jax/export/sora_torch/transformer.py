"""``SoraTransformer3DModel``: the spacetime DiT of ``sora_jax/models/dit.py`` as a diffusers model (the same
patchify order, 3D RoPE angles, QK RMSNorm, adaLN-Zero, key-masked cross-attention, per-frame-group times).

Input and output in diffusers' video layout ``[B, C, T, H, W]``; inside, channels last as in JAX.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.embeddings import get_2d_sincos_pos_embed_from_grid
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .layers import (
    Attention,
    Mlp,
    RMSNorm,
    gate,
    layer_norm,
    modulate,
    patchify,
    rope_3d_angles,
    timestep_embedding,
    unpatchify,
)

FREQ_DIM = 256


class TimestepEmbedder(nn.Module):
    def __init__(self, width: int):
        super().__init__()
        self.fc1 = nn.Linear(FREQ_DIM, width)
        self.fc2 = nn.Linear(width, width)

    def forward(self, t: torch.Tensor) -> torch.Tensor:
        """t ``[B]`` or ``[B, G]`` -> ``[B, D]`` or ``[B, G, D]``."""
        freq = timestep_embedding(t, FREQ_DIM).to(self.fc1.weight.dtype)
        return self.fc2(F.silu(self.fc1(freq)))


class DiTBlock(nn.Module):
    def __init__(self, width: int, num_heads: int, text_dim: int, mlp_dim: int, qk_norm: bool):
        super().__init__()
        self.attn = Attention(width, num_heads, qk_norm=qk_norm)
        self.cross_norm = RMSNorm(width)
        self.cross_attn = Attention(width, num_heads, context_dim=text_dim, qk_norm=qk_norm)
        self.mlp = Mlp(width, mlp_dim)
        self.adaLN_modulation = nn.Linear(width, 6 * width)

    def forward(self, x, c, text, text_mask, rope):
        mod = self.adaLN_modulation(F.silu(c))
        shift_msa, scale_msa, gate_msa, shift_mlp, scale_mlp, gate_mlp = mod.chunk(6, dim=-1)
        x = x + gate(gate_msa, self.attn(modulate(layer_norm(x), shift_msa, scale_msa), rope=rope))
        x = x + self.cross_attn(self.cross_norm(x), text, mask=text_mask)
        return x + gate(gate_mlp, self.mlp(modulate(layer_norm(x), shift_mlp, scale_mlp)))


class FinalLayer(nn.Module):
    def __init__(self, width: int, patch_dim: int, feature_dim: int = 0):
        super().__init__()
        self.adaLN_modulation = nn.Linear(width, 2 * width)
        self.linear = nn.Linear(width, patch_dim)
        self.features = nn.Linear(width, feature_dim) if feature_dim else None

    def forward(self, x, c):
        shift, scale = self.adaLN_modulation(F.silu(c)).chunk(2, dim=-1)
        h = modulate(layer_norm(x), shift, scale)
        return self.linear(h) if self.features is None else (self.linear(h), self.features(h))


class SoraTransformer3DModel(ModelMixin, ConfigMixin):
    """``forward(hidden_states [B, C, T, H, W], timestep [B] or per frame [B, T] in [0, 1000],
    encoder_hidden_states [B, L, text_dim], encoder_attention_mask bool [B, L]) -> [B, C, T, H, W]``: the
    model's output (velocity, x0, eps or v, per the scheduler config's ``prediction_type``)."""

    _supports_gradient_checkpointing = False
    _no_split_modules = ["DiTBlock"]

    @register_to_config
    def __init__(
        self,
        in_channels: int = 4,
        patch_size: tuple[int, int, int] = (1, 2, 2),
        width: int = 384,
        depth: int = 12,
        num_heads: int = 6,
        text_dim: int = 384,
        mlp_ratio: float = 4.0,
        qk_norm: bool = True,
        rope_theta: float = 10000.0,
        pooled_text_cond: bool = True,
        pos_embed: str = "none",
        out_conv: int = 0,
    ):
        super().__init__()
        if pos_embed not in ("none", "sincos_2d"):
            raise ValueError(f"SoraTransformer3DModel: pos_embed {pos_embed!r} is not 'none' or 'sincos_2d'")
        pt, ph, pw = patch_size
        patch_dim = pt * ph * pw * in_channels
        self.x_embedder = nn.Linear(patch_dim, width)
        self.t_embedder = TimestepEmbedder(width)
        self.y_embedder = nn.Linear(text_dim, width) if pooled_text_cond else None
        mlp_dim = int(width * mlp_ratio)
        self.blocks = nn.ModuleList(
            [DiTBlock(width, num_heads, text_dim, mlp_dim, qk_norm) for _ in range(depth)]
        )
        self.final_layer = FinalLayer(width, patch_dim, pt * ph * pw * out_conv)
        # the convolutional head across the patches' seams (channels last outside, as the JAX model)
        self.head_conv = nn.Conv3d(out_conv, in_channels, (1, 3, 3), padding=(0, 1, 1)) if out_conv else None

    def forward(
        self,
        hidden_states: torch.Tensor,
        timestep: torch.Tensor,
        encoder_hidden_states: torch.Tensor,
        encoder_attention_mask: torch.Tensor,
    ) -> torch.Tensor:
        cfg = self.config
        dt = self.x_embedder.weight.dtype
        x = hidden_states.permute(0, 2, 3, 4, 1)  # [B, T, H, W, C]
        B, T, H, W, C = x.shape
        pt, ph, pw = cfg.patch_size
        if cfg.in_channels != C or T % pt or H % ph or W % pw:
            raise ValueError(
                f"SoraTransformer3DModel wants [B, {cfg.in_channels}, T, H, W] divisible by {tuple(cfg.patch_size)},"
                f" got {tuple(hidden_states.shape)}"
            )
        grid = (T // pt, H // ph, W // pw)
        t = torch.as_tensor(timestep, device=x.device).float()
        if t.ndim == 0:
            t = t.expand(B)
        if t.ndim == 2:  # per frame -> per temporal patch group: clean only if every frame is
            t = t.reshape(B, grid[0], pt).amax(-1)
        mask = encoder_attention_mask.bool()
        text = encoder_hidden_states.to(dt)
        tokens = self.x_embedder(patchify(x.to(dt), cfg.patch_size))
        if cfg.pos_embed == "sincos_2d":  # diffusers' fixed 2D table over (h, w), the same every frame group
            hw = torch.stack(torch.meshgrid(torch.arange(grid[2]), torch.arange(grid[1]), indexing="xy"))
            table = get_2d_sincos_pos_embed_from_grid(cfg.width, hw.double().reshape(2, 1, grid[1], grid[2]))
            tokens = tokens + table.to(device=x.device, dtype=dt).repeat(grid[0], 1)
        c = self.t_embedder(t)
        if self.y_embedder is not None:
            m = mask[..., None].float()
            pooled = (text.float() * m).sum(1) / m.sum(1).clamp(min=1.0)
            y = self.y_embedder(pooled.to(dt))
            c = c + (y[:, None] if c.ndim == 3 else y)
        rope = rope_3d_angles(*grid, cfg.width // cfg.num_heads, cfg.rope_theta, device=x.device)
        for block in self.blocks:
            tokens = block(tokens, c, text, mask, rope)
        if self.head_conv is None:
            out = unpatchify(self.final_layer(tokens, c), cfg.patch_size, grid).permute(0, 4, 1, 2, 3)
        else:
            out, feat = self.final_layer(tokens, c)
            feat = unpatchify(feat, cfg.patch_size, grid).permute(0, 4, 1, 2, 3)
            out = unpatchify(out, cfg.patch_size, grid).permute(0, 4, 1, 2, 3) + self.head_conv(F.silu(feat))
        return out

    @torch.no_grad()
    def load_lora_weights(self, path, weight: float = 1.0) -> list[str]:
        """Merges a LoRA file into the Linear weights, in place: ``W += weight * scale * B @ A`` per module.

        ``path``: a ``.safetensors`` file, or a folder holding ``pytorch_lora_weights.safetensors`` (what
        ``sora_jax.export.lora_files.write_adapters`` writes): keys ``[transformer.]<module>.lora_A.weight``
        ``[r, in]`` and ``.lora_B.weight`` ``[out, r]``, ``<module>`` this model's module names
        (``blocks.0.attn.to_q``, ``blocks.0.mlp.fc1``, ...); ``lora_down``/``lora_up`` also read. ``scale`` is a
        module's ``.alpha`` / r when the file has one, else 1 (the writer folds alpha / rank into lora_B).
        DoRA: a ``<module>.lora_magnitude_vector`` ``m [out]`` (peft's key) makes it
        ``W = m (W + weight * scale * B @ A) / ||W + weight * scale * B @ A||`` (norm of each output row; the
        weight scales the low-rank direction, as peft's scaling does). No peft: merged, so unloading means
        reloading the weights. Returns the modules changed.
        """
        import os

        from safetensors.torch import load_file

        if os.path.isdir(path):
            path = os.path.join(path, "pytorch_lora_weights.safetensors")
        tensors = load_file(str(path))
        modules = dict(self.named_modules())
        parts: dict[str, dict[str, torch.Tensor]] = {}
        for key, value in tensors.items():
            name = key.removeprefix("transformer.")
            for end, part in ((".lora_A.weight", "A"), (".lora_down.weight", "A"), (".lora_B.weight", "B"),
                              (".lora_up.weight", "B"), (".alpha", "alpha"),
                              (".lora_magnitude_vector", "m")):  # fmt: skip
                if name.endswith(end):
                    parts.setdefault(name.removesuffix(end), {})[part] = value
                    break
            else:
                raise ValueError(
                    f"{path}: tensor {key!r} is not a LoRA lora_A/lora_B weight, alpha or lora_magnitude_vector"
                )
        for name, p in parts.items():
            linear = modules.get(name)
            if not isinstance(linear, nn.Linear) or "A" not in p or "B" not in p:
                raise ValueError(f"{path}: {name!r} is not a Linear of this model with lora_A and lora_B")
            a, b = p["A"].double(), p["B"].double()  # [r, in], [out, r]
            scale = float(p["alpha"]) / a.shape[0] if "alpha" in p else 1.0
            if (b.shape[0], a.shape[1]) != tuple(linear.weight.shape) or b.shape[1] != a.shape[0]:
                raise ValueError(
                    f"{path}: {name!r} lora_B {list(b.shape)} @ lora_A {list(a.shape)} does not fit its weight "
                    f"{list(linear.weight.shape)}"
                )
            merged = linear.weight.double() + (weight * scale) * (b @ a)
            if "m" in p:  # DoRA: each output row rescaled to its magnitude
                if p["m"].shape != (b.shape[0],):
                    raise ValueError(
                        f"{path}: {name!r} lora_magnitude_vector {list(p['m'].shape)}, want [{b.shape[0]}]"
                    )
                merged = merged * (p["m"].double() / merged.norm(dim=1))[:, None]
            linear.weight.copy_(merged.to(linear.weight.dtype))
        return sorted(parts)
