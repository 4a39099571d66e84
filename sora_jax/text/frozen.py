"""Frozen pretrained text encoders (MiniLM, T5) as the DiT's conditioning, with embedding caches.

A frozen encoder is used like a tokenizer whose "ids" are already features: ``encode(texts)`` returns
(embeddings float32 ``[B, L, D]``, mask bool ``[B, L]``), so the data pipeline, the train step and the
samplers take it where they take the trainable encoder's tokenizer, and the model's text branch is a small
trainable adapter (``TextAdapter``: RMSNorm + linear to the DiT's text width) instead of a transformer.

Owns:
- ``FrozenTextEmbedder``: loads ``minilm`` (the bundled all-MiniLM-L6-v2) or ``t5`` (a T5 / UMT5 folder, its
  tokenizer there or in ``tokenizer_path``, as diffusers pipelines keep it in ``tokenizer/``),
  runs it jitted in padded batches (its weights an argument, not compiled-in constants), keeps an in-memory
  LRU of per-prompt embeddings (sampling asks for the same prompts again and again) and warns once per
  prompt that is truncated to ``max_length``. With ``clauses``, each clause of a prompt (``split_clauses``) is
  encoded alone and their token states are packed one after the other (so a subject's states carry only its
  own clause), a measured ablation (benchmarks/SPEEDRUN.md). With ``sentences`` = S > 0, S more rows follow
  the ``max_length`` token rows: the mean-pooled states of each clause encoded alone (the sentence embedding
  all-MiniLM-L6-v2 was trained to give; with or without ``clauses``, whose token rows are the whole
  prompt's without it), so one row carries a subject together with what it does.
  ``encode([""])`` is the classifier-free-guidance null embedding.
- ``EmbeddingTable``: caption -> embedding rows computed once for a whole dataset (float16 + masks, saved
  as ``.npz`` by ``data_pipelines/encode_text.py`` or the trainer), picklable and cheap, so grain worker
  processes look embeddings up instead of running an encoder.
"""

from __future__ import annotations

import collections
import hashlib
import logging
import os
import re
import threading
from collections.abc import Sequence
from pathlib import Path

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx

from sora_jax.choices import FROZEN_TEXT_ENCODERS
from sora_jax.models.layers import RMSNorm, as_dtype

log = logging.getLogger("sora_jax.text")

FROZEN_ENCODERS = tuple(k.value for k in FROZEN_TEXT_ENCODERS)
LENGTH_STEP = 8  # the encoder's input is cut to a multiple of this many tokens (``_encode``)

# Where ``clauses`` splits a prompt: a conjunction (with its comma or semicolon) followed by a determiner, i.e.
# where a new subject starts ("a 3 moves left while a 5 moves up"; not "up and to the left").
CLAUSE_BOUNDARY = re.compile(
    r"\s*[,;]?\s*\b(?:and|while|as|next to|beside|meanwhile)\s+(?=(?:a|an|the)\b)", re.IGNORECASE
)


def split_clauses(text: str) -> list[str]:
    """A prompt's clauses at ``CLAUSE_BOUNDARY``: "a 3 moves left while a 5 moves up" -> ["a 3 moves left",
    "a 5 moves up"]; a prompt without a boundary (or empty) -> [text]."""
    return [c for c in CLAUSE_BOUNDARY.split(text) if c.strip()] or [text]


def _load(kind: str, path: str, dtype, tokenizer_path: str = ""):
    if kind == "minilm":
        from sora_jax.text.minilm import load_minilm

        return load_minilm(path or None, dtype=dtype)
    if kind == "t5":
        if not path:
            raise ValueError(
                "config.text.encoder = 't5' needs config.text.path (a Hugging Face T5/UMT5 folder)"
            )
        from sora_jax.text.t5 import load_t5_encoder

        return load_t5_encoder(path, dtype=dtype, tokenizer_path=tokenizer_path or None)
    raise ValueError(f"unknown frozen text encoder {kind!r}; known: {FROZEN_ENCODERS}")


