"""LoRA files (sora_jax/export/lora_files.py) and merging/attaching adapters (sora_jax/models/lora.py): a tiny Wan
with random adapters, written in the diffusers layout and the ComfyUI layout, loaded by diffusers (peft) into
``WanTransformer3DModel`` gives our JAX forward within 1e-4 (max abs difference relative to the output's max
abs value, float32); the native DiT's file merged into its PyTorch twin (``load_lora_weights``) likewise; read
back, the files give the adapters exactly; merged and unmerged (attached) adapters at weights 0.8 and 0.5 agree;
partial files work; bad files are one line."""

from __future__ import annotations

import copy
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from safetensors.numpy import load_file, save_file  # noqa: E402
from test_export_twins import DIT_VARIANTS, load_twin, randomized, rel_err  # noqa: E402
from test_wan import TINY_A, _inputs, _torch_forward, _torch_model  # noqa: E402

from sora_jax.export import configs, lora_files  # noqa: E402
from sora_jax.export.lora_files import Layout, LoraFileError  # noqa: E402
from sora_jax.export.sora_torch import SoraTransformer3DModel  # noqa: E402
from sora_jax.models import lora  # noqa: E402
from sora_jax.models import wan_convert as wc  # noqa: E402
from sora_jax.models.dit import DiT  # noqa: E402
from sora_jax.models.wan_t2v import WanTextToVideo  # noqa: E402

TOL = 1e-4
WAN_TARGETS = (r"^blocks/(attn1|attn2)/w[qkvo]$", r"^blocks/ffn/fc[12]/kernel$")
DIT_TARGETS = (r"^blocks/(attn|cross_attn)/w[qkvo]$", r"^blocks/mlp/fc[12]/kernel$")


