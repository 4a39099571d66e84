"""Tokenizers that need no downloads: ``HashWordTokenizer`` maps words to stable ids through ``zlib.crc32``.

Ids: 0 = pad, 1 = BOS (always first, so a mask is never empty), 2 = EOS (reserved, not emitted: the mask marks
the end), words -> ``3 + crc32 % (vocab - 3)``. The unconditional branch of classifier-free guidance is the
empty prompt, ``encode([""])``: BOS then padding.
"""

from __future__ import annotations

import re
import zlib
from collections.abc import Sequence

import numpy as np

PAD_ID, BOS_ID, EOS_ID = 0, 1, 2
NUM_SPECIAL = 3

# words (letters/digits, apostrophes inside), or any single punctuation mark; "up-left" -> "up", "-", "left"
_TOKEN_RE = re.compile(r"[a-z0-9]+(?:'[a-z0-9]+)*|[^\sa-z0-9]")


class HashWordTokenizer:
    """Lowercases, splits words and punctuation, hashes words to ids; pads to ``max_length``."""

    def __init__(self, vocab_size: int, max_length: int):
        if vocab_size <= NUM_SPECIAL:
            raise ValueError(f"HashWordTokenizer: vocab_size must be > {NUM_SPECIAL}, got {vocab_size}")
        if max_length < 2:
            raise ValueError(
                f"HashWordTokenizer: max_length must be >= 2 (BOS + one token), got {max_length}"
            )
        self.vocab_size = int(vocab_size)
        self.max_length = int(max_length)

    @staticmethod
    def split(text: str) -> list[str]:
        """'A 4 moving down-left.' -> ['a', '4', 'moving', 'down', '-', 'left', '.']."""
        return _TOKEN_RE.findall(text.lower())

    def word_id(self, word: str) -> int:
        return NUM_SPECIAL + zlib.crc32(word.encode("utf-8")) % (self.vocab_size - NUM_SPECIAL)

    def encode_one(self, text: str) -> list[int]:
        """Unpadded ids: BOS then the words, truncated to ``max_length`` (BOS always kept)."""
        ids = [BOS_ID] + [self.word_id(w) for w in self.split(text)]
        return ids[: self.max_length]

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """texts (B strings) -> ids int32 ``[B, L]``, mask bool ``[B, L]`` with ``L = max_length``."""
        if isinstance(texts, str):
            raise TypeError("HashWordTokenizer.encode wants a list of strings, got one string")
        ids = np.full((len(texts), self.max_length), PAD_ID, np.int32)
        mask = np.zeros((len(texts), self.max_length), bool)
        for i, text in enumerate(texts):
            row = self.encode_one(str(text))
            ids[i, : len(row)] = row
            mask[i, : len(row)] = True
        return ids, mask

    @property
    def null_ids(self) -> tuple[np.ndarray, np.ndarray]:
        """The empty prompt (classifier-free guidance's unconditional branch): ids, mask ``[L]`` each."""
        ids, mask = self.encode([""])
        return ids[0], mask[0]
