"""The pmap evaluation sampler: device-count invariance, guidance, outputs on disk."""

import jax
import numpy as np
import pytest

from sora_jax import factory
from sora_jax.sample.outputs import write_samples
from sora_jax.sample.sampler import PmapSampler
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


def test_guidance_scale_changes_the_videos(parts):
    cfg, graphdef, params = parts
    a = make_sampler(cfg, graphdef, jax.local_devices()[:1], scale=1.0).generate(params, PROMPTS[:1])
    b = make_sampler(cfg, graphdef, jax.local_devices()[:1], scale=4.0).generate(params, PROMPTS[:1])
    assert not np.array_equal(a, b)


def test_write_samples(parts, tmp_path):
    cfg, graphdef, params = parts
    videos = make_sampler(cfg, graphdef, jax.local_devices()[:1]).generate(params, PROMPTS[:2])
    paths = write_samples(tmp_path, videos, PROMPTS[:2], fps=cfg.data.fps)
    assert len(paths["mp4"]) == 2 and paths["contact_sheet"].is_file()
    back = read_video(paths["mp4"][0])
    assert back.shape[0] == cfg.data.num_frames
    assert not list(tmp_path.glob("*.tmp"))
