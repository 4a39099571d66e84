"""The Wan 2.1 VAE (``sora_jax.models.wan_vae``) against diffusers' ``AutoencoderKLWan``: a tiny random model
saved with ``save_pretrained`` and loaded with ``from_diffusers``; encode (posterior mean and log-variance) and
decode of a 9-frame video within 1e-4 relative of diffusers, through our full causal pass and our chunked
pass; the state dict round trip (bitwise); the full-size preset's keys and shapes; errors naming bad keys."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

from sora_jax.models import wan_vae as wv  # noqa: E402
from sora_jax.models import wan_vae_convert as wc  # noqa: E402

# 3 levels of downsampling, two of them temporal (as Wan 2.1): 9 x 16 x 16 -> 3 x 2 x 2
TINY = dict(
    base_dim=8,
    z_dim=4,
    dim_mult=[1, 2, 2, 2],
    num_res_blocks=1,
    temperal_downsample=[False, True, True],
    latents_mean=[0.1, -0.2, 0.3, 0.0],
    latents_std=[1.5, 0.5, 2.0, 1.0],
)
TOL = 1e-4


def rel_err(ours, ref) -> float:
    """max |ours - ref| / max |ref|, ours channels-last [B, T, H, W, C], ref diffusers' [B, C, T, H, W]."""
    ours = np.moveaxis(np.asarray(ours), -1, 1)
    assert ours.shape == ref.shape, (ours.shape, ref.shape)
    return float(np.abs(ours - ref).max() / np.abs(ref).max())


def to_jax(x):
    return jnp.asarray(np.moveaxis(x.numpy(), 1, -1))


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    """(diffusers model, its folder, our model loaded from it): random weights, norm gammas and biases."""
    torch.manual_seed(0)
    ref = diffusers.AutoencoderKLWan(**TINY).eval()
    with torch.no_grad():
        for name, p in ref.named_parameters():
            if name.endswith("gamma"):
                p.copy_(1.0 + 0.3 * torch.randn_like(p))
            elif name.endswith("bias"):
                p.copy_(0.1 * torch.randn_like(p))
        ref.decoder.conv_out.weight.mul_(6.0)  # part of the video past [-1, 1]: diffusers' clamp matters
    folder = tmp_path_factory.mktemp("wan_vae") / "vae"
    ref.save_pretrained(folder)
    return ref, folder, wc.from_diffusers(folder)


@pytest.fixture(scope="module")
def references(tiny):
    """diffusers' default path (no tiling) on a 9-frame 16 x 16 video."""
    ref, _, _ = tiny
    torch.manual_seed(1)
    x = torch.rand(1, 3, 9, 16, 16) * 2 - 1
    with torch.no_grad():
        post = ref.encode(x).latent_dist
        z = post.mean
        dec = ref.decode(z).sample
    return dict(x=x, mean=post.mean.numpy(), logvar=post.logvar.numpy(), z=z, dec=dec.numpy())


def jitted(model, method: str):
    graphdef, state = nnx.split(model)
    return lambda a: jax.jit(lambda s, a: getattr(nnx.merge(graphdef, s), method)(a))(state, a)


def test_encode_matches_diffusers_full_and_chunked(tiny, references):
    _, _, model = tiny
    x = to_jax(references["x"])
    full = jitted(model, "encode")(x)
    chunked = wv.encode_chunked(model, x)
    assert full.mean.shape == (1, 3, 2, 2, 4)
    errs = {
        "full mean": rel_err(full.mean, references["mean"]),
        "full logvar": rel_err(full.logvar, references["logvar"]),
        "chunked mean": rel_err(chunked.mean, references["mean"]),
        "chunked logvar": rel_err(chunked.logvar, references["logvar"]),
    }
    print(errs)
    assert max(errs.values()) < TOL, errs
    assert np.allclose(wv.encode_chunked(model, x, chunk_frames=8).mean, full.mean, atol=1e-5)


def test_decode_matches_diffusers_full_and_chunked(tiny, references):
    _, _, model = tiny
    z = to_jax(references["z"])
    decode = jitted(model, "decode")
    full, chunked = decode(z), wv.decode_chunked(model, z)
    assert full.shape == (1, 9, 16, 16, 3)
    assert 0.05 < float(jnp.mean(jnp.abs(full) == 1.0)) < 0.95  # the clamp is exercised
    errs = {
        "full": rel_err(full, references["dec"]),
        "chunked": rel_err(chunked, references["dec"]),
    }
    print(errs)
    assert max(errs.values()) < TOL, errs


def test_state_dict_round_trip(tiny, tmp_path):
    ref, _, model = tiny
    theirs = {k: v.numpy() for k, v in ref.state_dict().items()}
    ours = wc.to_diffusers_state_dict(model)
    assert sorted(ours) == sorted(theirs)
    for k, v in theirs.items():
        assert ours[k].shape == v.shape and ours[k].dtype == v.dtype, k
        assert np.array_equal(ours[k], v), k
    back = wc.from_diffusers_state_dict(ours, model.cfg)
    for (p, a), (_, b) in zip(nnx.to_flat_state(nnx.state(model)), nnx.to_flat_state(nnx.state(back))):
        assert np.array_equal(np.asarray(a.get_value()), np.asarray(b.get_value())), p
    # our folder loads into diffusers with the same tensors and config
    folder = wc.save_diffusers(model, tmp_path / "out")
    again = diffusers.AutoencoderKLWan.from_pretrained(folder)
    assert {
        k: list(v) if isinstance(v, tuple) else v for k, v in dict(again.config).items() if k in TINY
    } == TINY
    for k, v in again.state_dict().items():
        assert np.array_equal(v.numpy(), theirs[k]), k


