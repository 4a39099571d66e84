"""Video prompting (issue 8): the jit sampler (one device, and params sharded over 8 devices) against the pmap
sampler, the modes' frame bookkeeping (i2v, extend, connect, edit, loop, long videos), input fitting and the
command line's one-line errors."""

import dataclasses

import jax
import numpy as np
import pytest
from flax import nnx

from sora_jax import cli, factory
from sora_jax.models.autoencoder import float_to_video, video_to_float
from sora_jax.sample.prompter import Prompter, fit_frames, fsdp_placement, latent_frame_mask, pixel_frames
from sora_jax.sample.sampler import JitSampler, PmapSampler


@pytest.fixture(scope="module")
def parts(smoke_t2v):
    return smoke_t2v


def _jit(cfg, graphdef, params, process=None, sampler="euler", num_steps=3, **kw):
    return JitSampler(
        graphdef,
        params,
        factory.make_text_input(cfg),
        process or factory.make_process(cfg),
        factory.latent_shape(cfg),
        sampler=sampler,
        num_steps=num_steps,
        cfg_scale=3.0,
        **kw,
    )


@pytest.fixture(scope="module")
def prompter(parts):
    cfg, graphdef, params = parts
    d = cfg.data
    sampler = _jit(cfg, graphdef, params, autoencoder=factory.make_autoencoder(cfg))
    return Prompter(sampler, d.num_frames, d.height, d.width, 8.0)


PROMPTS = ["a 3 moving left", "a 7 falls", "a 0 moves right while a 5 moves up"]


def test_jit_sampler_matches_pmap_sampler_on_one_and_eight_devices(parts):
    cfg, graphdef, params = parts
    ae = factory.make_autoencoder(cfg)
    pm = PmapSampler(
        graphdef,
        factory.make_text_input(cfg),
        factory.make_process(cfg),
        ae,
        factory.latent_shape(cfg),
        sampler="euler",
        num_steps=3,
        cfg_scale=3.0,
        devices=jax.local_devices()[:1],
    ).generate(params, PROMPTS, seed=0)
    one = np.asarray(float_to_video(ae.decode(_jit(cfg, graphdef, params).sample(PROMPTS, seed=0))))
    np.testing.assert_allclose(one.astype(int), pm.astype(int), atol=1)
    # params sharded over an fsdp=8 mesh by the training rules, prompts padded to the batch multiple
    mesh, shardings = fsdp_placement(cfg, 8)
    sharded = _jit(cfg, graphdef, params, mesh=mesh, param_sharding=shardings)
    assert sharded.batch_multiple == 8
    leaf = jax.tree.leaves(sharded.params)[0]
    assert len(leaf.sharding.device_set) == 8
    big = [leaf for leaf in jax.tree.leaves(sharded.params) if leaf.ndim == 2 and leaf.shape[0] % 8 == 0]
    assert any(not leaf.sharding.is_fully_replicated for leaf in big)  # really sharded, not copied
    eight = np.asarray(float_to_video(ae.decode(sharded.sample(PROMPTS, seed=0))))
    np.testing.assert_allclose(eight.astype(int), one.astype(int), atol=1)


def test_jit_sampler_videos_do_not_depend_on_the_batch(parts):
    cfg, graphdef, params = parts
    from sora_jax.diffusion import make_process

    s = _jit(cfg, graphdef, params)
    ddpm = _jit(cfg, graphdef, params, process=make_process("ddpm"), sampler="ddpm", num_steps=4)
    for sampler in (s, ddpm):
        both = sampler.sample(PROMPTS[:2], seed=3)
        alone = sampler.sample(PROMPTS[:1], seed=3)
        np.testing.assert_allclose(both[:1], alone, atol=1e-5)
        again = sampler.sample(PROMPTS[:2], seed=3)
        np.testing.assert_array_equal(both, again)  # deterministic from the seed
        assert np.abs(sampler.sample(PROMPTS[:2], seed=4) - both).max() > 1e-3


def test_negative_prompt_changes_only_the_unconditional_branch(parts):
    cfg, graphdef, params = parts
    s = _jit(cfg, graphdef, params)
    base = s.sample(PROMPTS[:1], seed=0)
    same = s.sample(PROMPTS[:1], seed=0, negative_prompts=[""])
    neg = s.sample(PROMPTS[:1], seed=0, negative_prompts=["a 9 moving up"])
    np.testing.assert_allclose(base, same, atol=1e-6)
    assert np.abs(neg - base).max() > 1e-3
    with pytest.raises(ValueError, match="negative prompts"):
        s.sample(PROMPTS[:2], negative_prompts=["x"])
    with pytest.raises(ValueError, match="needs both cond"):
        s.sample(PROMPTS[:1], cond=np.zeros((1, *s.latent_shape), np.float32))
    with pytest.raises(ValueError, match="init latents"):
        s.sample(PROMPTS[:1], init=np.zeros((2, *s.latent_shape), np.float32), strength=0.5)


