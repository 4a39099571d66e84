"""The PyTorch twins (sora_jax/export/sora_torch) against the JAX models: random weights, float32, CPU,
within 1e-4 relative, two variants each; the name mapping both ways; sora_torch imports without JAX."""

from __future__ import annotations

import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
pytest.importorskip("diffusers")

from sora_jax.export import configs, names  # noqa: E402
from sora_jax.export.sora_torch import (  # noqa: E402
    HashWordTokenizer,
    SoraPixelCodec,
    SoraTextAdapter,
    SoraTextEncoder,
    SoraTransformer3DModel,
    SoraVideoVAE,
)
from sora_jax.models.autoencoder import IdentityAutoencoder, LumaAutoencoder  # noqa: E402
from sora_jax.models.dit import DiT, DiTConfig  # noqa: E402
from sora_jax.models.vae import VAEConfig, VideoVAE  # noqa: E402
from sora_jax.text.encoder import TextEncoderConfig, TrainableTextEncoder  # noqa: E402
from sora_jax.text.frozen import TextAdapter  # noqa: E402
from sora_jax.text.tokenizer import HashWordTokenizer as JaxHashWordTokenizer  # noqa: E402

TOL = 1e-4


def randomized(module: nnx.Module, seed: int = 1, std: float = 0.2) -> dict:
    """The module's parameters, each perturbed (adaLN-Zero would make a fresh DiT output zeros), as numpy
    {path: array}; written back into the module."""
    state = nnx.state(module, nnx.Param)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    state = jax.tree.unflatten(tree, [p + std * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    nnx.update(module, state)
    return {tuple(p): np.asarray(v.get_value()) for p, v in state.flat_state()}


def load_twin(twin, flat: dict) -> None:
    sd = {k: torch.from_numpy(np.array(v)) for k, v in names.to_torch(flat).items()}
    twin.load_state_dict(sd, strict=True)
    twin.eval()


def rel_err(a, b) -> float:
    a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
    return float(np.max(np.abs(a - b)) / max(np.max(np.abs(b)), 1e-12))


DIT_VARIANTS = {
    "pixel": DiTConfig(in_channels=1, patch_size=(2, 8, 8), width=32, depth=2, num_heads=2, text_dim=32),
    "pixel_out_conv": DiTConfig(  # the convolutional head: a 1x3x3 conv over 3 feature channels per pixel
        in_channels=1, patch_size=(2, 8, 8), width=32, depth=2, num_heads=2, text_dim=32, out_conv=3
    ),
    "latent": DiTConfig(
        in_channels=4,
        patch_size=(1, 2, 2),
        width=48,
        depth=3,
        num_heads=4,
        text_dim=24,
        qk_norm=False,
        pooled_text_cond=False,
        mlp_ratio=2.0,
        pos_embed="sincos_2d",  # on a 4 x 3 token grid
    ),
}


@pytest.mark.parametrize("variant", list(DIT_VARIANTS))
def test_dit_twin_matches_jax(variant):
    cfg = DIT_VARIANTS[variant]
    model = DiT(cfg, rngs=nnx.Rngs(0))
    flat = randomized(model, std=0.05)
    twin = SoraTransformer3DModel(**configs.transformer_config(cfg))
    load_twin(twin, flat)
    rng = np.random.default_rng(0)
    T, H, W = (4, 16, 16) if variant.startswith("pixel") else (3, 8, 6)
    x = rng.standard_normal((2, T, H, W, cfg.in_channels)).astype(np.float32)
    text = rng.standard_normal((2, 5, cfg.text_dim)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    for t in (np.array([310.0, 870.0], np.float32), rng.uniform(0, 1000, (2, T)).astype(np.float32)):
        want = np.asarray(model(jnp.asarray(x), jnp.asarray(t), jnp.asarray(text), jnp.asarray(mask)))
        with torch.no_grad():
            got = twin(
                torch.from_numpy(x).permute(0, 4, 1, 2, 3),
                torch.from_numpy(t),
                torch.from_numpy(text),
                torch.from_numpy(mask),
            ).permute(0, 2, 3, 4, 1)
        print(f"dit {variant} t{t.shape}: max rel err {rel_err(got, want):.2e}")
        assert rel_err(got, want) < TOL, rel_err(got, want)


VAE_VARIANTS = {
    "smoke": VAEConfig(
        base_width=8, width_mults=(1, 2, 2), temporal_down=(True, True), num_res_blocks=1, latent_channels=4
    ),
    "mixed": VAEConfig(
        base_width=8, width_mults=(1, 2), temporal_down=(False,), num_res_blocks=2, latent_channels=3
    ),
}


@pytest.mark.parametrize("variant", list(VAE_VARIANTS))
def test_vae_twin_matches_jax(variant):
    cfg = VAE_VARIANTS[variant]
    model = VideoVAE(cfg, rngs=nnx.Rngs(0))
    flat = randomized(model, std=0.05)
    shift, scale = 0.3, 1.7
    twin = SoraVideoVAE(**configs.vae_config(cfg, shift, scale))
    load_twin(twin, flat)
    rng = np.random.default_rng(1)
    T = 1 + cfg.temporal_downsample * 2
    x = rng.uniform(-1, 1, (2, T, 16, 16, 3)).astype(np.float32)
    want = (np.asarray(model.encode(jnp.asarray(x))) - shift) / scale
    with torch.no_grad():
        got = twin.encode(torch.from_numpy(x).permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1).numpy()
    assert got.shape == want.shape and rel_err(got, want) < TOL, rel_err(got, want)
    z = rng.standard_normal(want.shape).astype(np.float32)
    want_x = np.clip(np.asarray(model.decode(jnp.asarray(z * scale + shift))), -1, 1)
    with torch.no_grad():
        got_x = twin.decode(torch.from_numpy(z).permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1).numpy()
    assert got_x.shape == want_x.shape and rel_err(got_x, want_x) < TOL, rel_err(got_x, want_x)
    print(f"vae {variant}: encode {rel_err(got, want):.2e} decode {rel_err(got_x, want_x):.2e}")


@pytest.mark.parametrize("kind", ["identity", "luma"])
def test_pixel_codec_twins(kind):
    jax_codec = IdentityAutoencoder() if kind == "identity" else LumaAutoencoder()
    twin = SoraPixelCodec(kind=kind)
    x = np.random.default_rng(2).uniform(-1.2, 1.2, (1, 2, 4, 4, 3)).astype(np.float32)
    z = np.asarray(jax_codec.encode(jnp.asarray(x)))
    got = twin.encode(torch.from_numpy(x).permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1).numpy()
    np.testing.assert_allclose(got, z, rtol=1e-6, atol=1e-6)
    back = twin.decode(torch.from_numpy(z).permute(0, 4, 1, 2, 3)).permute(0, 2, 3, 4, 1).numpy()
    np.testing.assert_allclose(back, np.asarray(jax_codec.decode(jnp.asarray(z))), atol=1e-6)


TEXT_VARIANTS = {
    "small": TextEncoderConfig(vocab_size=64, max_length=8, width=32, depth=1, num_heads=2),
    "deeper": TextEncoderConfig(vocab_size=100, max_length=12, width=48, depth=3, num_heads=4, mlp_ratio=2.0),
}


@pytest.mark.parametrize("variant", list(TEXT_VARIANTS))
def test_text_encoder_and_tokenizer_twins(variant):
    cfg = TEXT_VARIANTS[variant]
    model = TrainableTextEncoder(cfg, rngs=nnx.Rngs(0))
    flat = randomized(model)
    twin = SoraTextEncoder(**configs.text_encoder_config(cfg))
    load_twin(twin, flat)
    prompts = ["a 3 moves left", "", "Two digits: a 4 moving down-left, and a 9!"]
    ids, mask = JaxHashWordTokenizer(cfg.vocab_size, cfg.max_length).encode(prompts)
    tids, tmask = HashWordTokenizer(cfg.vocab_size, cfg.max_length)(prompts)
    np.testing.assert_array_equal(tids.numpy(), ids)
    np.testing.assert_array_equal(tmask.numpy(), mask)
    want = np.asarray(model(jnp.asarray(ids), jnp.asarray(mask)))
    with torch.no_grad():
        got = twin(tids, tmask).numpy()
    assert rel_err(got, want) < TOL, rel_err(got, want)
    print(f"text encoder {variant}: max rel err {rel_err(got, want):.2e}")


@pytest.mark.parametrize("in_dim,width", [(384, 128), (40, 24)])
def test_text_adapter_twin(in_dim, width):
    model = TextAdapter(in_dim, width, rngs=nnx.Rngs(0))
    flat = randomized(model)
    twin = SoraTextAdapter(in_dim=in_dim, width=width)
    load_twin(twin, flat)
    rng = np.random.default_rng(3)
    emb = rng.standard_normal((2, 6, in_dim)).astype(np.float32)
    mask = np.array([[1] * 6, [1, 1, 0, 0, 0, 0]], bool)
    want = np.asarray(model(jnp.asarray(emb), jnp.asarray(mask)))
    with torch.no_grad():
        got = twin(torch.from_numpy(emb), torch.from_numpy(mask)).numpy()
    assert rel_err(got, want) < TOL, rel_err(got, want)


def test_names_round_trip_bitwise_and_named_errors():
    cfg = DIT_VARIANTS["latent"]
    flat = randomized(DiT(cfg, rngs=nnx.Rngs(0)))
    sd = names.to_torch(flat)
    assert "blocks.2.attn.to_q.weight" in sd and sd["blocks.2.attn.to_q.weight"].shape == (48, 48)
    shapes = {p: a.shape for p, a in flat.items()}
    back = names.from_torch(sd, shapes)
    for p, a in flat.items():
        assert back[p].dtype == a.dtype and np.array_equal(back[p], a), p
    missing = dict(sd)
    del missing["blocks.1.mlp.fc1.bias"]
    with pytest.raises(names.TensorMismatchError, match=r"'blocks.1.mlp.fc1.bias' is missing"):
        names.from_torch(missing, shapes)
    bad = dict(sd) | {"x_embedder.weight": np.zeros((3, 3), np.float32)}
    with pytest.raises(names.TensorMismatchError, match=r"'x_embedder.weight' has shape \[3, 3\]"):
        names.from_torch(bad, shapes)


def test_sora_torch_imports_without_jax(tmp_path):
    import shutil

    from sora_jax.export import sora_torch

    shutil.copytree(sora_torch.__path__[0], tmp_path / "sora_torch")
    code = (
        "import sys\n"
        "class Block:\n"
        "    def find_spec(self, name, path=None, target=None):\n"
        "        if name.split('.')[0] in ('jax', 'jaxlib', 'flax', 'sora_jax'):\n"
        "            raise ImportError('blocked: ' + name)\n"
        "sys.meta_path.insert(0, Block())\n"
        f"sys.path.insert(0, {str(tmp_path)!r})\n"
        "import sora_torch\n"
        "from sora_torch import SoraPipeline\n"
        "assert not any(m.split('.')[0] in ('jax', 'flax', 'sora_jax') for m in sys.modules)\n"
        "print('ok')\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=tmp_path)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]