class FrozenTextEmbedder:
    """texts -> (float32 ``[B, L, D]``, bool ``[B, L]``) from a frozen pretrained encoder, LRU-cached.

    ``params`` holds the encoder's weights; ``encode_fn(params, ids int32 [B, L], mask bool [B, L])`` is the
    jitted encoder (features ``[B, L, D]`` before masking)."""

    def __init__(
        self,
        kind: str,
        path: str = "",
        *,
        max_length: int,
        dtype: str = "float32",
        cache_size: int = 4096,
        batch_size: int = 64,
        tokenizer_path: str = "",
        clauses: bool = False,
        sentences: int = 0,
    ):
        self.kind, self.path, self.max_length = kind, path, int(max_length)
        self.clauses = bool(clauses)
        if int(sentences) < 0:
            raise ValueError(f"FrozenTextEmbedder: sentences must be >= 0, got {sentences}")
        self.sentences = int(sentences)
        module, self.tokenizer = _load(kind, path, as_dtype(dtype), tokenizer_path)
        graphdef, self.params = nnx.split(module)
        # the frozen weights are an argument, never compiled in as constants
        self.encode_fn = jax.jit(lambda params, ids, mask: _features(nnx.merge(graphdef, params)(ids, mask)))
        probe = jax.eval_shape(
            self.encode_fn,
            self.params,
            jax.ShapeDtypeStruct((1, self.max_length), jnp.int32),
            jax.ShapeDtypeStruct((1, self.max_length), jnp.bool_),
        )
        self.output_dim = int(probe.shape[-1])
        self.batch_size = int(batch_size)
        self._cache: collections.OrderedDict[str, tuple[np.ndarray, np.ndarray]] = collections.OrderedDict()
        self._cache_size = int(cache_size)
        self._warned: set[str] = set()
        self._lock = threading.Lock()

    @property
    def name(self) -> str:
        """Identifies the encoder and its settings (cache files carry it): ``embedder_name``."""
        return embedder_name(self.kind, self.path, self.max_length, self.clauses, self.sentences)

    def _tokenize(self, texts: list[str], warn: bool = True) -> tuple[np.ndarray, np.ndarray]:
        out = self.tokenizer.encode(texts, self.max_length)
        ids, mask = out[0], out[1]
        for text, m in zip(texts, np.asarray(mask)):
            if warn and m.all() and text not in self._warned and self._is_truncated(text):
                self._warned.add(text)
                log.warning("prompt truncated to %d tokens: %.80r", self.max_length, text)
        return np.asarray(ids, np.int32), np.asarray(mask, bool)

    def _is_truncated(self, text: str) -> bool:
        return int(self.tokenizer.encode([text], self.max_length)[2]) > 0  # (ids, mask, truncated count)

    def _compute(self, texts: list[str], warn: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """``_encode``, or with ``clauses`` each text's clauses encoded alone, their unmasked token states
        packed in order (truncated to ``max_length``); then the ``sentences`` rows, each clause's mean-pooled
        states (with or without ``clauses``): ``[B, max_length + S, D]``."""
        if not self.clauses and not self.sentences:
            return self._encode(texts, warn)
        parts = [split_clauses(t) for t in texts]
        emb, mask = self._encode([c for p in parts for c in p], warn)
        if not self.clauses:  # token rows of the whole texts; the clauses for the sentence rows
            whole, whole_mask = self._encode(texts, warn)
        length = self.max_length + self.sentences
        out = np.zeros((len(texts), length, emb.shape[-1]), np.float32)
        out_mask = np.zeros((len(texts), length), bool)
        i = 0
        for b, p in enumerate(parts):
            rows = range(i, i + len(p))
            i += len(p)
            if self.clauses:
                packed = np.concatenate([emb[r][mask[r]] for r in rows])[: self.max_length]
                out[b, : len(packed)], out_mask[b, : len(packed)] = packed, True
            else:
                out[b, : self.max_length], out_mask[b, : self.max_length] = whole[b], whole_mask[b]
            for j, r in enumerate(rows[: self.sentences]):  # mean over the clause's tokens (padding is zero)
                out[b, self.max_length + j] = emb[r].sum(0) / max(int(mask[r].sum()), 1)
                out_mask[b, self.max_length + j] = mask[r].any()
        return out, out_mask

    def _encode(self, texts: list[str], warn: bool = True) -> tuple[np.ndarray, np.ndarray]:
        """Runs the encoder in chunks of ``batch_size`` rows, each padded to a power of two, and cut to the
        chunk's longest text rounded up to ``LENGTH_STEP`` tokens (few compiles; the keys are masked, so the
        padding's length does not change the states of real tokens)."""
        ids, mask = self._tokenize(texts, warn)
        out = np.zeros((*ids.shape, self.output_dim), np.float32)
        for i in range(0, len(texts), self.batch_size):
            ci, cm = ids[i : i + self.batch_size], mask[i : i + self.batch_size]
            k = len(ci)
            rows = min(self.batch_size, 1 << (k - 1).bit_length())
            if rows > k:  # pad with copies of the first row (an all-padding row could make NaNs)
                ci = np.concatenate([ci, np.repeat(ci[:1], rows - k, 0)])
                cm = np.concatenate([cm, np.repeat(cm[:1], rows - k, 0)])
            length = min(self.max_length, -(-max(int(cm.sum(1).max()), 1) // LENGTH_STEP) * LENGTH_STEP)
            states = self.encode_fn(self.params, ci[:, :length], cm[:, :length])
            out[i : i + k, :length] = np.asarray(states, np.float32)[:k]
        return out * mask[:, :, None], mask

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """B strings -> embeddings float32 ``[B, L, D]`` (zero at padding), mask bool ``[B, L]``."""
        texts = [str(t) for t in texts]
        with self._lock:
            missing = list(dict.fromkeys(t for t in texts if t not in self._cache))
            if missing:
                emb, mask = self._compute(missing)
                for t, e, m in zip(missing, emb, mask):
                    self._cache[t] = (e, m)
                    if len(self._cache) > self._cache_size:
                        self._cache.popitem(last=False)
            rows = []
            for t in texts:
                if t in self._cache:
                    self._cache.move_to_end(t)
                    rows.append(self._cache[t])
                else:  # evicted within this call (more distinct texts than the cache holds)
                    e, m = self._compute([t])
                    rows.append((e[0], m[0]))
        return np.stack([r[0] for r in rows]), np.stack([r[1] for r in rows])

    def table(self, captions: Sequence[str], *, progress: bool = False) -> EmbeddingTable:
        """The ``EmbeddingTable`` of the distinct ``captions`` (plus the empty prompt)."""
        from tqdm.auto import tqdm

        unique = sorted(set(map(str, captions)) | {""})
        # encoded shortest first, so that each chunk is cut to about its own length (``_encode``)
        _, mask, truncated = self.tokenizer.encode(unique, self.max_length)  # (ids, mask, truncated count)
        order = np.argsort(np.asarray(mask).sum(1), kind="stable")
        embs, masks = [], []
        chunk = max(self.batch_size, 1) * 4
        for i in tqdm(
            range(0, len(unique), chunk), desc=f"embed captions ({self.kind})", disable=not progress
        ):
            texts = [unique[j] for j in order[i : i + chunk]]
            e, m = self._compute(texts, warn=False)
            embs.append(e.astype(np.float16))
            masks.append(m)
        back = np.argsort(order)  # rows in the order of ``unique`` again
        if truncated:  # one line for the whole table
            log.warning(
                "%d of %d distinct captions are longer than %d tokens and were truncated (raise "
                "config.text.max_length)",
                truncated,
                len(unique),
                self.max_length,
            )
        return EmbeddingTable(unique, np.concatenate(embs)[back], np.concatenate(masks)[back], name=self.name)


def _features(out) -> jax.Array:
    """Token states of an encoder's output (a bare array, a (states, pooled) pair, or a dict)."""
    if isinstance(out, dict):
        return out.get("last_hidden_state", out.get("token_states"))
    if isinstance(out, tuple | list):
        return out[0]
    return out


class EmbeddingTable:
    """Precomputed caption embeddings: ``encode(texts)`` looks rows up (KeyError for an unknown caption)."""

    def __init__(self, captions: Sequence[str], emb: np.ndarray, mask: np.ndarray, *, name: str):
        if emb.ndim != 3 or mask.shape != emb.shape[:2] or len(captions) != len(emb):
            raise ValueError(f"EmbeddingTable: {len(captions)} captions, emb {emb.shape}, mask {mask.shape}")
        self.captions = list(captions)
        self.index = {c: i for i, c in enumerate(self.captions)}
        self.emb, self.mask, self.name = emb, mask.astype(bool), name
        self.output_dim = int(emb.shape[-1])
        self.max_length = int(emb.shape[1])

    def encode(self, texts: Sequence[str]) -> tuple[np.ndarray, np.ndarray]:
        """B captions -> float32 ``[B, L, D]``, bool ``[B, L]``."""
        try:
            rows = [self.index[str(t)] for t in texts]
        except KeyError as e:
            raise KeyError(
                f"caption {e.args[0]!r} is not in the embedding table ({self.name}); rebuild it with "
                "data_pipelines/encode_text.py"
            ) from None
        return self.emb[rows].astype(np.float32), self.mask[rows]

    def save(self, path: str | Path) -> Path:
        """Writes ``path`` (.npz) atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(path.name + ".tmp.npz")
        np.savez(
            tmp,
            captions=np.asarray(self.captions, dtype=object),
            emb=self.emb,
            mask=self.mask,
            name=self.name,
        )
        os.replace(tmp, path)
        return path

    @classmethod
    def load(cls, path: str | Path) -> EmbeddingTable:
        with np.load(path, allow_pickle=True) as z:
            return cls(list(z["captions"]), z["emb"], z["mask"], name=str(z["name"]))


def embedder_name(kind: str, path: str, max_length: int, clauses: bool = False, sentences: int = 0) -> str:
    """What identifies a frozen encoder and its settings (``FrozenTextEmbedder.name``), known without loading it."""
    name = f"{kind}:{os.path.abspath(path) if path else 'bundled'}:L{int(max_length)}"
    return name + (":clauses" if clauses else "") + (f":S{int(sentences)}" if sentences else "")


def table_file(folder: str | Path, embedder: FrozenTextEmbedder, split: str) -> Path:
    """Where a dataset's table for ``embedder`` lives: ``<folder>/text_emb-<kind>-<hash>-<split>.npz``."""
    return table_file_for(
        folder, embedder.kind, embedder.path, embedder.max_length, split, embedder.clauses, embedder.sentences
    )


def table_file_for(
    folder: str | Path,
    kind: str,
    path: str,
    max_length: int,
    split: str,
    clauses: bool = False,
    sentences: int = 0,
) -> Path:
    """``table_file`` of the encoder (kind, path, max_length, clauses, sentences), without loading it."""
    digest = hashlib.sha1(embedder_name(kind, path, max_length, clauses, sentences).encode()).hexdigest()[:10]
    return Path(folder) / f"text_emb-{kind}-{digest}-{split}.npz"


class TextAdapter(nnx.Module):
    """Frozen features ``[B, L, in_dim]`` -> the DiT's text width: RMSNorm then a linear map (trainable)."""

    def __init__(self, in_dim: int, width: int, *, dtype="float32", param_dtype="float32", rngs: nnx.Rngs):
        self.output_dim = width
        self.norm = RMSNorm(in_dim, param_dtype=param_dtype, rngs=rngs)
        self.proj = nnx.Linear(
            in_dim,
            width,
            kernel_init=nnx.with_partitioning(nnx.initializers.lecun_normal(), (None, "embed")),
            dtype=as_dtype(dtype),
            param_dtype=as_dtype(param_dtype),
            rngs=rngs,
        )

    def __call__(self, emb: jax.Array, mask: jax.Array) -> jax.Array:
        """emb ``[B, L, in_dim]``, mask ``[B, L]`` -> ``[B, L, width]`` (zero at padding)."""
        return self.proj(self.norm(emb)) * mask[..., None].astype(emb.dtype)