def _grey(T, H, W, seed):
    g = np.random.default_rng(seed).integers(0, 256, (T, H, W, 1), dtype=np.uint8)
    return np.repeat(g, 3, axis=-1)


def test_i2v_extend_connect_edit_loop_frames(prompter):
    p = prompter
    T, H, W = p.frames, p.height, p.width
    img = _grey(1, H, W, 0)[0]
    clip = p.i2v("a 3 moving left", img)
    assert clip.shape == (T, H, W, 3)
    np.testing.assert_array_equal(clip[0], img)  # luma of a grey image is exact
    v = _grey(6, H, W, 1)
    fwd = p.extend("a 3", v, direction="forward")
    assert fwd.shape[0] == 6 + T - 1
    np.testing.assert_array_equal(fwd[:6], v)
    bwd = p.extend("a 3", v, direction="backward", overlap=2)
    assert bwd.shape[0] == 6 + T - 2
    np.testing.assert_array_equal(bwd[T - 2 :], v)
    a, b = _grey(5, H, W, 2), _grey(5, H, W, 3)
    whole, transition = p.connect("a 3", a, b)
    np.testing.assert_array_equal(transition[0], a[-1])
    np.testing.assert_array_equal(transition[-1], b[0])
    assert whole.shape[0] == 5 + (T - 2) + 5
    np.testing.assert_array_equal(whole[:5], a)
    np.testing.assert_array_equal(whole[-5:], b)
    # SDEdit at strength 1 is text-to-video from the same noise (the input is drowned); below 1 it is not
    np.testing.assert_array_equal(
        p.edit("a 3", _grey(T, H, W, 4), strength=1.0, seed=5), p.t2v("a 3", seed=5)
    )
    e1 = p.edit("a 3", _grey(T, H, W, 4), strength=0.8, seed=5)
    e2 = p.edit("a 3", _grey(T, H, W, 6), strength=0.8, seed=5)
    assert np.abs(e1.astype(int) - e2).max() > 0
    loop = p.loop("a 3")
    assert loop.shape[0] == T + T - 2
    with pytest.raises(ValueError, match="direction must be"):
        p.extend("a 3", v, direction="sideways")
    with pytest.raises(ValueError, match="overlap must be 1"):
        p.extend("a 3", v, overlap=T)


class _Recorder:
    """Wraps a sampler: every call passes through; keeps (cond, cond_mask, latents returned) per call."""

    def __init__(self, inner):
        self.inner, self.latent_shape, self.calls, self.inits = inner, inner.latent_shape, [], []

    def sample(self, prompts, **kw):
        out = self.inner.sample(prompts, **kw)
        self.calls.append((kw.get("cond"), kw.get("cond_mask"), out))
        self.inits.append((kw.get("init"), kw.get("strength")))
        return out

    def __getattr__(self, name):  # everything else (the autoencoder, encode, decode): the inner sampler's
        return getattr(self.inner, name)


def test_long_video_segments_and_streaming(prompter):
    rec = _Recorder(prompter.sampler)
    p = dataclasses.replace(prompter, sampler=rec)
    T = p.frames
    videos, segments = p.long_video(["a 3 moving left", "a 7 falls"], num_frames=3 * T + 1, overlap=1, seed=2)
    assert videos.shape == (2, 3 * T + 1, p.height, p.width, 3)
    assert segments[0] == (0, T) and segments[-1][1] == 3 * T + 1
    assert all(b[0] == a[1] for a, b in zip(segments, segments[1:]))
    # every extension starts from the previous segment's last frame: it is given (clean) as the generated
    # clip's first frame, which the clip repeats exactly, and the video goes on with the clip's other frames
    assert len(rec.calls) == len(segments) and rec.calls[0][1] is None  # segment 0: plain text-to-video
    for (cond, cond_mask, latents), (a, b) in zip(rec.calls[1:], segments[1:]):
        np.testing.assert_array_equal(cond_mask, [[True] + [False] * (T - 1)] * 2)  # luma: 1 latent = 1 frame
        np.testing.assert_array_equal(cond[:, :1], p.encode(videos[:, a - 1 : a]))
        clip = p.decode(latents)
        np.testing.assert_array_equal(clip[:, 0], videos[:, a - 1])
        np.testing.assert_array_equal(clip[:, 1 : 1 + b - a], videos[:, a:b])
    got = []
    none, seg2 = p.long_video(["a 3 moving left", "a 7 falls"], num_frames=3 * T + 1, seed=2, sink=got.append)
    assert none is None and seg2 == segments
    np.testing.assert_array_equal(np.concatenate(got, axis=1), videos)
    one, _ = p.long_video("a 3 moving left", seconds=(2 * T) / p.fps, seed=2)
    assert one.shape[1] == 2 * T
    assert all(init is None for init, _ in rec.inits)  # init_strength 1: every segment from pure noise


