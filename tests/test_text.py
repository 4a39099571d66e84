"""Tokenizer (hash words, BOS, truncation, empty prompt) and the trainable text encoder (masking, shapes)."""

import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sora_jax.parallel.sharding import RULES
from sora_jax.text.encoder import TextEncoder, TextEncoderConfig, Tokenizer, TrainableTextEncoder
from sora_jax.text.tokenizer import BOS_ID, PAD_ID, HashWordTokenizer


def test_split_words_punctuation_hyphens():
    assert HashWordTokenizer.split("A 4 moving Down-Left, then UP!") == [
        "a", "4", "moving", "down", "-", "left", ",", "then", "up", "!"
    ]  # fmt: skip
    assert HashWordTokenizer.split("  ") == []


def test_encode_deterministic_bos_first_and_padding():
    tok = HashWordTokenizer(vocab_size=2048, max_length=8)
    assert isinstance(tok, Tokenizer)
    ids, mask = tok.encode(["a 3 moving left", "The digit 7"])
    assert ids.dtype == np.int32 and mask.dtype == bool and ids.shape == mask.shape == (2, 8)
    assert (ids[:, 0] == BOS_ID).all()
    assert mask[0].tolist() == [True] * 5 + [False] * 3
    assert (ids[~mask] == PAD_ID).all() and (ids[mask] != PAD_ID).all()
    assert ids[0, 1] == 3 + zlib.crc32(b"a") % (2048 - 3)
    assert ids[0, 1] != ids[1, 1]
    # stable across instances and case-insensitive
    ids2, _ = HashWordTokenizer(2048, 8).encode(["A 3 MOVING LEFT", "the digit 7"])
    np.testing.assert_array_equal(ids, ids2)
    words = mask.copy()
    words[:, 0] = False
    assert (ids[words] < 2048).all() and (ids[words] >= 3).all()


def test_truncation_unknown_text_and_empty_prompt():
    tok = HashWordTokenizer(vocab_size=50, max_length=4)
    ids, mask = tok.encode(["one two three four five six", "ünïcödé ☃ 日本語", ""])
    assert mask[0].all() and ids[0, 0] == BOS_ID and len(set(ids[0, 1:].tolist()) - {0, 1, 2}) >= 1
    assert ids[1, 0] == BOS_ID and mask[1].sum() >= 2
    assert mask[2].tolist() == [True, False, False, False] and ids[2].tolist() == [BOS_ID, 0, 0, 0]
    null_ids, null_mask = tok.null_ids
    np.testing.assert_array_equal(null_ids, ids[2])
    np.testing.assert_array_equal(null_mask, mask[2])
    with pytest.raises(TypeError):
        tok.encode("not a list")
    with pytest.raises(ValueError):
        HashWordTokenizer(vocab_size=3, max_length=4)


def test_trainable_text_encoder_masking_and_shapes():
    cfg = TextEncoderConfig(vocab_size=64, max_length=8, width=32, depth=2, num_heads=2)
    enc = TrainableTextEncoder(cfg, rngs=nnx.Rngs(0))
    assert isinstance(enc, TextEncoder) and enc.output_dim == 32
    ids, mask = enc.tokenizer.encode(["a 3 moving left", "a 7"])
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    fwd = jax.jit(lambda i, m: enc(i, m))
    out = fwd(ids, mask)
    assert out.shape == (2, 8, 32) and out.dtype == jnp.float32
    assert float(jnp.abs(out[~mask]).max()) == 0.0  # zero at padding
    assert float(jnp.abs(out[mask]).min(initial=1.0)) >= 0.0 and float(jnp.abs(out[mask]).max()) > 0
    # padding ids beyond the mask do not change the real positions
    ids_junk = jnp.where(mask, ids, 17)
    np.testing.assert_allclose(np.asarray(fwd(ids_junk, mask)), np.asarray(out), atol=1e-6)
    # a changed word changes the features (RoPE: position matters; attention: context matters)
    ids2 = ids.at[0, 2].set((ids[0, 2] + 1) % 64)
    assert float(jnp.abs(fwd(ids2, mask)[0, 1] - out[0, 1]).max()) > 1e-5
    # logical names on every parameter, from the rules table
    names = set(dict(RULES))
    for path, var in nnx.to_flat_state(nnx.state(enc, nnx.Param)):
        sharding = var.get_metadata().get("out_sharding")
        assert sharding is not None and set(sharding) <= names and len(sharding) == var.value.ndim, path


def test_text_encoder_bf16():
    cfg = TextEncoderConfig(vocab_size=64, max_length=6, width=32, depth=1, num_heads=4, dtype="bfloat16")
    enc = TrainableTextEncoder(cfg, rngs=nnx.Rngs(1))
    ids, mask = enc.tokenizer.encode(["hello world"])
    out = enc(jnp.asarray(ids), jnp.asarray(mask))
    assert out.dtype == jnp.bfloat16 and bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