def _random_adapters(model, seed: int, std: float = 0.3) -> None:
    """Every adapter (A and B) of ``model`` set to random values: B = 0 would test nothing."""
    state = nnx.state(model, nnx.LoRAParam)
    leaves, tree = jax.tree.flatten(state)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    nnx.update(
        model, jax.tree.unflatten(tree, [std * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    )


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    """(diffusers model without LoRA, our model with random rank-4 adapters (alpha 8: scale 2), inputs, our
    output, the folder written by ``write_adapters``)."""
    ref = _torch_model(TINY_A, seed=0)
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    model = wc.from_state_dict(sd, wc.config_from_diffusers(dict(ref.config)))
    inputs = _inputs(TINY_A, (3, 4, 4), seed=1)
    base_out = np.asarray(model(*map(jnp.asarray, inputs)))
    lora.add_adapters(model, lora.LoraSpec(rank=4, alpha=8.0, targets=WAN_TARGETS), seed=0)
    _random_adapters(model, seed=2)
    out = np.asarray(model(*map(jnp.asarray, inputs)))
    assert rel_err(out, base_out) > 1e-2  # the adapters matter
    folder = tmp_path_factory.mktemp("wan_lora")
    written = lora_files.write_adapters(model, folder, metadata={"run": "test"})
    assert [p.name for p in written] == [
        "pytorch_lora_weights.safetensors",
        "wan_lora_comfyui.safetensors",
        "adapter_config.json",
    ]
    return ref, model, inputs, out, folder


def _diffusers_forward(ref, file, inputs) -> np.ndarray:
    """diffusers' own loading path (``WanLoraLoaderMixin.load_lora_weights`` minus the pipeline): its
    ``lora_state_dict`` (which converts the ComfyUI layout) then ``load_lora_into_transformer`` (peft)."""
    model = copy.deepcopy(ref)
    state_dict = diffusers.WanPipeline.lora_state_dict(str(file))
    diffusers.WanPipeline.load_lora_into_transformer(state_dict, transformer=model, adapter_name="ours")
    assert "ours" in model.peft_config
    return _torch_forward(model, *inputs)


@pytest.mark.parametrize("layout", [Layout.DIFFUSERS, Layout.COMFYUI])
def test_wan_file_loaded_by_diffusers_matches_jax(wan, layout):
    ref, model, inputs, out, folder = wan
    got = _diffusers_forward(ref, folder / lora_files.FILES[layout], inputs)
    err = rel_err(got, out)
    print(f"wan lora {layout.value} via diffusers+peft: max abs diff / max abs output {err:.2e}")
    assert err < TOL, err


def test_wan_files_read_back_exactly_and_config(wan):
    _, model, _, _, folder = wan
    own = lora.model_adapters(model)
    assert len(own.kernels) == 10 and all(ka.scale == 2.0 for ka in own.kernels.values())
    comfy = lora_files.read_adapters(folder / lora_files.FILES[Layout.COMFYUI], model)
    diff = lora_files.read_adapters(folder, model)  # the folder: its diffusers file
    assert set(comfy.kernels) == set(diff.kernels) == set(own.kernels)
    for path, ka in own.kernels.items():
        a, b = np.asarray(ka.a), np.asarray(ka.b)
        c, d = comfy.kernels[path], diff.kernels[path]
        assert c.scale == 2.0 and d.scale == 1.0  # the diffusers file carries alpha/rank folded into lora_B
        np.testing.assert_array_equal(c.a, a)
        np.testing.assert_array_equal(c.b, b)
        np.testing.assert_array_equal(d.a, a)
        np.testing.assert_allclose(d.b, 2.0 * b, rtol=1e-7, atol=0)
    keys = load_file(folder / lora_files.FILES[Layout.DIFFUSERS])
    assert keys["transformer.blocks.1.attn1.to_out.0.lora_A.weight"].shape == (4, 48)  # [r, K*H]
    assert keys["transformer.blocks.0.ffn.net.0.proj.lora_B.weight"].shape == (96, 4)  # [out, r]
    comfy_keys = load_file(folder / lora_files.FILES[Layout.COMFYUI])
    assert float(comfy_keys["diffusion_model.blocks.0.cross_attn.k.alpha"]) == 8.0
    assert comfy_keys["diffusion_model.blocks.1.ffn.2.lora_down.weight"].shape == (4, 96)
    config = json.loads((folder / "adapter_config.json").read_text())
    assert config["base_model"] == "wan" and config["rank"] == 4 and config["alpha"] == 8.0
    assert config["layouts"] == {
        "diffusers": "pytorch_lora_weights.safetensors",
        "comfyui": "wan_lora_comfyui.safetensors",
    }
    assert "blocks/attn2/wq" in config["targets"] and config["metadata"]["run"] == "test"
    # the same file for the text-to-video model (parameters under transformer/), read against its abstract shape
    t2v = nnx.eval_shape(lambda: WanTextToVideo(model.cfg, rngs=nnx.Rngs(0)))
    got = lora_files.read_adapters(folder / lora_files.FILES[Layout.COMFYUI], t2v)
    assert set(got.kernels) == {f"transformer/{p}" for p in own.kernels}
    # kohya / musubi names (lora_unet_ + the ComfyUI names flattened) read the same
    kohya = {}
    for k, v in comfy_keys.items():
        name = k.removeprefix("diffusion_model.")
        module, tail = (name.split(".lora_")[0], ".lora_" + name.split(".lora_")[1]) if ".lora_" in name else (
            name.removesuffix(".alpha"), ".alpha")  # fmt: skip
        kohya["lora_unet_" + module.replace(".", "_") + tail] = v
    assert "lora_unet_blocks_0_self_attn_q.lora_down.weight" in kohya
    save_file(kohya, folder.parent / "kohya.safetensors")
    k = lora_files.read_adapters(folder.parent / "kohya.safetensors", model)
    for path, ka in own.kernels.items():
        np.testing.assert_array_equal(k.kernels[path].b, np.asarray(ka.b))
        assert k.kernels[path].scale == 2.0


def _two_adapters(wan, tmp_path):
    """(adapters 1: the fixture's file with block 1 and the MLPs left out; adapters 2: rank 2 on attn2 only)."""
    _, model, _, _, folder = wan
    tensors = load_file(folder / lora_files.FILES[Layout.COMFYUI])
    partial = {k: v for k, v in tensors.items() if ".blocks.1." not in k and ".ffn." not in k}
    save_file(partial, tmp_path / "partial.safetensors")
    first = lora_files.read_adapters(tmp_path / "partial.safetensors", model)
    assert len(first.kernels) == 8  # the attention kernels; blocks 1 have zeros
    for ka in first.kernels.values():
        assert not np.any(ka.b[1]) and np.any(ka.b[0])
    rng = np.random.default_rng(6)  # rank 2, alpha 1 on attn2 only, built directly
    kernels = {}
    for path, (module, name, n_in, lead) in lora.adaptable(model).items():
        shape = getattr(module, name).get_value().shape
        if path.startswith("blocks/attn2/"):
            a = rng.standard_normal((*shape[: lead + n_in], 2)).astype(np.float32) * 0.3
            b = rng.standard_normal((*shape[:lead], 2, *shape[lead + n_in :])).astype(np.float32) * 0.3
            kernels[path] = lora.KernelAdapter(a, b, 0.5)
    second = lora.Adapters(kernels, source="random")
    assert len(second.kernels) == 4 and second.kernels["blocks/attn2/wq"].scale == 0.5
    return first, second


def test_merged_and_attached_adapters_agree(wan, tmp_path):
    _, model, inputs, _, _ = wan
    first, second = _two_adapters(wan, tmp_path)
    pairs = [(first, 0.8), (second, 0.5)]
    x = [jnp.asarray(a) for a in inputs]
    merged = copy.deepcopy(model)  # keeps its own adapters live; the two are merged into the kernels
    lora.merge_adapters(merged, pairs)
    attached = copy.deepcopy(model)  # its own adapters and the two concatenated along the rank axis
    changed = lora.attach_adapters(attached, pairs)
    assert len(changed) == 8
    a = attached.blocks.attn2.wq_lora_a
    assert a.shape[-1] == 4 + 4 + 2 and attached.blocks.attn2.wq_lora_scale == 1.0
    assert (
        attached.blocks.attn1.wq_lora_a.shape[-1] == 4 + 4
        and attached.blocks.ffn.fc1.kernel_lora_scale == 2.0
    )
    y_merged, y_attached = np.asarray(merged(*x)), np.asarray(attached(*x))
    assert rel_err(y_merged, np.asarray(model(*x))) > 1e-2
    err = rel_err(y_attached, y_merged)
    print(f"merged vs attached (weights 0.8, 0.5): max abs diff / max abs output {err:.2e}")
    assert err < 1e-5, err
    # the attached model's file (ranks 10, 8 and 4 on different kernels) loads into diffusers as one adapter
    lora_files.write_adapters(attached, tmp_path / "attached")
    ref = wan[0]
    got = _diffusers_forward(ref, tmp_path / "attached" / lora_files.FILES[Layout.DIFFUSERS], inputs)
    assert rel_err(got, y_attached) < TOL, rel_err(got, y_attached)
    # merging a model's own adapters reproduces it with the adapters off
    plain = copy.deepcopy(model)
    lora.merge_adapters(plain, [(lora.model_adapters(model), 1.0)])
    for _, node in nnx.iter_graph(plain):
        for name in ("wq", "wk", "wv", "wo", "kernel"):
            if hasattr(node, name + "_lora_b"):
                b = getattr(node, name + "_lora_b")
                b.set_value(jnp.zeros_like(b[...]))
    assert rel_err(np.asarray(plain(*x)), np.asarray(model(*x))) < 1e-5


def dit_inputs(cfg) -> tuple[list, tuple]:
    """One DiT input (x ``[2, 4, 16, 16, C]``, t, text ``[2, 5, Dt]``, a key mask) as the PyTorch twin takes it
    (channels first) and as the JAX model does."""
    rng = np.random.default_rng(0)
    x = rng.standard_normal((2, 4, 16, 16, cfg.in_channels)).astype(np.float32)
    text = rng.standard_normal((2, 5, cfg.text_dim)).astype(np.float32)
    mask = np.array([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], bool)
    t = np.array([310.0, 870.0], np.float32)
    args = [torch.from_numpy(x).permute(0, 4, 1, 2, 3), *map(torch.from_numpy, (t, text, mask))]
    return args, tuple(map(jnp.asarray, (x, t, text, mask)))


def test_dit_file_merged_into_the_torch_twin_matches_jax(tmp_path):
    cfg = DIT_VARIANTS["pixel"]
    model = DiT(cfg, rngs=nnx.Rngs(0))
    flat = randomized(model, std=0.05)
    lora.add_adapters(model, lora.LoraSpec(rank=3, alpha=6.0, targets=DIT_TARGETS), seed=1)
    _random_adapters(model, seed=3, std=0.2)
    written = lora_files.write_adapters(model, tmp_path)
    assert [p.name for p in written] == ["pytorch_lora_weights.safetensors", "adapter_config.json"]
    keys = load_file(written[0])
    assert keys["transformer.blocks.1.cross_attn.to_k.lora_A.weight"].shape == (3, cfg.text_dim)
    assert "transformer.blocks.0.mlp.fc2.lora_B.weight" in keys
    twin = SoraTransformer3DModel(**configs.transformer_config(cfg))
    load_twin(twin, flat)
    args, jx = dit_inputs(cfg)
    with torch.no_grad():
        base = twin(*args).permute(0, 2, 3, 4, 1).numpy()
    changed = twin.load_lora_weights(str(tmp_path), weight=1.0)
    assert len(changed) == cfg.depth * 10
    with torch.no_grad():
        got = twin(*args).permute(0, 2, 3, 4, 1).numpy()
    want = np.asarray(model(*jx))
    assert rel_err(base, want) > 1e-2
    err = rel_err(got, want)
    print(f"dit lora via the torch twin: max abs diff / max abs output {err:.2e}")
    assert err < TOL, err
    back = lora_files.read_adapters(written[0], model)
    for path, ka in lora.model_adapters(model).kernels.items():
        np.testing.assert_allclose(back.kernels[path].b, 2.0 * np.asarray(ka.b), rtol=1e-7, atol=0)
    with pytest.raises(LoraFileError, match="ComfyUI|comfyui"):
        lora_files.adapter_tensors(model, Layout.COMFYUI)


def _one_line(excinfo) -> str:
    msg = str(excinfo.value)
    assert "\n" not in msg
    return msg


def test_bad_files_are_one_line(wan, tmp_path):
    _, model, _, _, folder = wan
    tensors = load_file(folder / lora_files.FILES[Layout.DIFFUSERS])
    cases = {
        "rank": ("transformer.blocks.0.attn1.to_q.lora_B.weight", np.zeros((48, 3), np.float32)),
        "shape": ("transformer.blocks.0.attn1.to_q.lora_A.weight", np.zeros((4, 40), np.float32)),
        "unknown": ("transformer.blocks.0.attn1.to_z.lora_A.weight", np.zeros((4, 48), np.float32)),
        "depth": ("transformer.blocks.7.attn1.to_q.lora_A.weight", np.zeros((4, 48), np.float32)),
        "bias": ("transformer.blocks.0.attn1.to_q.lora_B.bias", np.zeros((48,), np.float32)),
    }
    wants = {
        "rank": r"'transformer.blocks.0.attn1.to_q.lora_B.weight' has shape \[48, 3\]; the model wants \[48, 4\]",
        "shape": r"'transformer.blocks.0.attn1.to_q.lora_A.weight' has shape \[4, 40\]; the model wants \[r, 48\]",
        "unknown": r"'transformer.blocks.0.attn1.to_z.lora_A.weight' names no adaptable kernel of this wan model",
        "depth": r"'transformer.blocks.7.attn1.to_q.lora_A.weight' names no adaptable kernel",
        "bias": r"'transformer.blocks.0.attn1.to_q.lora_B.bias' is not a LoRA down/up weight",
    }
    for case, (key, value) in cases.items():
        save_file({**tensors, key: value}, tmp_path / f"{case}.safetensors")
        with pytest.raises(LoraFileError, match=wants[case]) as e:
            lora_files.read_adapters(tmp_path / f"{case}.safetensors", model)
        _one_line(e)
    alone = {k: v for k, v in tensors.items() if not k.endswith("blocks.0.attn1.to_q.lora_B.weight")}
    save_file(alone, tmp_path / "alone.safetensors")
    with pytest.raises(LoraFileError, match="to_q.lora_A.weight' has no lora_up/B partner"):
        lora_files.read_adapters(tmp_path / "alone.safetensors", model)
    # a Wan file against the native DiT: names no kernel; a folder without a file; not safetensors
    dit = nnx.eval_shape(lambda: DiT(DIT_VARIANTS["pixel"], rngs=nnx.Rngs(0)))
    with pytest.raises(LoraFileError, match="names no adaptable kernel of this dit model") as e:
        lora_files.read_adapters(folder / lora_files.FILES[Layout.COMFYUI], dit)
    _one_line(e)
    (tmp_path / "empty").mkdir()
    with pytest.raises(LoraFileError, match="0 .safetensors files"):
        lora_files.read_adapters(tmp_path / "empty", model)
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file")
    with pytest.raises(LoraFileError, match="not a readable safetensors file") as e:
        lora_files.read_adapters(tmp_path / "junk.safetensors", model)
    _one_line(e)
    plain = DiT(DIT_VARIANTS["pixel"], rngs=nnx.Rngs(0))
    with pytest.raises(LoraFileError, match="has no LoRA adapters"):
        lora_files.write_adapters(plain, tmp_path / "none")


def test_text_to_video_dit_workdir_model_round_trip(tmp_path):
    """The factory's text-to-video DiT with config.lora (parameters under ``dit/``, a text encoder beside):
    the file names the twin's modules (no ``dit.``) and reads back onto the abstract model."""
    from configs import finetune_lora
    from sora_jax import factory
    from sora_jax.config import load_config

    cfg = load_config(f"{finetune_lora.__file__}:smoke")
    model = factory.make_model(cfg, seed=0)
    _random_adapters(model, seed=4)
    lora_files.write_adapters(model, tmp_path)
    keys = load_file(tmp_path / lora_files.FILES[Layout.DIFFUSERS])
    assert all(k.startswith("transformer.blocks.") for k in keys), sorted(keys)[:3]
    back = lora_files.read_adapters(tmp_path, nnx.eval_shape(lambda: factory.make_model(cfg)))
    own = lora.model_adapters(model).kernels
    assert set(back.kernels) == set(own) and all(p.startswith("dit/blocks/") for p in own)
    for path, ka in own.items():
        np.testing.assert_allclose(back.kernels[path].b, ka.scale * np.asarray(ka.b), rtol=1e-6, atol=1e-7)
