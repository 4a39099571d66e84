"""PyTorch twins of sora_jax's models, written by ``sora-jax export`` next to the weights.

Imports torch, diffusers, transformers (frozen text encoders only) and numpy, never JAX:

    import sys; sys.path.insert(0, "DIR")
    from sora_torch import SoraPipeline
    pipe = SoraPipeline.from_pretrained("DIR")
    frames = pipe("a 3 moves left", num_inference_steps=32, guidance_scale=6.0).frames   # [B, T, H, W, 3]
"""

from diffusers import ModelMixin  # diffusers' loader finds a component's base class in its library

from .text import HashWordTokenizer, SoraTextAdapter, SoraTextEncoder
from .transformer import SoraTransformer3DModel
from .vae import SoraPixelCodec, SoraVideoVAE

__all__ = [
    "HashWordTokenizer",
    "ModelMixin",
    "SoraPipeline",
    "SoraPixelCodec",
    "SoraTextAdapter",
    "SoraTextEncoder",
    "SoraTransformer3DModel",
    "SoraVideoVAE",
]


def __getattr__(name):
    if name == "SoraPipeline":
        from .pipeline import SoraPipeline

        return SoraPipeline
    raise AttributeError(name)
