"""The text-to-video model: a text encoder and a DiT as one NNX module (one parameter tree, one optimizer).

``__call__`` encodes the prompt then denoises; samplers call ``encode_text`` once and ``denoise`` per step.
"""

from __future__ import annotations

import jax
from flax import nnx

from sora_jax.models.dit import DiT, DiTConfig
from sora_jax.text.encoder import TextEncoderConfig, TrainableTextEncoder


class TextToVideo(nnx.Module):
    """``text_encoder`` + ``dit`` (DiT); ``dit_cfg.text_dim == text_cfg.width``.

    The text branch is the TrainableTextEncoder (input: token ids), or, with ``frozen_dim`` > 0, a
    ``TextAdapter`` over the features of a frozen pretrained encoder (input: embeddings ``[B, L, frozen_dim]``,
    computed outside the model: ``sora_jax/text/frozen.py``).
    """

    def __init__(
        self, dit_cfg: DiTConfig, text_cfg: TextEncoderConfig, *, rngs: nnx.Rngs, frozen_dim: int = 0
    ):
        if dit_cfg.text_dim != text_cfg.width:
            raise ValueError(
                f"DiTConfig.text_dim={dit_cfg.text_dim} must equal the text encoder width {text_cfg.width}"
            )
        if frozen_dim:
            from sora_jax.text.frozen import TextAdapter

            self.text_encoder = TextAdapter(
                frozen_dim, text_cfg.width, dtype=text_cfg.dtype, param_dtype=text_cfg.param_dtype, rngs=rngs
            )
        else:
            self.text_encoder = TrainableTextEncoder(text_cfg, rngs=rngs)
        self.dit = DiT(dit_cfg, rngs=rngs)

    @property
    def patch_size(self) -> tuple[int, int, int]:
        """The DiT's (t, h, w) patch over latent frames."""
        return tuple(self.dit.cfg.patch_size)

    def encode_text(self, ids: jax.Array, mask: jax.Array) -> tuple[jax.Array, jax.Array]:
        """ids int32 ``[B, L]`` (or frozen features ``[B, L, F]``), mask bool ``[B, L]`` -> (ctx ``[B, L, D]``,
        mask ``[B, L]``)."""
        return self.text_encoder(ids, mask), mask

    def denoise(
        self, x_t: jax.Array, t: jax.Array, ctx: jax.Array, mask: jax.Array, features: bool = False
    ) -> jax.Array | tuple[jax.Array, jax.Array]:
        """The DiT alone: x_t ``[B, T, H, W, C]``, t ``[B]`` in [0, 1000], ctx ``[B, L, D]`` -> like x_t
        (``features``: with the REPA projector's tokens ``[B, N, repa_dim]``, ``DiT.__call__``)."""
        return self.dit(x_t, t, ctx, mask, features=features)

    def __call__(self, x_t: jax.Array, t: jax.Array, ids: jax.Array, mask: jax.Array) -> jax.Array:
        """x_t ``[B, T, H, W, C]``, t ``[B]``, ids/mask ``[B, L]`` -> model output ``[B, T, H, W, C]``."""
        ctx, mask = self.encode_text(ids, mask)
        return self.denoise(x_t, t, ctx, mask)
