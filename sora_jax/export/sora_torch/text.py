"""The text side as diffusers models: ``SoraTextAdapter`` (RMSNorm + Linear over a frozen encoder's token
states, ``sora_jax/text/frozen.py``), ``SoraTextEncoder`` (the trainable encoder of ``sora_jax/text/encoder.py``:
embedding, 1D RoPE, pre-norm layers, final RMSNorm) and its tokenizer ``HashWordTokenizer`` (pure Python, the
same ids as ``sora_jax/text/tokenizer.py``).
"""

from __future__ import annotations

import json
import os
import re
import zlib
from collections.abc import Sequence

import torch
from diffusers.configuration_utils import ConfigMixin, register_to_config
from diffusers.models.modeling_utils import ModelMixin
from torch import nn

from .layers import Attention, Mlp, RMSNorm, rope_1d_angles


class SoraTextAdapter(ModelMixin, ConfigMixin):
    """``forward(states [B, L, in_dim], mask [B, L]) -> [B, L, width]`` (zero at padding)."""

    @register_to_config
    def __init__(self, in_dim: int = 384, width: int = 128):
        super().__init__()
        self.norm = RMSNorm(in_dim)
        self.proj = nn.Linear(in_dim, width)

    def forward(self, states: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        states = states.to(self.proj.weight.dtype)
        return self.proj(self.norm(states)) * mask[..., None].to(states.dtype)


class TextLayer(nn.Module):
    def __init__(self, width: int, num_heads: int, mlp_dim: int):
        super().__init__()
        self.norm1 = RMSNorm(width)
        self.attn = Attention(width, num_heads, qk_norm=False)
        self.norm2 = RMSNorm(width)
        self.mlp = Mlp(width, mlp_dim)

    def forward(self, x, mask, rope):
        x = x + self.attn(self.norm1(x), mask=mask, rope=rope)
        return x + self.mlp(self.norm2(x))


class SoraTextEncoder(ModelMixin, ConfigMixin):
    """``forward(ids int [B, L], mask bool [B, L]) -> [B, L, width]`` (zero at padding)."""

    @register_to_config
    def __init__(
        self,
        vocab_size: int = 2048,
        max_length: int = 24,
        width: int = 128,
        depth: int = 2,
        num_heads: int = 4,
        mlp_ratio: float = 4.0,
        rope_theta: float = 10000.0,
    ):
        super().__init__()
        self.embed = nn.Embedding(vocab_size, width)
        self.layers = nn.ModuleList(
            [TextLayer(width, num_heads, int(width * mlp_ratio)) for _ in range(depth)]
        )
        self.final_norm = RMSNorm(width)

    def forward(self, ids: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        cfg = self.config
        mask = mask.bool()
        x = self.embed(ids.long())
        rope = rope_1d_angles(ids.shape[1], cfg.width // cfg.num_heads, cfg.rope_theta, device=x.device)
        for layer in self.layers:
            x = layer(x, mask, rope)
        return self.final_norm(x) * mask[..., None].to(x.dtype)


PAD_ID, BOS_ID, NUM_SPECIAL = 0, 1, 3
_TOKEN_RE = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*|[^\sa-z0-9]")
TOKENIZER_FILE = "tokenizer_config.json"


class HashWordTokenizer:
    """Lowercased words and punctuation hashed to ids (``3 + crc32 % (vocab - 3)``), BOS first, padded with 0
    to ``max_length``; the empty prompt is BOS alone. ``__call__(texts) -> (ids int64 [B, L], mask bool [B, L])``."""

    def __init__(self, vocab_size: int, max_length: int):
        self.vocab_size, self.max_length = int(vocab_size), int(max_length)

    def encode_one(self, text: str) -> list[int]:
        words = _TOKEN_RE.findall(text.lower())
        ids = [BOS_ID] + [
            NUM_SPECIAL + zlib.crc32(w.encode("utf-8")) % (self.vocab_size - NUM_SPECIAL) for w in words
        ]
        return ids[: self.max_length]

    def __call__(self, texts: Sequence[str]) -> tuple[torch.Tensor, torch.Tensor]:
        if isinstance(texts, str):
            texts = [texts]
        ids = torch.full((len(texts), self.max_length), PAD_ID, dtype=torch.long)
        mask = torch.zeros((len(texts), self.max_length), dtype=torch.bool)
        for i, text in enumerate(texts):
            row = self.encode_one(str(text))
            ids[i, : len(row)] = torch.tensor(row)
            mask[i, : len(row)] = True
        return ids, mask

    def save_pretrained(self, folder: str | os.PathLike) -> None:
        os.makedirs(folder, exist_ok=True)
        config = {"tokenizer_class": "HashWordTokenizer", "vocab_size": self.vocab_size}
        config["model_max_length"] = self.max_length
        with open(os.path.join(folder, TOKENIZER_FILE), "w") as f:
            json.dump(config, f, indent=1)

    @classmethod
    def from_pretrained(cls, folder: str | os.PathLike, **_) -> HashWordTokenizer:
        with open(os.path.join(folder, TOKENIZER_FILE)) as f:
            config = json.load(f)
        return cls(config["vocab_size"], config["model_max_length"])
