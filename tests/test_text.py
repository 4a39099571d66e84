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


def _np_text_encoder(enc: TrainableTextEncoder, ids: np.ndarray, mask: np.ndarray) -> np.ndarray:
    """TrainableTextEncoder in float64 numpy: embedding; per layer x += attention(RMSNorm(x)) (key-masked,
    rotate-half RoPE on q and k, softmax(q k / sqrt(H))) and x += fc2(gelu_tanh(fc1(RMSNorm(x)))); a final
    RMSNorm (eps 1e-6, learned scale); zero at padding."""
    cfg = enc.cfg
    f64 = lambda v: np.asarray(v[...], np.float64)  # noqa: E731
    H = cfg.width // cfg.num_heads
    angles = np.arange(ids.shape[1])[:, None] * cfg.rope_theta ** (-np.arange(H // 2) / (H // 2))
    cos, sin = np.cos(angles)[None, :, None], np.sin(angles)[None, :, None]

    def rope(q):
        q1, q2 = q[..., : H // 2], q[..., H // 2 :]
        return np.concatenate([q1 * cos - q2 * sin, q2 * cos + q1 * sin], axis=-1)

    def rms(x, scale):
        return x / np.sqrt(np.mean(x**2, axis=-1, keepdims=True) + 1e-6) * scale

    def gelu(x):
        return 0.5 * x * (1 + np.tanh(np.sqrt(2 / np.pi) * (x + 0.044715 * x**3)))

    x = f64(enc.embed.embedding)[ids]
    layer, attn, mlp = enc.layers, enc.layers.attn, enc.layers.mlp
    for i in range(cfg.depth):
        h = rms(x, f64(layer.norm1.scale)[i])
        q, k, v = (np.einsum("bnd,dkh->bnkh", h, f64(w)[i]) + f64(b)[i] for w, b in
                   ((attn.wq, attn.bq), (attn.wk, attn.bk), (attn.wv, attn.bv)))  # fmt: skip
        logits = np.einsum("bnkh,bmkh->bknm", rope(q), rope(k)) / np.sqrt(H)
        logits = np.where(mask[:, None, None, :], logits, -np.inf)
        probs = np.exp(logits - logits.max(-1, keepdims=True))
        probs /= probs.sum(-1, keepdims=True)
        o = np.einsum("bknm,bmkh->bnkh", probs, v)
        x = x + np.einsum("bnkh,khd->bnd", o, f64(attn.wo)[i]) + f64(attn.bo)[i]
        h = rms(x, f64(layer.norm2.scale)[i])
        h = gelu(h @ f64(mlp.fc1.kernel)[i] + f64(mlp.fc1.bias)[i])
        x = x + h @ f64(mlp.fc2.kernel)[i] + f64(mlp.fc2.bias)[i]
    return rms(x, f64(enc.final_norm.scale)) * mask[..., None]


def test_trainable_text_encoder_masking_and_shapes():
    cfg = TextEncoderConfig(vocab_size=64, max_length=8, width=32, depth=2, num_heads=2)
    enc = TrainableTextEncoder(cfg, rngs=nnx.Rngs(0))
    assert isinstance(enc, TextEncoder) and enc.output_dim == 32
    # every parameter perturbed, so biases and norm scales (zeros and ones at init) count in the reference
    rng = np.random.default_rng(1)
    perturb = lambda p: p + np.float32(0.1) * rng.standard_normal(p.shape, np.float32)  # noqa: E731
    nnx.update(enc, jax.tree.map(perturb, nnx.state(enc, nnx.Param)))
    ids, mask = enc.tokenizer.encode(["a 3 moving left", "a 7"])
    ref = _np_text_encoder(enc, ids, mask)
    ids, mask = jnp.asarray(ids), jnp.asarray(mask)
    fwd = jax.jit(lambda i, m: enc(i, m))
    out = fwd(ids, mask)
    assert out.shape == (2, 8, 32) and out.dtype == jnp.float32
    assert float(jnp.abs(out[~mask]).max()) == 0.0  # zero at padding
    np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-5)
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
