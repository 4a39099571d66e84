"""Attention dispatch, 3D RoPE, patchify and the timestep embedding against independent numpy references."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from sora_jax.models import layers


def _np_attention(q, k, v, key_mask=None):
    q, k, v = (np.asarray(a, np.float64) for a in (q, k, v))
    logits = np.einsum("bnkh,bmkh->bknm", q, k) / math.sqrt(q.shape[-1])
    if key_mask is not None:
        logits = np.where(key_mask[:, None, None, :], logits, -np.inf)
    logits -= logits.max(-1, keepdims=True)
    p = np.exp(logits)
    p /= p.sum(-1, keepdims=True)
    return np.einsum("bknm,bmkh->bnkh", p, v)


def _qkv(seed=0, B=2, N=5, M=7, K=3, H=8):
    r = np.random.default_rng(seed)
    return (r.standard_normal((B, N, K, H)), r.standard_normal((B, M, K, H)), r.standard_normal((B, M, K, H)))


@pytest.mark.parametrize("impl", ["xla", "reference", None])
def test_attention_matches_numpy(impl):
    q, k, v = _qkv()
    out = layers.dot_product_attention(*(jnp.asarray(a, jnp.float32) for a in (q, k, v)), implementation=impl)
    np.testing.assert_allclose(np.asarray(out), _np_attention(q, k, v), atol=1e-5)


@pytest.mark.parametrize("impl", ["xla", "reference"])
def test_attention_key_mask(impl):
    q, k, v = _qkv(1)
    mask = np.ones((2, 7), bool)
    mask[0, 4:] = False
    mask[1, [1, 5]] = False
    args = [jnp.asarray(a, jnp.float32) for a in (q, k, v)]
    out = layers.dot_product_attention(*args, mask=jnp.asarray(mask), implementation=impl)
    np.testing.assert_allclose(np.asarray(out), _np_attention(q, k, v, mask), atol=1e-5)
    # changing a masked key/value changes nothing
    k2, v2 = k.copy(), v.copy()
    k2[0, 5] += 100.0
    v2[1, 1] -= 50.0
    out2 = layers.dot_product_attention(
        args[0], jnp.asarray(k2, jnp.float32), jnp.asarray(v2, jnp.float32), mask=mask, implementation=impl
    )
    np.testing.assert_array_equal(np.asarray(out), np.asarray(out2))
    # a full [B, K, N, M] mask equal to the key mask gives the same answer
    full = np.broadcast_to(mask[:, None, None, :], (2, 3, 5, 7))
    out3 = layers.dot_product_attention(*args, mask=jnp.asarray(full), implementation=impl)
    np.testing.assert_allclose(np.asarray(out3), np.asarray(out), atol=1e-6)


def test_prefix_key_attention_lengths_match_masked_numpy():
    """The length form that the cuDNN path takes for a key mask, run through XLA, against numpy."""
    q, k, v = _qkv(3, M=9)
    mask = np.zeros((2, 9), bool)
    mask[0, :4] = True
    mask[1, :1] = True  # one key: the empty prompt's BOS
    args = [jnp.asarray(a, jnp.float32) for a in (q, k, v)]
    out = layers.prefix_key_attention(*args, jnp.asarray(mask), implementation="xla")
    np.testing.assert_allclose(np.asarray(out), _np_attention(q, k, v, mask), atol=1e-5)


def test_attention_rejects_bad_inputs():
    q, k, v = (jnp.asarray(a, jnp.float32) for a in _qkv())
    with pytest.raises(ValueError, match="implementation"):
        layers.dot_product_attention(q, k, v, implementation="flash9")
    with pytest.raises(ValueError, match="cudnn"):
        layers.dot_product_attention(q, k, v, implementation="cudnn")  # float32
    with pytest.raises(ValueError, match="bool"):
        layers.dot_product_attention(q, k, v, mask=jnp.ones((2, 7), jnp.int32))


def test_attention_bf16_xla():
    q, k, v = _qkv(2)
    out = layers.dot_product_attention(*(jnp.asarray(a, jnp.bfloat16) for a in (q, k, v)))
    assert out.dtype == jnp.bfloat16
    np.testing.assert_allclose(np.asarray(out, np.float32), _np_attention(q, k, v), atol=5e-2)


# ------------------------------------------------------------------------------------------------- RoPE


def _np_rope(x, cos, sin):
    """Independent complex-number formulation: pair (i, i + H/2) as a + ib, multiply by e^{i angle}."""
    half = x.shape[-1] // 2
    z = x[..., :half] + 1j * x[..., half:]
    rot = z * (cos + 1j * sin)[None, :, None, :]
    return np.concatenate([rot.real, rot.imag], axis=-1)


def test_rope_split_and_angles():
    assert layers.rope_split(64) == (12, 10, 10)
    assert layers.rope_split(16) == (4, 2, 2)
    assert sum(layers.rope_split(96)) == 48
    cos, sin = layers.rope_3d_angles(2, 3, 4, 16)
    assert cos.shape == sin.shape == (24, 8)
    np.testing.assert_allclose(np.asarray(cos) ** 2 + np.asarray(sin) ** 2, 1.0, atol=1e-6)
    # token (t=1, h=2, w=3) is row 1*12 + 2*4 + 3; pair i of the t block rotates by t * theta^(-i/4)
    ang = np.arctan2(np.asarray(sin), np.asarray(cos))
    row = 1 * 12 + 2 * 4 + 3
    np.testing.assert_allclose(ang[row, :4], 1.0 * 10000.0 ** (-np.arange(4) / 4), atol=1e-6)
    np.testing.assert_allclose(ang[row, 4:6], 2.0 * 10000.0 ** (-np.arange(2) / 2), atol=1e-6)
    np.testing.assert_allclose(
        ang[row, 6:8], np.angle(np.exp(3j * 10000.0 ** (-np.arange(2) / 2))), atol=1e-5
    )
    with pytest.raises(ValueError):
        layers.rope_split(7)


def test_apply_rope_matches_numpy():
    r = np.random.default_rng(0)
    x = r.standard_normal((2, 24, 3, 16)).astype(np.float32)
    cos, sin = layers.rope_3d_angles(2, 3, 4, 16)
    out = layers.apply_rope(jnp.asarray(x), cos, sin)
    np.testing.assert_allclose(np.asarray(out), _np_rope(x, np.asarray(cos), np.asarray(sin)), atol=1e-5)
    # rotation preserves norms
    np.testing.assert_allclose(
        np.linalg.norm(np.asarray(out), axis=-1), np.linalg.norm(x, axis=-1), rtol=1e-5
    )


def test_rope_dot_product_depends_only_on_offset():
    """<R(p) q, R(p') k> is a function of p - p' (per axis): shift both positions, the score stays."""
    H, g = 24, (4, 5, 6)
    cos, sin = layers.rope_3d_angles(*g, H, theta=100.0)
    r = np.random.default_rng(3)
    q = r.standard_normal(H).astype(np.float32)
    k = r.standard_normal(H).astype(np.float32)
    n = np.prod(g)
    rq = np.asarray(layers.apply_rope(jnp.broadcast_to(jnp.asarray(q), (1, n, 1, H)), cos, sin))[0, :, 0]
    rk = np.asarray(layers.apply_rope(jnp.broadcast_to(jnp.asarray(k), (1, n, 1, H)), cos, sin))[0, :, 0]
    idx = lambda t, h, w: (t * g[1] + h) * g[2] + w
    pairs = [((0, 0, 0), (1, 2, 3)), ((2, 1, 0), (3, 3, 3)), ((1, 2, 2), (2, 4, 5))]
    base = [rq[idx(*a)] @ rk[idx(*b)] for a, b in pairs]
    shifted = [rq[idx(a[0] + 1, a[1], a[2])] @ rk[idx(b[0] + 1, b[1], b[2])] for a, b in pairs[:1]]
    shifted += [rq[idx(a[0], a[1] - 1, a[2] - 0)] @ rk[idx(b[0], b[1] - 1, b[2])] for a, b in pairs[1:2]]
    shifted += [
        rq[idx(a[0] - 1, a[1] - 2, a[2] - 2)] @ rk[idx(b[0] - 1, b[1] - 2, b[2] - 2)] for a, b in pairs[2:]
    ]
    np.testing.assert_allclose(shifted, base, rtol=1e-4, atol=1e-4)
    # but a different offset gives a different score
    assert abs(rq[idx(0, 0, 0)] @ rk[idx(1, 2, 3)] - rq[idx(0, 0, 0)] @ rk[idx(1, 2, 4)]) > 1e-3


# ----------------------------------------------------------------------------------------------- patchify


def test_patchify_roundtrip_and_order():
    r = np.random.default_rng(0)
    x = r.standard_normal((2, 4, 8, 12, 3)).astype(np.float32)
    p = (2, 4, 3)
    tok = np.asarray(layers.patchify(jnp.asarray(x), p))
    assert tok.shape == (2, 2 * 2 * 4, 2 * 4 * 3 * 3)
    # numpy reference: token (it, ih, iw) holds the patch at (it*pt, ih*ph, iw*pw), flattened (pt, ph, pw, C)
    n = 0
    for it in range(2):
        for ih in range(2):
            for iw in range(4):
                patch = x[:, it * 2 : (it + 1) * 2, ih * 4 : (ih + 1) * 4, iw * 3 : (iw + 1) * 3]
                np.testing.assert_array_equal(tok[:, n], patch.reshape(2, -1))
                n += 1
    back = np.asarray(layers.unpatchify(jnp.asarray(tok), p, (2, 2, 4)))
    np.testing.assert_array_equal(back, x)
    with pytest.raises(ValueError, match="divisible"):
        layers.patchify(jnp.asarray(x), (3, 4, 3))


# ------------------------------------------------------------------------------------------ conditioning


def test_timestep_embedding_matches_dit_formula():
    t = np.array([0.0, 1.0, 37.5, 999.0], np.float32)
    for dim in (256, 7):
        half = dim // 2
        freqs = np.exp(-math.log(10000) * np.arange(half, dtype=np.float64) / half)
        args = t[:, None].astype(np.float64) * freqs[None]
        ref = np.concatenate([np.cos(args), np.sin(args)], axis=-1)
        if dim % 2:
            ref = np.concatenate([ref, np.zeros_like(ref[:, :1])], axis=-1)
        out = np.asarray(layers.timestep_embedding(jnp.asarray(t), dim))
        assert out.shape == (4, dim)
        np.testing.assert_allclose(out, ref, atol=2e-4)


def test_modulate_and_norms():
    r = np.random.default_rng(0)
    x = r.standard_normal((2, 3, 4)).astype(np.float32)
    sh, sc = r.standard_normal((2, 4)).astype(np.float32), r.standard_normal((2, 4)).astype(np.float32)
    out = np.asarray(layers.modulate(jnp.asarray(x), jnp.asarray(sh), jnp.asarray(sc)))
    np.testing.assert_allclose(out, x * (1 + sc[:, None]) + sh[:, None], rtol=1e-6)
    ln = np.asarray(layers.layer_norm(jnp.asarray(x)))
    ref = (x - x.mean(-1, keepdims=True)) / np.sqrt(x.var(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(ln, ref, atol=1e-5)
    from flax import nnx

    norm = layers.RMSNorm(4, rngs=nnx.Rngs(0))
    y = norm(jnp.asarray(x, jnp.bfloat16))
    assert y.dtype == jnp.bfloat16
    ref = x / np.sqrt((x**2).mean(-1, keepdims=True) + 1e-6)
    np.testing.assert_allclose(np.asarray(y, np.float32), ref, atol=3e-2)
    assert jax.tree.leaves(nnx.state(norm))[0].shape == (4,)
