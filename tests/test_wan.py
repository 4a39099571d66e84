"""The Wan 2.1 transformer (``sora_jax.models.wan``) against diffusers' ``WanTransformer3DModel``: float32
parity on two tiny random configs (one read from a bf16, sharded ``save_pretrained`` folder), the state-dict
round trip, a remat + scan gradient step, full-size parameter counts through ``jax.eval_shape``, bad input."""

from __future__ import annotations

import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from sora_jax.models import wan
from sora_jax.models import wan_convert as wc

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")

# (diffusers config, latents [B, T, H, W, C], text length)
TINY_A = dict(
    patch_size=(1, 2, 2), num_attention_heads=3, attention_head_dim=16, in_channels=4, out_channels=4,
    text_dim=32, freq_dim=256, ffn_dim=96, num_layers=2, cross_attn_norm=True,
)  # fmt: skip
TINY_B = dict(
    patch_size=(2, 2, 2), num_attention_heads=2, attention_head_dim=32, in_channels=4, out_channels=6,
    text_dim=24, freq_dim=64, ffn_dim=80, num_layers=3, cross_attn_norm=False,
)  # fmt: skip


def _torch_model(config: dict, seed: int):
    """diffusers' model with random weights, the norms and scale-shift tables away from 1/0 too."""
    torch.manual_seed(seed)
    model = diffusers.WanTransformer3DModel(**config).eval()
    with torch.no_grad():
        for name, p in model.named_parameters():
            if "norm" in name:
                p.copy_((1.0 if name.endswith("weight") else 0.0) + 0.2 * torch.randn_like(p))
            elif "scale_shift_table" in name:
                p.copy_(0.3 * torch.randn_like(p))
            else:
                p.add_(0.02 * torch.randn_like(p))
    return model


def _inputs(config: dict, thw: tuple[int, int, int], seed: int, batch: int = 2, text_len: int = 7):
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((batch, *thw, config["in_channels"])).astype(np.float32)  # [B, T, H, W, C]
    t = np.array([3.0, 701.5][:batch], np.float32)
    text = rng.standard_normal((batch, text_len, config["text_dim"])).astype(np.float32)
    return x, t, text


def _torch_forward(model, x, t, text) -> np.ndarray:
    """diffusers' forward on channels-last numpy inputs -> channels-last numpy output."""
    with torch.no_grad():
        out = model(
            torch.from_numpy(x).permute(0, 4, 1, 2, 3).contiguous(),
            torch.from_numpy(t),
            torch.from_numpy(text),
            return_dict=False,
        )[0]
    return out.permute(0, 2, 3, 4, 1).float().numpy()


def _rel_err(ours, ref) -> float:
    return float(np.abs(np.asarray(ours, np.float32) - ref).max() / np.abs(ref).max())


def test_parity_in_memory_state_dict_and_round_trip():
    ref_model = _torch_model(TINY_A, seed=0)
    sd = {k: v.detach().numpy() for k, v in ref_model.state_dict().items()}
    cfg = wc.config_from_diffusers(dict(ref_model.config))
    assert cfg == wan.wan_config("tiny")
    model = wc.from_state_dict(sd, cfg)
    x, t, text = _inputs(TINY_A, (3, 4, 4), seed=1)
    ref = _torch_forward(ref_model, x, t, text)
    ours = model(jnp.asarray(x), jnp.asarray(t), jnp.asarray(text))
    assert ours.shape == ref.shape == x.shape
    err = _rel_err(ours, ref)
    print(f"wan parity (tiny A, float32 in memory): max rel err {err:.2e}")
    assert err < 1e-4
    # diffusers -> ours -> diffusers is bitwise, keys, shapes and dtypes included
    back = wc.to_diffusers_state_dict(model)
    assert sorted(back) == sorted(sd)
    for k, v in sd.items():
        assert back[k].dtype == v.dtype and back[k].shape == v.shape, k
        np.testing.assert_array_equal(back[k], v, err_msg=k)
    assert wc.config_from_diffusers(wc.config_to_diffusers(cfg)) == cfg