def test_long_video_init_strength_starts_from_the_held_last_frame(prompter):
    """init_strength < 1: each later segment is SDEdit from the previous clip's last frame held over the
    clip (at that strength), with that frame still given; segment 0 stays plain text-to-video."""
    rec = _Recorder(prompter.sampler)
    p = dataclasses.replace(prompter, sampler=rec)
    T = p.frames
    videos, segments = p.long_video(["a 3 moving left"], num_frames=2 * T, seed=1, init_strength=0.6)
    assert rec.inits[0] == (None, 1.0)
    (init, strength), (cond, cond_mask, _) = rec.inits[1], rec.calls[1]
    assert strength == 0.6
    last = videos[:, segments[1][0] - 1]
    np.testing.assert_array_equal(init, p.encode(np.repeat(last[:, None], T, axis=1)))
    np.testing.assert_array_equal(cond_mask, [[True] + [False] * (T - 1)])
    np.testing.assert_array_equal(cond[:, :1], p.encode(last[:, None]))


def test_fit_frames_and_frame_maps():
    v = np.arange(2 * 20 * 40 * 3, dtype=np.uint8).reshape(2, 20, 40, 3)
    out = fit_frames(v, 16, 16)
    assert out.shape == (2, 16, 16, 3)
    assert fit_frames(np.zeros((20, 30), np.uint8), 8, 8).shape == (1, 8, 8, 3)
    assert fit_frames(np.zeros((20, 30, 4), np.uint8), 8, 8).shape == (1, 8, 8, 3)
    same = np.random.default_rng(0).integers(0, 255, (3, 16, 16, 3), dtype=np.uint8)
    np.testing.assert_array_equal(fit_frames(same, 16, 16), same)  # already the model's size: untouched
    with pytest.raises(ValueError, match="no pixels"):
        fit_frames(np.zeros((0, 8, 8, 3), np.uint8), 8, 8)
    with pytest.raises(ValueError, match="expected frames"):
        fit_frames(np.zeros((2, 8, 8, 5), np.uint8), 8, 8)
    # causal VAE, 4x: latent 0 <- frame 0, latent 1 <- frames 1..4, latent 2 <- frames 5..8
    m = np.array([1, 1, 1, 1, 1, 0, 0, 0, 1], bool)
    np.testing.assert_array_equal(latent_frame_mask(m, 4), [True, True, False])
    np.testing.assert_array_equal(latent_frame_mask(m, 1), m)
    assert pixel_frames(2, 4) == 5 and pixel_frames(3, 1) == 3


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--mode", "i2v"], "--mode i2v needs --image FILE"),
        (["--mode", "i2v", "--image", "{tmp}/missing.png"], "no such image file"),
        (["--mode", "i2v", "--image", "{tmp}/bad.png"], "cannot read image"),
        (["--mode", "extend", "--video", "{tmp}/empty.mp4"], "cannot decode video"),
        (["--mode", "connect", "--video", "{tmp}/empty.mp4"], "takes two --video files"),
        (["--mode", "edit", "--video", "{tmp}/empty.mp4", "--strength", "0"], "cannot decode video"),
        (["--mode", "loop", "--prompt", "b"], "takes one --prompt"),
        (["--mode", "t2v", "--prompt", " "], "empty prompt"),
    ],
)
def test_sample_modes_bad_input_is_one_line(tmp_path, capsys, args, message):
    (tmp_path / "bad.png").write_text("not an image")
    (tmp_path / "empty.mp4").write_bytes(b"")
    argv = ["sample", "--workdir", str(tmp_path / "none"), "--prompt", "a 3", "--out", str(tmp_path / "o")]
    rc = cli.main(argv + [a.replace("{tmp}", str(tmp_path)) for a in args])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and message in err[0], err
    assert not (tmp_path / "o").exists()


