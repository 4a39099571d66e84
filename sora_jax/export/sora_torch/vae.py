"""The autoencoders as diffusers models: ``SoraVideoVAE`` (the causal 3D VAE of ``sora_jax/models/vae.py``:
causal front padding by repeating the first frame, RMSNorm over channels, stride-2 causal temporal
downsampling, repeat-and-drop-first temporal upsampling) and ``SoraPixelCodec`` (the pixel codecs
``identity`` / ``luma``). Both code videos ``[B, 3, T, H, W]`` in [-1, 1] to the latents the DiT works on
``[B, C, T', H', W']`` (normalised: ``(mean - shift_factor) * scaling_factor`` for the VAE) and back.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn


class ChannelRMSNorm(nn.Module):
    """RMSNorm over the channel axis (1) of ``[B, C, T, H, W]``, float32 inside."""

    def __init__(self, dim: int, eps: float = 1e-6):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x):
        xf = x.float()
        y = xf * torch.rsqrt(xf.square().mean(1, keepdim=True) + self.eps)
        return (y * self.weight.float()[None, :, None, None, None]).to(x.dtype)


class CausalConv3d(nn.Module):
    """Conv3d causal in time (``kt - 1`` copies of the first frame in front), 'same' in space at stride 1,
    right/bottom padded at stride 2. ``weight [Cout, Cin, kt, kh, kw]``."""

    def __init__(self, cin: int, cout: int, kernel=(3, 3, 3), stride=(1, 1, 1)):
        super().__init__()
        self.weight = nn.Parameter(torch.zeros(cout, cin, *kernel))
        self.bias = nn.Parameter(torch.zeros(cout))
        self.kernel, self.stride = tuple(kernel), tuple(stride)

    def forward(self, x):
        kt, kh, kw = self.kernel
        st, sh, sw = self.stride
        if kt > 1:
            x = torch.cat([x[:, :, :1].expand(-1, -1, kt - 1, -1, -1), x], dim=2)
        ph = (kh // 2, kh // 2) if sh == 1 else (0, kh - sh)
        pw = (kw // 2, kw // 2) if sw == 1 else (0, kw - sw)
        x = F.pad(x, (*pw, *ph))
        return F.conv3d(x, self.weight.to(x.dtype), self.bias.to(x.dtype), stride=self.stride)


class ResBlock(nn.Module):
    def __init__(self, cin: int, cout: int):
        super().__init__()
        self.norm1, self.conv1 = ChannelRMSNorm(cin), CausalConv3d(cin, cout)
        self.norm2, self.conv2 = ChannelRMSNorm(cout), CausalConv3d(cout, cout)
        self.skip = CausalConv3d(cin, cout, (1, 1, 1)) if cin != cout else None

    def forward(self, x):
        h = self.conv1(F.silu(self.norm1(x)))
        h = self.conv2(F.silu(self.norm2(h)))
        return (x if self.skip is None else self.skip(x)) + h


class Downsample(nn.Module):
    def __init__(self, ch: int, temporal: bool):
        super().__init__()
        self.spatial = CausalConv3d(ch, ch, (1, 3, 3), (1, 2, 2))
        self.temporal = CausalConv3d(ch, ch, (3, 1, 1), (2, 1, 1)) if temporal else None

    def forward(self, x):
        x = self.spatial(x)
        return x if self.temporal is None else self.temporal(x)


class Upsample(nn.Module):
    def __init__(self, ch: int, temporal: bool):
        super().__init__()
        self.temporal = CausalConv3d(ch, ch, (3, 1, 1)) if temporal else None
        self.spatial = CausalConv3d(ch, ch, (1, 3, 3))

    def forward(self, x):
        if self.temporal is not None:
            x = self.temporal(x.repeat_interleave(2, dim=2)[:, :, 1:])
        x = x.repeat_interleave(2, dim=3).repeat_interleave(2, dim=4)
        return self.spatial(x)


class Encoder(nn.Module):
    def __init__(self, in_channels, latent_channels, widths, temporal_down, num_res_blocks):
        super().__init__()
        self.conv_in = CausalConv3d(in_channels, widths[0])
        blocks, downs, cin = [], [], widths[0]
        for level, w in enumerate(widths):
            level_blocks = []
            for _ in range(num_res_blocks):
                level_blocks.append(ResBlock(cin, w))
                cin = w
            blocks.append(nn.ModuleList(level_blocks))
            if level < len(widths) - 1:
                downs.append(Downsample(w, temporal_down[level]))
        self.blocks, self.downs = nn.ModuleList(blocks), nn.ModuleList(downs)
        self.mid = nn.ModuleList([ResBlock(cin, cin), ResBlock(cin, cin)])
        self.norm_out = ChannelRMSNorm(cin)
        self.conv_out = CausalConv3d(cin, 2 * latent_channels)

    def forward(self, x):
        h = self.conv_in(x)
        for level, level_blocks in enumerate(self.blocks):
            for block in level_blocks:
                h = block(h)
            if level < len(self.downs):
                h = self.downs[level](h)
        for block in self.mid:
            h = block(h)
        return self.conv_out(F.silu(self.norm_out(h))).float()


class Decoder(nn.Module):
    def __init__(self, in_channels, latent_channels, widths, temporal_down, num_res_blocks):
        super().__init__()
        widths, temporal_up = widths[::-1], temporal_down[::-1]
        cin = widths[0]
        self.conv_in = CausalConv3d(latent_channels, cin)
        self.mid = nn.ModuleList([ResBlock(cin, cin), ResBlock(cin, cin)])
        blocks, ups = [], []
        for level, w in enumerate(widths):
            level_blocks = []
            for _ in range(num_res_blocks + 1):
                level_blocks.append(ResBlock(cin, w))
                cin = w
            blocks.append(nn.ModuleList(level_blocks))
            if level < len(widths) - 1:
                ups.append(Upsample(w, temporal_up[level]))
        self.blocks, self.ups = nn.ModuleList(blocks), nn.ModuleList(ups)
        self.norm_out = ChannelRMSNorm(cin)
        self.conv_out = CausalConv3d(cin, in_channels)

    def forward(self, z):
        h = self.conv_in(z)
        for block in self.mid:
            h = block(h)
        for level, level_blocks in enumerate(self.blocks):
            for block in level_blocks:
                h = block(h)
            if level < len(self.ups):
                h = self.ups[level](h)
        return self.conv_out(F.silu(self.norm_out(h))).float()


class SoraVideoVAE(ModelMixin, ConfigMixin):
    """The causal video VAE. ``encode(video [B, 3, T, H, W], T = 1 + f k)`` -> normalised posterior mean
    ``[B, Z, 1 + k, H/s, W/s]``; ``decode(latents)`` -> video in [-1, 1]. ``encode_moments`` gives the raw
    (mean, logvar)."""

    _supports_gradient_checkpointing = False

    @register_to_config
    def __init__(
        self,
        in_channels: int = 3,
        latent_channels: int = 16,
        base_width: int = 64,
        width_mults: tuple[int, ...] = (1, 2, 4, 4),
        temporal_down: tuple[bool, ...] = (True, True, False),
        num_res_blocks: int = 2,
        shift_factor: float = 0.0,
        scaling_factor: float = 1.0,
    ):
        super().__init__()
        widths = [base_width * m for m in width_mults]
        args = (in_channels, latent_channels, widths, list(temporal_down), num_res_blocks)
        self.encoder = Encoder(*args)
        self.decoder = Decoder(*args)

    @property
    def temporal_downsample(self) -> int:
        return 2 ** sum(bool(t) for t in self.config.temporal_down)

    @property
    def spatial_downsample(self) -> int:
        return 2 ** (len(self.config.width_mults) - 1)

    def encode_moments(self, video: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """video ``[B, 3, T, H, W]`` -> (mean, logvar clipped to [-30, 20]) ``[B, Z, T', H', W']``."""
        f, s = self.temporal_downsample, self.spatial_downsample
        T, H, W = video.shape[2:]
        if (T - 1) % f or H % s or W % s:
            raise ValueError(f"SoraVideoVAE codes 1 + {f}k frames of sizes divisible by {s}; got {T}x{H}x{W}")
        mean, logvar = self.encoder(video.to(self.dtype)).chunk(2, dim=1)
        return mean, logvar.clamp(-30.0, 20.0)

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video ``[B, 3, T, H, W]`` in [-1, 1] -> normalised latents ``[B, Z, T', H', W']``."""
        return (self.encode_moments(video)[0] - self.config.shift_factor) * self.config.scaling_factor

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """normalised latents ``[B, Z, T', H', W']`` -> video float32 ``[B, 3, T, H, W]`` in [-1, 1]."""
        z = latents.float() / self.config.scaling_factor + self.config.shift_factor
        return self.decoder(z.to(self.dtype)).clamp(-1.0, 1.0)


LUMA_WEIGHTS = (0.299, 0.587, 0.114)


class SoraPixelCodec(ModelMixin, ConfigMixin):
    """The pixel codecs: ``identity`` (latents are the RGB video) or ``luma`` (the Rec.601 luma, 1 channel;
    decoding repeats it into grey RGB). No trained weights."""

    @register_to_config
    def __init__(self, kind: str = "identity"):
        super().__init__()
        if kind not in ("identity", "luma"):
            raise ValueError(f"SoraPixelCodec kind must be identity or luma, got {kind!r}")
        self.register_buffer(
            "luma_weights", torch.tensor(LUMA_WEIGHTS, dtype=torch.float32), persistent=False
        )

    temporal_downsample = 1
    spatial_downsample = 1

    @property
    def latent_channels(self) -> int:
        return 1 if self.config.kind == "luma" else 3

    def encode(self, video: torch.Tensor) -> torch.Tensor:
        """video ``[B, 3, T, H, W]`` -> ``[B, C, T, H, W]`` float32."""
        video = video.float()
        if self.config.kind == "identity":
            return video
        return torch.einsum("bcthw,c->bthw", video, self.luma_weights.float().to(video.device))[:, None]

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        """``[B, C, T, H, W]`` -> video float32 ``[B, 3, T, H, W]`` clipped to [-1, 1]."""
        x = latents.float().clamp(-1.0, 1.0)
        return x if self.config.kind == "identity" else x.repeat(1, 3, 1, 1, 1)