def test_parity_from_sharded_bf16_folder(tmp_path):
    ref_model = _torch_model(TINY_B, seed=2)
    folder = tmp_path / "transformer"
    ref_model.to(torch.bfloat16).save_pretrained(folder, max_shard_size="60KB")
    shards = sorted(p.name for p in folder.glob("*.safetensors"))
    assert len(shards) > 1 and (folder / wc.INDEX_FILE).is_file(), shards
    # diffusers reads its own bf16 files upcast to float32; we read the same files (a pipeline root works too)
    # diffusers' model from the same bf16 files upcast to float32 (loaded by hand: its from_pretrained wants
    # accelerate for the float32 modules)
    from safetensors.torch import load_file

    ref_model = diffusers.WanTransformer3DModel.from_config(
        diffusers.WanTransformer3DModel.load_config(folder)
    )
    on_disk = {k: v for f in folder.glob("*.safetensors") for k, v in load_file(f).items()}
    assert all(v.dtype == torch.bfloat16 for v in on_disk.values())
    ref_model.load_state_dict({k: v.float() for k, v in on_disk.items()}, strict=True)
    ref_model.eval()
    model = wan.from_diffusers(tmp_path, dtype="float32")  # the public entry point
    assert model.cfg.patch_size == (2, 2, 2) and model.cfg.out_channels == 6 and not model.cfg.cross_attn_norm
    x, t, text = _inputs(TINY_B, (4, 4, 4), seed=3, text_len=5)
    ref = _torch_forward(ref_model, x, t, text)
    ours = model(jnp.asarray(x), jnp.asarray(t), jnp.asarray(text))
    assert ours.shape == (*x.shape[:-1], 6)
    err = _rel_err(ours, ref)
    print(f"wan parity (tiny B, bf16 sharded folder -> float32): max rel err {err:.2e}")
    assert err < 1e-4
    # bf16 storage: the float32 modules stay float32 (diffusers' _keep_in_fp32_modules), the rest is bf16
    m16 = wc.from_diffusers(folder, dtype="bfloat16")
    assert m16.blocks.attn1.wq[...].dtype == jnp.bfloat16
    assert m16.blocks.scale_shift_table[...].dtype == jnp.float32
    out16 = m16(jnp.asarray(x), jnp.asarray(t), jnp.asarray(text))
    assert out16.dtype == jnp.bfloat16
    assert _rel_err(out16, ref) < 0.02  # measured 0.6%; diffusers' own bf16 model: 0.5-0.8%


def test_grad_step_with_remat_and_scan():
    cfg = wan.wan_config("tiny", remat="full")
    sd = {k: v.detach().numpy() for k, v in _torch_model(TINY_A, seed=5).state_dict().items()}
    plain = wc.from_state_dict(sd, wan.wan_config("tiny"))  # cheaper than an eager init on CPU
    _, params = nnx.split(plain, nnx.Param)
    gdef = nnx.graphdef(nnx.eval_shape(lambda: wan.WanTransformer(cfg, rngs=nnx.Rngs(0))))
    x, t, text = (jnp.asarray(a) for a in _inputs(TINY_A, (3, 4, 4), seed=4))

    @jax.jit
    def loss_and_grad(p):
        return jax.value_and_grad(lambda p: jnp.mean(nnx.merge(gdef, p)(x, t, text) ** 2))(p)

    loss, grads = loss_and_grad(params)
    # remat changes what the backward pass keeps, not the numbers
    assert np.isclose(float(loss), float(jnp.mean(plain(x, t, text) ** 2)), rtol=1e-5)
    leaves = jax.tree.leaves(grads)
    assert np.isfinite(float(loss)) and all(bool(jnp.all(jnp.isfinite(g))) for g in leaves)
    for g in (grads["blocks"]["attn1"]["wq"][...], grads["blocks"]["ffn"]["fc1"]["kernel"][...]):
        assert g.shape[0] == cfg.depth and float(jnp.abs(g).min(axis=tuple(range(1, g.ndim))).min()) > 0