def test_wan21_preset_matches_diffusers_default():
    with torch.device("meta"):
        ref = diffusers.AutoencoderKLWan()  # diffusers' defaults are Wan 2.1's VAE
    cfg = wv.WanVAEConfig()
    assert wc.config_from_diffusers(dict(ref.config)) == cfg
    assert cfg.temporal_downsample == 4 and cfg.spatial_downsample == 8
    _, state = nnx.split(nnx.eval_shape(lambda: wv.WanVAE(cfg, rngs=nnx.Rngs(0))))
    ours = {
        wc.diffusers_key(p): wc._to_torch_layout(
            wc.diffusers_key(p), np.zeros(v.get_value().shape, np.int8)
        ).shape
        for p, v in nnx.to_flat_state(state)
    }
    theirs = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert ours == theirs
    assert wc.param_count(cfg) == sum(p.numel() for p in ref.parameters())


def test_latent_normalization_as_the_pipelines():
    cfg = wv.WanVAEConfig()
    z = np.random.default_rng(0).standard_normal((1, 2, 3, 3, 16)).astype(np.float32)
    zt = torch.from_numpy(np.moveaxis(z, -1, 1).copy())
    mean = torch.tensor(cfg.latents_mean).view(1, 16, 1, 1, 1)
    inv_std = 1.0 / torch.tensor(cfg.latents_std).view(1, 16, 1, 1, 1)
    denorm = zt / inv_std + mean  # WanPipeline before vae.decode
    norm = (zt - mean) * inv_std  # WanImageToVideoPipeline after vae.encode
    assert rel_err(wv.denormalize_latents(jnp.asarray(z), cfg), denorm.numpy()) < 1e-6
    assert rel_err(wv.normalize_latents(jnp.asarray(z), cfg), norm.numpy()) < 1e-6
    back = wv.normalize_latents(wv.denormalize_latents(jnp.asarray(z), cfg), cfg)
    assert np.allclose(back, z, atol=1e-6)


def test_bad_weights_and_configs_raise(tiny, tmp_path):
    _, folder, model = tiny
    sd = wc.to_diffusers_state_dict(model)
    bad = dict(sd)
    del bad["decoder.conv_in.weight"]
    bad["encoder.extra.weight"] = np.zeros(1, np.float32)
    with pytest.raises(
        ValueError, match=r"missing \['decoder.conv_in.weight'\].*unexpected \['encoder.extra"
    ):
        wc.from_diffusers_state_dict(bad, model.cfg)
    bad = dict(sd, **{"quant_conv.weight": np.zeros((8, 8, 1, 1, 2), np.float32)})
    with pytest.raises(ValueError, match="quant_conv.weight has shape"):
        wc.from_diffusers_state_dict(bad, model.cfg)
    with pytest.raises(ValueError, match="Wan 2.2"):
        wc.config_from_diffusers({**TINY, "is_residual": True})
    with pytest.raises(ValueError, match="unknown AutoencoderKLWan keys"):
        wc.config_from_diffusers({**TINY, "mystery": 1})
    with pytest.raises(ValueError, match=r"1 \+ 4k frames"):
        model.encode(jnp.zeros((1, 6, 16, 16, 3)))
    (tmp_path / "config.json").write_text(json.dumps(TINY))
    with pytest.raises(FileNotFoundError, match="no weights"):
        wc.from_diffusers(tmp_path)


@pytest.mark.parametrize("kernel,stride", [((3, 3, 3), (1, 1, 1)), ((3, 1, 1), (2, 1, 1))])
def test_causal_conv_3d_path_equals_cpu_path(monkeypatch, kernel, stride):
    """The accelerator path (one 3D convolution) equals the CPU path (kt 2D convolutions) run by the tests."""
    conv = wv.CausalConv3d(4, 6, kernel, stride, rngs=nnx.Rngs(0))
    x = jax.random.normal(jax.random.key(1), (2, 7, 5, 5, 4))
    cpu = conv(x)
    monkeypatch.setattr(jax, "default_backend", lambda: "gpu")
    assert np.allclose(conv(x), cpu, atol=1e-5)


def test_from_diffusers_reads_bf16_and_sharded_folders(tiny, tmp_path):
    """A bfloat16 folder sharded with an index (read without torch: safe_open + the raw layout for bf16)."""
    ref, _, model = tiny
    ref16 = diffusers.AutoencoderKLWan(**TINY).to(torch.bfloat16)
    ref16.load_state_dict({k: v.to(torch.bfloat16) for k, v in ref.state_dict().items()})
    ref16.save_pretrained(tmp_path, max_shard_size="20KB")
    assert (tmp_path / wc.INDEX).is_file()
    loaded = wc.from_diffusers(tmp_path, dtype="bfloat16", param_dtype="float32")
    assert loaded.cfg.dtype == "bfloat16" and loaded.cfg.param_dtype == "float32"
    got = wc.to_diffusers_state_dict(loaded)
    for k, v in ref16.state_dict().items():
        assert np.array_equal(got[k], v.float().numpy()), k
