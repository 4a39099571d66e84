"""The samplers: device-count invariance (pmap), guidance against the CFG formula with the null or a negative
prompt as the unconditional branch (pmap and jit), outputs on disk."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sora_jax import factory
from sora_jax.models.autoencoder import float_to_video
from sora_jax.sample.outputs import write_samples
from sora_jax.sample.sampler import JitSampler, PmapSampler
from sora_jax.sample.video_io import read_video


@pytest.fixture(scope="module")
def parts(smoke_t2v):
    return smoke_t2v


def make_sampler(cfg, graphdef, devices, scale=3.0, sampler="euler"):
    return PmapSampler(
        graphdef,
        factory.make_text_input(cfg),
        factory.make_process(cfg),
        factory.make_autoencoder(cfg),
        factory.latent_shape(cfg),
        sampler=sampler,
        num_steps=3,
        cfg_scale=scale,
        devices=devices,
    )


PROMPTS = ["a 3 moving left", "a 7 falls", "a 0 moves right while a 5 moves up"]


def test_same_videos_on_one_and_eight_devices(parts):
    cfg, graphdef, params = parts
    one = make_sampler(cfg, graphdef, jax.local_devices()[:1]).generate(params, PROMPTS, seed=0)
    eight = make_sampler(cfg, graphdef, jax.local_devices()).generate(params, PROMPTS, seed=0)
    assert one.shape == (3, cfg.data.num_frames, cfg.data.height, cfg.data.width, 3) and one.dtype == np.uint8
    np.testing.assert_allclose(one.astype(int), eight.astype(int), atol=1)
    # nor on how the prompts are chunked into device batches
    chunked = make_sampler(cfg, graphdef, jax.local_devices()[:2]).generate(
        params, PROMPTS, batch_per_device=1
    )
    np.testing.assert_allclose(one.astype(int), chunked.astype(int), atol=1)
    assert not np.array_equal(one[0], one[1])  # different prompts and noise -> different videos


def test_prompt_index_keys_and_seed(parts):
    cfg, graphdef, params = parts
    s = make_sampler(cfg, graphdef, jax.local_devices()[:2])
    a = s.generate(params, PROMPTS, seed=0)
    b = s.generate(params, PROMPTS, seed=0)
    c = s.generate(params, PROMPTS, seed=1)
    np.testing.assert_array_equal(a, b)
    assert not np.array_equal(a, c)


def guided_euler_reference(cfg, graphdef, params, prompts, *, seed, scale, num_steps=3, uncond=None):
    """Latents [B, T', H', W', C] float64 that classifier-free-guided Euler sampling gives, recomputed: prompt
    i's noise from ``fold_in(key(seed), i)`` split in two (noise from the first); at each time t of the
    shifted grid the model's outputs c (the prompt) and u (``uncond[i]``, default the empty prompt: the null
    tokens) combined as u + scale (c - u) in float64, an x0-prediction turned into the velocity (x - x0) / t."""
    model = nnx.merge(graphdef, params)
    tok, process = factory.make_text_input(cfg), factory.make_process(cfg)
    assert process.is_flow and process.flow_prediction == "x0"  # what the smoke config trains

    @jax.jit
    def output(x, mt, ids, mask):
        return model.denoise(x, mt, *model.encode_text(ids, mask))

    c_ids, c_mask = tok.encode(list(prompts))
    u_ids, u_mask = tok.encode(list(uncond) if uncond else [""] * len(prompts))
    u = np.linspace(1.0, 0.0, num_steps + 1)
    ts = process.flow_shift * u / (1 + (process.flow_shift - 1) * u)
    latents = []
    for i in range(len(prompts)):
        k_noise, _ = jax.random.split(jax.random.fold_in(jax.random.key(seed), i))
        x = np.asarray(jax.random.normal(k_noise, (1, *factory.latent_shape(cfg))), np.float64)
        for t, t_next in zip(ts[:-1], ts[1:]):
            mt = np.full((1,), 1000 * t, np.float32)
            c = np.asarray(output(np.float32(x), mt, c_ids[i : i + 1], c_mask[i : i + 1]), np.float64)
            un = np.asarray(output(np.float32(x), mt, u_ids[i : i + 1], u_mask[i : i + 1]), np.float64)
            x0 = un + scale * (c - un)
            x = x + (t_next - t) * (x - x0) / t
        latents.append(x[0])
    return np.stack(latents)


def test_guided_videos_follow_the_cfg_formula_with_the_null_prompt_as_unconditional(parts):
    cfg, graphdef, params = parts
    ae = factory.make_autoencoder(cfg)
    got = make_sampler(cfg, graphdef, jax.local_devices()[:1], scale=4.0).generate(
        params, PROMPTS[:2], seed=1
    )
    ref = guided_euler_reference(cfg, graphdef, params, PROMPTS[:2], seed=1, scale=4.0)
    want = np.asarray(float_to_video(ae.decode(jnp.asarray(ref, jnp.float32))))
    np.testing.assert_allclose(got.astype(int), want.astype(int), atol=1)  # uint8 rounding
    # guidance shows: the conditional model alone (scale 1) gives other videos
    cond = guided_euler_reference(cfg, graphdef, params, PROMPTS[:2], seed=1, scale=1.0)
    cond_video = np.asarray(float_to_video(ae.decode(jnp.asarray(cond, jnp.float32))))
    assert np.abs(cond_video.astype(int) - want).max() > 32


def test_jit_sampler_guidance_follows_the_cfg_formula_and_a_negative_prompt_replaces_the_null_one(parts):
    cfg, graphdef, params = parts
    s = JitSampler(
        graphdef,
        params,
        factory.make_text_input(cfg),
        factory.make_process(cfg),
        factory.latent_shape(cfg),
        sampler="euler",
        num_steps=3,
        cfg_scale=4.0,
    )
    ref = guided_euler_reference(cfg, graphdef, params, PROMPTS[:2], seed=2, scale=4.0)
    np.testing.assert_allclose(s.sample(PROMPTS[:2], seed=2), ref, atol=2e-5)
    neg = ["a 9 moving up", "a 1 falls"]
    ref_neg = guided_euler_reference(cfg, graphdef, params, PROMPTS[:2], seed=2, scale=4.0, uncond=neg)
    np.testing.assert_allclose(s.sample(PROMPTS[:2], seed=2, negative_prompts=neg), ref_neg, atol=2e-5)
    assert np.abs(ref_neg - ref).max() > 1e-2


def test_write_samples(parts, tmp_path):
    cfg, graphdef, params = parts
    videos = make_sampler(cfg, graphdef, jax.local_devices()[:1]).generate(params, PROMPTS[:2])
    paths = write_samples(tmp_path, videos, PROMPTS[:2], fps=cfg.data.fps)
    assert len(paths["mp4"]) == 2 and paths["contact_sheet"].is_file()
    back = read_video(paths["mp4"][0])
    assert back.shape[0] == cfg.data.num_frames
    assert not list(tmp_path.glob("*.tmp"))


# ----------------------------------------------------------------- frozen weights: arguments, not constants


def _latent_setup(base_width: int):
    """Latent diffusion through a smoke VAE of ``base_width`` with random weights: (config, codec, DiT graphdef,
    DiT params). The DiT is the same for every width (4 latent channels)."""
    import dataclasses

    from flax import nnx

    from configs import quickstart
    from sora_jax.config import load_config
    from sora_jax.models import vae as vae_lib

    vcfg = vae_lib.vae_config("smoke", base_width=base_width)
    cfg = load_config(
        f"{quickstart.__file__}:smoke", ["--config.autoencoder.kind=vae", "--config.data.num_frames=5"]
    )
    with cfg.unlocked():
        cfg.autoencoder.vae = dataclasses.asdict(vcfg)
        cfg.autoencoder.shift, cfg.autoencoder.scale, cfg.autoencoder.vae_step = 0.1, 0.5, 0
        cfg.model.patch_size = (1, 2, 2)
    init = jax.jit(lambda: nnx.split(vae_lib.VideoVAE(vcfg, rngs=nnx.Rngs(0)), nnx.Param)[1])
    codec = factory.vae_codec(vcfg, 0.1, 0.5).with_params(jax.device_get(init()))
    graphdef, params = nnx.split(jax.jit(lambda: factory.make_model(cfg))(), nnx.Param)
    return cfg, codec, graphdef, jax.device_get(params)


@pytest.fixture(scope="module")
def latent_setups():
    return {w: _latent_setup(w) for w in (8, 32)}


def _latent_samplers(cfg, codec, graphdef, params, **jit_kw):
    from sora_jax.sample.sampler import JitSampler

    common = dict(sampler="euler", num_steps=2, cfg_scale=3.0)
    args = (factory.make_text_input(cfg), factory.make_process(cfg))
    pm = PmapSampler(
        graphdef, *args, codec, factory.latent_shape(cfg), devices=jax.local_devices()[:2], **common
    )
    js = JitSampler(graphdef, params, *args, factory.latent_shape(cfg), autoencoder=codec, **common, **jit_kw)
    return pm, js


def test_frozen_vae_weights_are_arguments_not_constants(latent_setups, largest_constant):
    texts = {}
    for width, (cfg, codec, graphdef, params) in latent_setups.items():
        pm, js = _latent_samplers(cfg, codec, graphdef, params)
        videos = np.zeros((2, 5, 16, 16, 3), np.uint8)
        latents = np.zeros((2, *js.latent_shape), np.float32)
        texts[width] = {
            "pmap sample + decode": pm.lower(params, PROMPTS[:2]).as_text(),
            "jit sample": js.lower(PROMPTS[:2]).as_text(),
            "jit encode": js.encode_fn.lower(js.autoencoder.params, videos).as_text(),
            "jit decode": js.decode_fn.lower(js.autoencoder.params, latents).as_text(),
        }
    small, big = texts[8], texts[32]
    kernel = 3 * 3 * 3 * 3 * 8  # elements of the smallest VAE's first convolution kernel
    for name in small:
        assert largest_constant(small[name]) < kernel and largest_constant(big[name]) < kernel, name
        # 15x the VAE's parameters, the same program: nothing of the weights is compiled in
        assert len(big[name]) < 1.05 * len(small[name]), name
    # the check sees weights when they are closed over
    cfg, codec, _, _ = latent_setups[8]
    closed = jax.jit(codec.decode).lower(np.zeros((1, *factory.latent_shape(cfg)), np.float32)).as_text()
    assert largest_constant(closed) >= kernel


def test_vae_latent_samplers_code_as_the_codec(latent_setups):
    from sora_jax.models.autoencoder import float_to_video, video_to_float
    from sora_jax.sample.prompter import fsdp_placement

    cfg, codec, graphdef, params = latent_setups[8]
    pm, js = _latent_samplers(cfg, codec, graphdef, params)
    videos = np.random.default_rng(0).integers(0, 256, (2, 5, 16, 16, 3), dtype=np.uint8)
    ref = np.asarray(codec.encode(video_to_float(videos)))
    np.testing.assert_allclose(js.encode(videos), ref, atol=1e-5)
    np.testing.assert_array_equal(js.decode(ref), float_to_video(np.asarray(codec.decode(ref))))
    # the pmap sampler decodes inside its pmapped call what the jit sampler samples
    latents = js.sample(PROMPTS[:2], seed=0)
    expect = float_to_video(np.asarray(codec.decode(latents)))
    np.testing.assert_allclose(pm.generate(params, PROMPTS[:2]).astype(int), expect.astype(int), atol=1)
    # on an fsdp=8 mesh the VAE's weights are sharded by the rules table; coding is unchanged
    mesh, shardings = fsdp_placement(cfg, 8)
    _, sharded = _latent_samplers(cfg, codec, graphdef, params, mesh=mesh, param_sharding=shardings)
    ae_leaves = jax.tree.leaves(sharded.autoencoder.params)
    assert any(not leaf.sharding.is_fully_replicated for leaf in ae_leaves)
    np.testing.assert_allclose(sharded.encode(videos), ref, atol=1e-5)
    np.testing.assert_array_equal(sharded.decode(ref), js.decode(ref))
    np.testing.assert_allclose(sharded.sample(PROMPTS[:2], seed=0), latents, atol=1e-4)


def test_jitter_rolls_the_patch_grid_at_the_late_steps_only():
    """``jittered``: a denoiser that adds a fixed pattern G [H, W] (a per-position head, as a patch grid is) comes
    back with G rolled by the step's offset below the threshold, and unrolled above it; a shift-equivariant
    denoiser is unchanged; over the 32 steps of the demo's shifted time grid the late steps use many offsets."""
    from sora_jax.diffusion import flow
    from sora_jax.sample.sampler import jittered

    rng = np.random.default_rng(0)
    x = jnp.asarray(rng.standard_normal((2, 3, 16, 16, 1)), jnp.float32)
    grid = rng.standard_normal((16, 16)).astype(np.float32)
    pattern = jittered(lambda x, t, c: x + grid[None, None, :, :, None], (8, 8), below=500.0)
    double = jittered(lambda x, t, c: 2.0 * x, (8, 8), below=500.0)
    times = flow.model_time(jnp.asarray(flow.sampling_times(32, 6.0)[:-1]))
    offsets = set()
    for t in np.asarray(times):
        tb = jnp.full((2,), t)
        np.testing.assert_allclose(double(x, tb, None), 2.0 * x, rtol=1e-6)
        added = np.asarray(pattern(x, tb, None) - x)[0, 0, :, :, 0]
        if t > 500.0:
            np.testing.assert_allclose(added, grid, atol=1e-5)
            continue
        match = [
            (dy, dx)
            for dy in range(8)
            for dx in range(8)
            if np.allclose(added, np.roll(grid, (-dy, -dx), axis=(0, 1)), atol=1e-5)
        ]
        assert len(match) == 1
        offsets.add(match[0])
    late = int((np.asarray(times) <= 500.0).sum())
    assert late >= 4 and len(offsets) >= late - 1  # (0, 0) can come up; the grid otherwise moves every step