class _RecordingSampler:
    """Stands in for JitSampler: records the conditioning and returns the given latents (zeros elsewhere);
    codes through the autoencoder as JitSampler does."""

    def __init__(self, autoencoder, latent_shape):
        self.autoencoder, self.latent_shape = autoencoder, latent_shape
        self.calls = []

    def encode(self, videos):
        return np.asarray(self.autoencoder.encode(video_to_float(videos)))

    def decode(self, latents):
        return float_to_video(self.autoencoder.decode_chunked(latents))

    def sample(
        self, prompts, *, seed=0, cond=None, cond_mask=None, init=None, strength=1.0, negative_prompts=None
    ):
        self.calls.append((cond, cond_mask))
        out = np.zeros((len(prompts), *self.latent_shape), np.float32)
        if cond_mask is not None:
            out[cond_mask] = cond[cond_mask]
        return out


def test_prompting_through_a_causal_vae_gives_whole_latent_frames():
    from sora_jax.models import vae as vae_lib

    model = vae_lib.VideoVAE(vae_lib.vae_config("smoke"), rngs=nnx.Rngs(0))
    codec = vae_lib.VAECodec(*nnx.split(model, nnx.Param), model.cfg, shift=0.1, scale=0.5)
    shape = codec.latent_shape(9, 16, 16)
    rec = _RecordingSampler(codec, shape)
    p = Prompter(rec, 9, 16, 16, 8.0)
    img = _grey(1, 16, 16, 0)[0]
    assert p.i2v("a 3", img).shape == (9, 16, 16, 3)
    cond, mask = rec.calls[-1]
    np.testing.assert_array_equal(mask, [[True, False, False]])
    # causal coding: the image's latent inside the template equals the image coded alone
    alone = p.encode(img[None, None])
    np.testing.assert_allclose(cond[:, :1], alone, atol=1e-5)
    v = _grey(7, 16, 16, 1)
    out = p.extend("a 3", v, overlap=2)  # 2 latent frames cover 1 + 4 pixel frames
    assert p.pixel_overlap(2) == 5 and out.shape[0] == 7 + 9 - 5
    np.testing.assert_array_equal(rec.calls[-1][1], [[True, True, False]])
    videos, segments = p.long_video(["a 3"], num_frames=30, overlap=1)
    assert videos.shape[1] == 30 and [b - a for a, b in segments] == [9, 8, 8, 5]
    # segments decode in causal chunks: equal to the full decode
    z = np.random.default_rng(0).standard_normal((1, 3, 4, 4, 4)).astype(np.float32)
    np.testing.assert_allclose(codec.decode_chunked(z, 1), np.asarray(codec.decode(z)), atol=1e-5)


def test_from_pipeline_picks_the_bucket(parts):
    from types import SimpleNamespace

    cfg, graphdef, params = parts
    pipe = SimpleNamespace(
        config=cfg,
        graphdef=graphdef,
        params=params,
        text_input=factory.make_text_input(cfg),
        autoencoder=factory.make_autoencoder(cfg),
    )
    default = Prompter.from_pipeline(pipe)
    assert (default.frames, default.height, default.width) == (
        cfg.data.num_frames,
        cfg.data.height,
        cfg.data.width,
    )
    wide = Prompter.from_pipeline(pipe, bucket="8x16x32")
    assert wide.sampler.latent_shape == (8, 16, 32, 1)
    assert wide.i2v("a 3", _grey(1, 40, 40, 0)[0]).shape == (8, 16, 32, 3)


def test_history_guidance_acts_only_where_frames_are_given(parts, prompter):
    """The sampler's history guidance (Process.sample's history_scale): text-to-video is the same video
    (there is no history), an extension keeps its given frame and changes the frames it generates."""
    cfg, graphdef, params = parts
    d = cfg.data
    sampler = _jit(cfg, graphdef, params, autoencoder=factory.make_autoencoder(cfg), history_guidance=3.0)
    guided = Prompter(sampler, d.num_frames, d.height, d.width, 8.0)
    np.testing.assert_array_equal(guided.generate(PROMPTS, seed=1), prompter.generate(PROMPTS, seed=1))
    start = prompter.generate(PROMPTS[:1], seed=4)[0]
    a = prompter.extend(PROMPTS[0], start, overlap=1, seed=5)
    b = guided.extend(PROMPTS[0], start, overlap=1, seed=5)
    np.testing.assert_array_equal(a[: len(start)], b[: len(start)])
    assert np.abs(a[len(start) :].astype(int) - b[len(start) :]).max() > 0
