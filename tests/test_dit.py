"""DiT and text-to-video wrapper: adaLN-Zero init, conditioning, masks, dtypes, full-size shapes, costs."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sora_jax.models import dit as dit_lib
from sora_jax.models.autoencoder import Autoencoder, IdentityAutoencoder, float_to_video, video_to_float
from sora_jax.models.t2v import TextToVideo
from sora_jax.parallel.sharding import RULES
from sora_jax.text.encoder import TextEncoderConfig


def _inputs(seed=0, B=2, L=6, text_dim=32):
    r = np.random.default_rng(seed)
    x = jnp.asarray(r.standard_normal((B, 2, 8, 8, 3)), jnp.float32)
    t = jnp.asarray([10.0, 700.0][:B], jnp.float32)
    text = jnp.asarray(r.standard_normal((B, L, text_dim)), jnp.float32)
    mask = jnp.asarray(np.arange(L)[None, :] < np.array([3, L])[:B, None])
    return x, t, text, mask


def _perturb(model, seed=1, scale=0.1):
    """Adds noise to every parameter so that zero-initialised paths become live."""
    graphdef, state = nnx.split(model)
    leaves, treedef = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    leaves = [x + scale * jax.random.normal(k, x.shape, x.dtype) for x, k in zip(leaves, keys)]
    return nnx.merge(graphdef, jax.tree.unflatten(treedef, leaves))


@pytest.fixture(scope="module")
def smoke_pair():
    cfg = dit_lib.dit_config("smoke")
    model = dit_lib.DiT(cfg, rngs=nnx.Rngs(0))
    return cfg, model, _perturb(model)


def test_init_outputs_exactly_zero(smoke_pair):
    cfg, model, _ = smoke_pair
    x, t, text, mask = _inputs()
    out = model(x, t, text, mask)
    assert out.shape == x.shape and out.dtype == jnp.float32
    assert float(jnp.max(jnp.abs(out))) == 0.0


def test_out_conv_head_starts_at_zero_and_reads_across_patch_seams():
    """``out_conv``: a fresh model still outputs exactly zero; trained (perturbed), the head's conv makes an
    output pixel at a patch's edge depend on the neighbouring patch's features, which the plain head cannot."""
    cfg = dit_lib.dit_config("smoke", out_conv=4)
    model = dit_lib.DiT(cfg, rngs=nnx.Rngs(0))
    x, t, text, mask = _inputs()
    assert float(jnp.max(jnp.abs(model(x, t, text, mask)))) == 0.0
    live = _perturb(model)
    ph, pw = cfg.patch_size[1:]

    def edge_pixel(features_of_right_patch):  # pixel (0, 0, pw - 1) of patch (0, 0, 0), right edge
        tokens = jnp.zeros((1, 8, cfg.width)).at[0, 1].set(features_of_right_patch)
        return live.head(tokens, jnp.zeros((1, cfg.width)), (2 // cfg.patch_size[0], 8 // ph, 8 // pw))

    r = np.random.default_rng(3)
    a, b = (jnp.asarray(r.standard_normal(cfg.width), jnp.float32) for _ in range(2))
    pa, pb = edge_pixel(a), edge_pixel(b)
    # the edge pixel reads its neighbour's features; pixels beyond the kernel's reach do not
    assert float(jnp.max(jnp.abs(pa[0, 0, 0, pw - 1] - pb[0, 0, 0, pw - 1]))) > 1e-3
    assert float(jnp.max(jnp.abs(pa[0, 0, 0, : pw - 2] - pb[0, 0, 0, : pw - 2]))) == 0.0


def test_conv_1x3x3_matches_nnx_conv():
    conv = nnx.Conv(5, 2, kernel_size=(1, 3, 3), padding="SAME", rngs=nnx.Rngs(0))
    conv.bias.value = jnp.asarray([0.5, -1.0])
    x = jnp.asarray(np.random.default_rng(0).standard_normal((2, 3, 6, 7, 5)), jnp.float32)
    got = dit_lib.conv_1x3x3(x, conv.kernel.get_value(), conv.bias.get_value())
    np.testing.assert_allclose(got, conv(x), atol=1e-5)


def test_out_conv_is_validated_and_reaches_the_model():
    from sora_jax import factory
    from sora_jax.config import ConfigError, load_config, validate

    cfg = load_config("configs/quickstart.py")
    assert factory.model_config(cfg).out_conv == 0
    cfg.model.out_conv = 8
    assert factory.model_config(cfg).out_conv == 8
    cfg.model.out_conv = -1
    with pytest.raises(ConfigError, match="model.out_conv must be an integer >= 0"):
        validate(cfg)


@pytest.mark.parametrize("repa_layer", [0, 1])
def test_unrolled_blocks_compute_what_the_scan_does(repa_layer):
    """scan_layers=False: the same parameters, outputs, REPA features and gradients, and no loop in the
    program (what makes it faster on CPU)."""
    kw = {"depth": 3, "repa_layer": repa_layer, "repa_dim": 8 if repa_layer else 0}
    scanned = _perturb(dit_lib.DiT(dit_lib.dit_config("smoke", **kw), rngs=nnx.Rngs(0)))
    gdef, params = nnx.split(scanned)
    unrolled_def = nnx.graphdef(
        dit_lib.DiT(dit_lib.dit_config("smoke", scan_layers=False, **kw), rngs=nnx.Rngs(0))
    )
    x, t, text, mask = _inputs()

    def loss(graphdef, p):
        out = nnx.merge(graphdef, p)(x, t, text, mask, features=bool(repa_layer))
        out, z = out if repa_layer else (out, jnp.zeros(()))
        return jnp.mean(out**2) + jnp.mean(z**2), (out, z)

    runs = {}
    for name, graphdef in (("scan", gdef), ("unrolled", unrolled_def)):
        f = jax.jit(jax.value_and_grad(lambda p, g=graphdef: loss(g, p), has_aux=True))
        runs[name] = f(params)
        hlo = f.lower(params).as_text()
        assert ("stablehlo.while" in hlo) == (name == "scan"), name
    (_, (out_s, z_s)), g_s = runs["scan"]
    (_, (out_u, z_u)), g_u = runs["unrolled"]
    assert np.abs(np.asarray(out_s)).max() > 1e-3
    np.testing.assert_allclose(np.asarray(out_u), np.asarray(out_s), rtol=1e-5, atol=1e-6)
    np.testing.assert_allclose(np.asarray(z_u), np.asarray(z_s), rtol=1e-5, atol=1e-6)
    for a, b in zip(jax.tree.leaves(g_u), jax.tree.leaves(g_s), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_scan_layers_is_validated_and_reaches_the_model():
    from sora_jax import factory
    from sora_jax.config import ConfigError, load_config, validate

    cfg = load_config("configs/quickstart.py")
    assert factory.model_config(cfg).scan_layers is False  # the demo unrolls its 4 blocks
    with cfg.unlocked():
        del cfg.model["scan_layers"]  # a config saved before the option: the scan
    assert factory.model_config(cfg).scan_layers is True
    with cfg.unlocked():
        cfg.model.scan_layers = 1
    with pytest.raises(ConfigError, match="model.scan_layers must be True or False"):
        validate(cfg)


def test_output_depends_on_text_and_time_not_on_padding(smoke_pair):
    _, _, model = smoke_pair
    fwd = jax.jit(lambda x, t, text, mask: model(x, t, text, mask))
    x, t, text, mask = _inputs()
    base = np.asarray(fwd(x, t, text, mask))
    assert np.abs(base).max() > 1e-3
    # a different prompt (real tokens) changes the output of that sample only
    text2 = text.at[0, 1].add(1.0)
    out = np.asarray(fwd(x, t, text2, mask))
    assert np.abs(out[0] - base[0]).max() > 1e-4
    np.testing.assert_allclose(out[1], base[1], atol=1e-6)
    # padding beyond the mask changes nothing
    text3 = text.at[0, 3:].set(123.0)
    np.testing.assert_allclose(np.asarray(fwd(x, t, text3, mask)), base, atol=1e-5)
    # time matters
    out_t = np.asarray(fwd(x, t + 50.0, text, mask))
    assert np.abs(out_t - base).max() > 1e-4
    # the input matters
    assert np.abs(np.asarray(fwd(x * 0.5, t, text, mask)) - base).max() > 1e-4


def test_pooled_text_off_and_remat_and_reference_attention(smoke_pair):
    _, _, model = smoke_pair
    x, t, text, mask = _inputs()
    base = np.asarray(model(x, t, text, mask))
    # same params, other code paths: remat and the reference attention give the same numbers
    cfg2 = dit_lib.dit_config("smoke", remat="full", attention_impl="reference")
    graphdef, state = nnx.split(model)
    other = nnx.merge(nnx.graphdef(dit_lib.DiT(cfg2, rngs=nnx.Rngs(0))), state)
    np.testing.assert_allclose(np.asarray(other(x, t, text, mask)), base, atol=1e-5)
    # gradients flow through the scanned, rematerialised blocks
    gdef, params = nnx.split(other)
    g = jax.jit(jax.grad(lambda p: jnp.mean(nnx.merge(gdef, p)(x, t, text, mask) ** 2)))(params)
    assert float(jnp.abs(g["blocks"]["attn"]["wq"][...]).max()) > 0
    cfg3 = dit_lib.dit_config("smoke", pooled_text_cond=False)
    m3 = dit_lib.DiT(cfg3, rngs=nnx.Rngs(0))
    assert m3.y_embedder is None
    assert dit_lib.param_count(cfg3) == sum(p.size for p in jax.tree.leaves(nnx.state(m3, nnx.Param)))


def test_bad_inputs_raise(smoke_pair):
    _, model, _ = smoke_pair
    x, t, text, mask = _inputs()
    with pytest.raises(ValueError, match="divisible"):
        model(x[:, :, :6], t, text, mask)
    with pytest.raises(ValueError, match="text"):
        model(x, t, text[..., :5], mask)
    with pytest.raises(ValueError, match="unknown DiT variant.*smoke"):
        dit_lib.dit_config("XXL")
    with pytest.raises(ValueError, match="divisible"):
        dit_lib.dit_config("smoke", num_heads=3)
    with pytest.raises(ValueError, match="unknown field"):
        dit_lib.dit_config("smoke", widht=3)


def test_bf16_compute():
    cfg = dit_lib.dit_config("smoke", dtype="bfloat16")
    model = _perturb(dit_lib.DiT(cfg, rngs=nnx.Rngs(0)))
    assert all(p.dtype == jnp.float32 for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    x, t, text, mask = _inputs()
    out = model(x, t, text, mask)
    assert out.dtype == jnp.bfloat16 and out.shape == x.shape
    assert bool(jnp.all(jnp.isfinite(out.astype(jnp.float32))))
    cfg32 = dit_lib.dit_config("smoke")
    ref = nnx.merge(nnx.graphdef(dit_lib.DiT(cfg32, rngs=nnx.Rngs(0))), nnx.state(model))(x, t, text, mask)
    err = float(jnp.max(jnp.abs(out.astype(jnp.float32) - ref)))
    assert err < 0.1 * float(jnp.max(jnp.abs(ref))) + 1e-2


@pytest.mark.parametrize("variant", ["smoke", "tiny", "S", "B", "L", "XL", "1B", "8B", "tiny_out_conv"])
def test_param_count_formula_and_eval_shape(variant):
    cfg = dit_lib.dit_config(variant.removesuffix("_out_conv"), out_conv=8 if variant.endswith("conv") else 0)
    state = jax.eval_shape(lambda: nnx.state(dit_lib.DiT(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    counted = sum(int(np.prod(p.shape)) for p in jax.tree.leaves(state))
    follows = dit_lib.VARIANTS[variant.removesuffix("_out_conv")].follows
    print(f"{variant}: {counted / 1e6:.1f}M params ({follows})")
    assert counted == dit_lib.param_count(cfg)
    # every weight outside the per-sample (adaLN, conditioning) and per-text-token (cross k/v) paths is used
    # once per video token: a multiply-add each, plus attention on top
    D = cfg.width
    amortised = (
        cfg.depth * (2 * cfg.text_dim * D + 6 * D * D) + cfg.text_dim * D + 2 * D * D + 256 * D + D * D
    )
    per_token = 2 * (counted - amortised)
    assert per_token < dit_lib.flops_per_token(cfg, 1024, 32) < 1.5 * per_token + 4 * cfg.depth * 1056 * D
    if variant == "XL":
        D, text = cfg.width, cfg.text_dim
        cross = cfg.depth * (2 * D * D + 2 * text * D)
        # DiT-XL/2 is 675M (its output has learned sigma); ours adds cross-attention + pooled text
        assert abs(counted - cross - text * D - 675e6) < 10e6
    if variant == "1B":
        assert 0.9e9 < counted < 1.3e9
    if variant == "8B":
        assert 7.5e9 < counted < 9e9


def test_flops_per_token_matches_matmul_count():
    cfg = dit_lib.dit_config("smoke")
    N, L = 32, 6
    # forward matmul FLOPs ~ 2 * (params touched per token) + attention; check the dominant term
    blocks = cfg.depth * (12 * cfg.width**2 + 2 * cfg.width**2)
    f = dit_lib.flops_per_token(cfg, N, L)
    assert 2 * blocks < f < 4 * dit_lib.param_count(cfg) + 4 * cfg.depth * (N + L) * cfg.width


def test_param_logical_names_exist_in_rules():
    cfg = dit_lib.dit_config("S")
    state = jax.eval_shape(lambda: nnx.state(dit_lib.DiT(cfg, rngs=nnx.Rngs(0)), nnx.Param))
    names = set(dict(RULES))
    flat = nnx.to_flat_state(state) if hasattr(nnx, "to_flat_state") else state.flat_state()
    n = 0
    for path, var in flat:
        sharding = var.get_metadata().get("out_sharding")
        assert sharding is not None, path
        assert len(sharding) == len(var.shape), (path, sharding, var.shape)
        assert set(sharding) <= names, (path, sharding)
        if path[0] == "blocks":
            assert sharding[0] == "layers", path
        n += 1
    assert n > 20


def test_text_to_video_and_autoencoder():
    dcfg = dit_lib.dit_config("smoke")
    tcfg = TextEncoderConfig(vocab_size=64, max_length=8, width=32, depth=1, num_heads=2)
    model = _perturb(TextToVideo(dcfg, tcfg, rngs=nnx.Rngs(0)))
    ids, mask = model.text_encoder.tokenizer.encode(["a 3 moving left", "a 7"])
    x, t, _, _ = _inputs()
    out = model(x, t, jnp.asarray(ids), jnp.asarray(mask))
    ctx, m = model.encode_text(jnp.asarray(ids), jnp.asarray(mask))
    assert ctx.shape == (2, 8, 32)
    np.testing.assert_allclose(np.asarray(model.denoise(x, t, ctx, m)), np.asarray(out), atol=1e-6)
    ids2 = ids.copy()
    ids2[0, 2] = (ids2[0, 2] + 1) % 64
    out2 = model(x, t, jnp.asarray(ids2), jnp.asarray(mask))
    assert float(jnp.abs(out2[0] - out[0]).max()) > 1e-5
    with pytest.raises(ValueError, match="text_dim"):
        TextToVideo(dit_lib.dit_config("smoke", text_dim=16), tcfg, rngs=nnx.Rngs(0))

    ae = IdentityAutoencoder()
    assert isinstance(ae, Autoencoder)
    assert ae.latent_shape(4, 16, 16) == (4, 16, 16, 3)
    video = np.random.default_rng(0).integers(0, 256, (1, 2, 4, 4, 3), dtype=np.uint8)
    f = video_to_float(video)
    assert f.dtype == jnp.float32 and float(f.min()) >= -1 and float(f.max()) <= 1
    np.testing.assert_array_equal(float_to_video(ae.decode(ae.encode(f))), video)
    np.testing.assert_array_equal(float_to_video(np.array([-3.0, 3.0, 0.0])), [0, 255, 128])


def test_config_resizes_variant():
    from sora_jax import factory
    from sora_jax.config import load_config

    base = factory.model_config(load_config("configs/quickstart.py"))
    cfg = load_config(
        "configs/quickstart.py",
        ["model.width=96", "model.depth=3", "model.num_heads=2", "model.patch_size=(2,8,8)"],
    )
    resized = factory.model_config(cfg)
    assert (resized.width, resized.depth, resized.num_heads, resized.patch_size) == (96, 3, 2, (2, 8, 8))
    assert (base.width, base.depth) == (dit_lib.VARIANTS["tiny"].width, dit_lib.VARIANTS["tiny"].depth)
    model = nnx.eval_shape(lambda: factory.make_model(cfg))
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model.dit, nnx.Param)))
    assert n == dit_lib.param_count(resized)


def test_config_switches_the_pooled_text_conditioning():
    from sora_jax import factory
    from sora_jax.config import load_config

    assert factory.model_config(load_config("configs/quickstart.py")).pooled_text_cond
    cfg = load_config("configs/quickstart.py", ["model.pooled_text_cond=False"])
    assert not factory.model_config(cfg).pooled_text_cond
    model = nnx.eval_shape(lambda: factory.make_model(cfg))
    assert model.dit.y_embedder is None
    n = sum(x.size for x in jax.tree.leaves(nnx.state(model.dit, nnx.Param)))
    assert n == dit_lib.param_count(factory.model_config(cfg))


def test_sincos_2d_matches_diffusers_and_enters_the_dit(smoke_pair):
    """``layers.sincos_2d`` against diffusers' ``get_2d_sincos_pos_embed`` (square grid) and
    ``get_2d_sincos_pos_embed_from_grid`` (a 3 x 5 grid); a DiT with ``pos_embed="sincos_2d"`` equals one whose
    tokens get that table by hand (the patch embedding's output), the same in every temporal group."""
    import torch
    from diffusers.models import embeddings as E

    from sora_jax.models.layers import patchify, sincos_2d

    want = E.get_2d_sincos_pos_embed(32, (4, 4), base_size=4).numpy()
    np.testing.assert_allclose(np.asarray(sincos_2d(4, 4, 32)), want, atol=1e-6)
    grid = np.stack(np.meshgrid(np.arange(5.0), np.arange(3.0)), 0).reshape(2, 1, 3, 5)
    want = E.get_2d_sincos_pos_embed_from_grid(32, torch.from_numpy(grid)).numpy()
    np.testing.assert_allclose(np.asarray(sincos_2d(3, 5, 32)), want, atol=1e-6)

    _, _, model = smoke_pair
    x, t, text, mask = _inputs()
    cfg = dit_lib.dit_config("smoke", pos_embed="sincos_2d")
    graphdef, state = nnx.split(model)
    pos = nnx.merge(nnx.graphdef(dit_lib.DiT(cfg, rngs=nnx.Rngs(0))), state)
    table = jnp.tile(sincos_2d(2, 2, cfg.width), (2, 1))  # x [2, 2, 8, 8, 3], patch (1, 4, 4): grid (2, 2, 2)
    embed = model.x_embedder

    class Shifted:  # the patch embedding plus the table, in the model without one
        def __call__(self, tokens):
            return embed(tokens) + table

    by_hand = nnx.merge(graphdef, state)
    object.__setattr__(by_hand, "x_embedder", Shifted())
    got = np.asarray(pos(x, t, text, mask))
    np.testing.assert_allclose(got, np.asarray(by_hand(x, t, text, mask)), atol=1e-5)
    assert np.abs(got - np.asarray(model(x, t, text, mask))).max() > 1e-3
    assert patchify(x, cfg.patch_size).shape[1] == table.shape[0]
    with pytest.raises(ValueError, match="pos_embed"):
        dit_lib.dit_config("smoke", pos_embed="learned")


def test_joint_text_attention():
    """``text_attention="joint"``: parameters counted, padding tokens ignored, the text read, equal per-frame
    times equal to one time per sample, the export refusing it, and FLOPs counted as XLA counts them (the same
    ratio to XLA's own count as the cross-attention model's)."""
    cfg = dit_lib.dit_config("smoke", text_attention="joint")
    model = _perturb(dit_lib.DiT(cfg, rngs=nnx.Rngs(0)))
    assert not hasattr(model.blocks, "cross_attn")
    n = sum(p.size for p in jax.tree.leaves(nnx.state(model, nnx.Param)))
    assert n == dit_lib.param_count(cfg)
    x, t, text, mask = _inputs()
    base = np.asarray(model(x, t, text, mask))
    np.testing.assert_array_equal(np.asarray(model(x, t, text.at[0, 3:].set(9.0), mask)), base)  # padding
    assert np.abs(np.asarray(model(x, t, text.at[0, 1].set(3.0), mask)) - base).max() > 1e-3
    per_frame = jnp.repeat(t[:, None], 2, 1)
    np.testing.assert_allclose(np.asarray(model(x, per_frame, text, mask)), base, atol=1e-6)
    mixed = np.asarray(model(x, jnp.asarray([[0.0, 500.0], [700.0, 700.0]]), text, mask))
    np.testing.assert_allclose(mixed[1], base[1], atol=1e-6)  # the second clip's times are all equal
    assert np.abs(mixed[0] - base[0]).max() > 1e-3
    with pytest.raises(ValueError, match="seq_parallel"):
        dit_lib.dit_config("smoke", text_attention="joint", seq_parallel="ulysses")

    ratios = {}
    for mode in ("cross", "joint"):
        c = dit_lib.DiTConfig(
            in_channels=1,
            patch_size=(2, 8, 8),
            width=128,
            depth=2,
            num_heads=4,
            text_dim=64,
            text_attention=mode,
        )
        graphdef, state = nnx.split(dit_lib.DiT(c, rngs=nnx.Rngs(0)))
        args = (
            jnp.zeros((1, 8, 32, 32, 1)),
            jnp.zeros((1,)),
            jnp.zeros((1, 16, 64)),
            jnp.ones((1, 16), bool),
        )
        fwd = jax.jit(lambda s, *a, g=graphdef: nnx.merge(g, s)(*a))
        cost = fwd.lower(state, *args).compile().cost_analysis()
        cost = cost[0] if isinstance(cost, list) else cost
        ratios[mode] = dit_lib.flops_per_token(c, 64, 16) * 64 / cost["flops"]
    assert abs(ratios["joint"] / ratios["cross"] - 1) < 0.02, ratios  # measured: 1.835 and 1.835