def test_sharded_mesh_with_sequence_parallel_gives_one_device_output():
    """fsdp=2 x tensor=2 x seq=2 on the 8 fake CPU devices: parameters placed by their logical names,
    ring attention over seq; same output as one device."""
    from jax.sharding import AxisType, Mesh

    from sora_jax.parallel import sharding

    sd = {k: v.detach().numpy() for k, v in _torch_model(TINY_B, seed=6).state_dict().items()}
    cfg = wc.config_from_diffusers(TINY_B)
    model = wc.from_state_dict(sd, cfg)
    x, t, text = (jnp.asarray(a) for a in _inputs(TINY_B, (4, 4, 4), seed=7, text_len=5))
    ref = np.asarray(jax.jit(lambda m: m(x, t, text))(model))
    devices = np.asarray(jax.devices()[:8]).reshape(1, 2, 2, 2)
    mesh = Mesh(devices, sharding.MESH_AXES, axis_types=(AxisType.Auto,) * 4)
    ring = wc.config_from_diffusers(TINY_B, seq_parallel="ring")
    gdef = nnx.graphdef(nnx.eval_shape(lambda: wan.WanTransformer(ring, rngs=nnx.Rngs(0))))
    params = nnx.state(model, nnx.Param)
    p_sh = sharding.state_shardings(params, mesh)
    assert tuple(p_sh["blocks"]["attn1"]["wq"].get_value().spec) == (None, "fsdp", "tensor", None)

    def fwd(p, x, t, text):
        with sharding.activation_sharding(mesh):
            return nnx.merge(gdef, p)(x, t, text)

    out = jax.jit(fwd, in_shardings=(p_sh, None, None, None))(jax.device_put(params, p_sh), x, t, text)
    np.testing.assert_allclose(np.asarray(out), ref, rtol=0, atol=1e-5 * np.abs(ref).max())


@pytest.mark.parametrize("variant", ["1.3B", "14B"])
def test_full_size_param_count_and_names(variant):
    cfg = wan.wan_config(variant)
    abstract = nnx.eval_shape(lambda: wan.WanTransformer(cfg, rngs=nnx.Rngs(0)))
    n = sum(p.size for p in jax.tree.leaves(nnx.state(abstract, nnx.Param)))
    assert n == wan.param_count(cfg)
    with torch.device("meta"):
        ref = diffusers.WanTransformer3DModel(
            **{k: v for k, v in wc.config_to_diffusers(cfg).items() if k[0] != "_"}
        )
    shapes = {k: tuple(v.shape) for k, v in ref.state_dict().items()}
    assert sum(int(np.prod(s)) for s in shapes.values()) == n
    assert set(shapes) == set(wc._name_map(cfg))
    print(f"Wan2.1 {variant}: {n / 1e9:.3f}B parameters")
    # every parameter has logical names, all known to the rules table
    from sora_jax.parallel.sharding import logical_to_spec

    for leaf in jax.tree.leaves(
        nnx.state(abstract, nnx.Param), is_leaf=lambda v: isinstance(v, nnx.Variable)
    ):
        names = leaf.get_metadata().get("out_sharding")
        assert names is not None and len(names) == len(leaf.shape)
        logical_to_spec(names)


def test_bad_inputs_raise(tmp_path):
    cfg = wan.wan_config("tiny")
    with pytest.raises(ValueError, match="image_dim=1280.*text-to-video"):
        wc.config_from_diffusers({**TINY_A, "image_dim": 1280, "added_kv_proj_dim": 48})
    with pytest.raises(ValueError, match="unknown Wan variant"):
        wan.wan_config("7B")
    with pytest.raises(ValueError, match="divisible"):
        wan.wan_config("tiny", num_heads=5)
    ref_model = _torch_model(TINY_A, seed=0)
    sd = {k: v.detach().numpy() for k, v in ref_model.state_dict().items()}
    sd["blocks.9.attn1.to_q.weight"] = sd.pop("blocks.1.attn1.to_q.weight")
    with pytest.raises(
        ValueError, match=r"missing 1: blocks\.1\.attn1\.to_q\.weight; unexpected 1: blocks\.9"
    ):
        wc.from_state_dict(sd, cfg)
    sd["blocks.1.attn1.to_q.weight"] = sd.pop("blocks.9.attn1.to_q.weight")[:, :-1]
    with pytest.raises(ValueError, match=r"blocks\.1\.attn1\.to_q\.weight has shape \(48, 47\)"):
        wc.from_state_dict(sd, cfg)
    with pytest.raises(FileNotFoundError, match="config.json"):
        wc.from_diffusers(tmp_path)
    (tmp_path / "config.json").write_text(json.dumps(wc.config_to_diffusers(cfg)))
    with pytest.raises(FileNotFoundError, match="safetensors"):
        wc.from_diffusers(tmp_path)
    model = wc.from_state_dict({k: v.detach().numpy() for k, v in ref_model.state_dict().items()}, cfg)
    x, t, text = (jnp.asarray(a) for a in _inputs(TINY_A, (3, 4, 4), seed=0))
    with pytest.raises(ValueError, match="divisible"):
        model(x[:, :, :3], t, text)
    with pytest.raises(ValueError, match="text"):
        model(x, t, text[..., :5])
    with pytest.raises(ValueError, match="timestep"):
        model(x, t[:1], text)
