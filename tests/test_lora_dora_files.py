"""DoRA adapters in LoRA files (sora_jax/export/lora_files.py) and merged / attached (sora_jax/models/lora.py): a
tiny Wan with DoRA adapters (random A, B; magnitudes m away from the column norms) written in the diffusers layout
(peft's ``lora_magnitude_vector``) loads in diffusers (peft, ``use_dora``) and gives our JAX forward within 1e-4
(max abs difference relative to the output's max abs value, float32); the ComfyUI file (``dora_scale``, ComfyUI's
convention) reads back to the same adapter and is exactly what ComfyUI's formula makes; diffusers' Wan converter
refuses it; merged and attached DoRA equal the live DoRA model; the native DiT's DoRA file merged into its
PyTorch twin matches too."""

from __future__ import annotations

import copy
import json

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
diffusers = pytest.importorskip("diffusers")
pytest.importorskip("peft")

from safetensors.numpy import load_file, save_file  # noqa: E402
from test_export_twins import DIT_VARIANTS, load_twin, randomized, rel_err  # noqa: E402
from test_lora_files import DIT_TARGETS, TOL, WAN_TARGETS, _random_adapters, dit_inputs  # noqa: E402
from test_wan import TINY_A, _inputs, _torch_forward, _torch_model  # noqa: E402

from sora_jax.export import configs, lora_files  # noqa: E402
from sora_jax.export.lora_files import Layout, LoraFileError  # noqa: E402
from sora_jax.export.sora_torch import SoraTransformer3DModel  # noqa: E402
from sora_jax.models import lora  # noqa: E402
from sora_jax.models import wan_convert as wc  # noqa: E402
from sora_jax.models.dit import DiT  # noqa: E402


def _random_dora(model, seed: int, std: float = 0.3) -> None:
    """Random A and B (``_random_adapters``), then every magnitude m = ||W||_I times U(0.6, 1.4): m == the column
    norms would hide a magnitude written or read wrong."""
    _random_adapters(model, seed, std)
    rng = np.random.default_rng(seed)
    for _, (module, name, n_in, lead) in lora.adaptable(model).items():
        m = getattr(module, f"{name}_lora_m", None)
        if m is not None:
            norm = np.asarray(lora.column_norm(lora.kernel(module, name, jnp.float32), lead, n_in))
            m.set_value(jnp.asarray(norm * rng.uniform(0.6, 1.4, norm.shape), m.get_value().dtype))


def _without_magnitudes(model):
    """A copy of ``model`` with its DoRA magnitudes removed: the same adapters as plain LoRA."""
    plain = copy.deepcopy(model)
    for _, (module, name, _, _) in lora.adaptable(plain).items():
        if hasattr(module, f"{name}_lora_m"):
            delattr(module, f"{name}_lora_m")
    return plain


@pytest.fixture(scope="module")
def wan(tmp_path_factory):
    """(diffusers model without LoRA, its weights as a state dict, our model with random rank-4 DoRA adapters
    (alpha 8: scale 2), inputs, our output, the folder written by ``write_adapters``)."""
    ref = _torch_model(TINY_A, seed=0)
    sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
    model = wc.from_state_dict(sd, wc.config_from_diffusers(dict(ref.config)))
    inputs = _inputs(TINY_A, (3, 4, 4), seed=1)
    spec = lora.LoraSpec(rank=4, alpha=8.0, targets=WAN_TARGETS, dora=True)
    lora.add_adapters(model, spec, seed=0)
    _random_dora(model, seed=2)
    x = [jnp.asarray(a) for a in inputs]
    out = np.asarray(model(*x))
    assert rel_err(out, np.asarray(_without_magnitudes(model)(*x))) > 1e-2  # the magnitudes matter
    folder = tmp_path_factory.mktemp("wan_dora")
    lora_files.write_adapters(model, folder)
    return ref, sd, model, inputs, out, folder


def _base(wan):
    """Our Wan without adapters (the fixture's base weights)."""
    ref, sd = wan[0], wan[1]
    return wc.from_state_dict(sd, wc.config_from_diffusers(dict(ref.config)))


def test_diffusers_dora_file_loaded_by_diffusers_matches_jax(wan):
    ref, _, model, inputs, out, folder = wan
    file = folder / lora_files.FILES[Layout.DIFFUSERS]
    keys = load_file(file)
    assert keys["transformer.blocks.0.attn1.to_q.lora_magnitude_vector"].shape == (48,)  # [out]
    assert keys["transformer.blocks.1.ffn.net.0.proj.lora_magnitude_vector"].shape == (96,)
    config = json.loads((folder / lora_files.CONFIG_FILE).read_text())
    assert config["dora"] == config["targets"] and len(config["dora"]) == 10
    peft_model = copy.deepcopy(ref)  # diffusers' loading path, as test_lora_files._diffusers_forward
    state_dict = diffusers.WanPipeline.lora_state_dict(str(file))
    diffusers.WanPipeline.load_lora_into_transformer(state_dict, transformer=peft_model, adapter_name="ours")
    assert peft_model.peft_config["ours"].use_dora  # the magnitudes made peft build DoRA layers
    got = _torch_forward(peft_model, *inputs)
    err = rel_err(got, out)
    print(f"wan dora diffusers file via diffusers+peft: max abs diff / max abs output {err:.2e}")
    assert err < TOL, err
    back = lora_files.read_adapters(file, model)
    for path, ka in lora.model_adapters(model).kernels.items():
        np.testing.assert_array_equal(back.kernels[path].m, np.asarray(ka.m))
        np.testing.assert_allclose(back.kernels[path].b, 2.0 * np.asarray(ka.b), rtol=1e-7, atol=0)


def test_comfyui_dora_file_reads_back_and_is_comfyuis_kernel(wan):
    ref, _, model, inputs, out, folder = wan
    file = folder / lora_files.FILES[Layout.COMFYUI]
    keys = load_file(file)
    ds = keys["diffusion_model.blocks.1.self_attn.o.dora_scale"]
    assert ds.shape == (48, 1)  # [out, 1]: ComfyUI's per-output-channel dora_scale
    # ComfyUI's weight_decompose for a [out, 1] dora_scale: W' = dora_scale (W + s up@down) / (||W|| + eps),
    # the norm of the BASE weight over its input axis; it must give our DoRA kernel m (W + sAB) / ||W + sAB||
    module = model.blocks.attn1
    w = np.asarray(module.wo[...])[1].reshape(48, 48).T  # torch layout [out, in]
    up, down = (
        keys["diffusion_model.blocks.1.self_attn.o.lora_up.weight"],
        keys["diffusion_model.blocks.1.self_attn.o.lora_down.weight"],
    )
    alpha = float(keys["diffusion_model.blocks.1.self_attn.o.alpha"])
    calc = w + (alpha / down.shape[0]) * (up @ down)
    comfy = calc * ds / (np.linalg.norm(w, axis=1, keepdims=True) + np.finfo(np.float32).eps)
    m = np.asarray(module.wo_lora_m[...])[1].reshape(48)
    ours = calc * (m / np.linalg.norm(calc, axis=1))[:, None]
    np.testing.assert_allclose(comfy, ours, rtol=1e-5, atol=1e-6)
    # read back: the same adapter (A, B, scale exactly; m through ComfyUI's convention and back)
    back = lora_files.read_adapters(file, model)
    for path, ka in lora.model_adapters(model).kernels.items():
        got = back.kernels[path]
        np.testing.assert_array_equal(got.a, np.asarray(ka.a))
        np.testing.assert_array_equal(got.b, np.asarray(ka.b))
        assert got.scale == 2.0
        np.testing.assert_allclose(got.m, np.asarray(ka.m), rtol=1e-6, atol=0)
    merged = _base(wan)
    lora.merge_adapters(merged, [(back, 1.0)])
    err = rel_err(np.asarray(merged(*map(jnp.asarray, inputs))), out)
    print(f"wan dora comfyui file read back and merged: max abs diff / max abs output {err:.2e}")
    assert err < 1e-5, err
    # diffusers 0.42's Wan converter does not map dora_scale: it refuses the file
    with pytest.raises(ValueError, match="dora_scale"):
        diffusers.WanPipeline.lora_state_dict(str(file))
    # reading ComfyUI's dora_scale needs the base weights
    abstract = nnx.eval_shape(lambda: _base(wan))
    with pytest.raises(LoraFileError, match="base weights"):
        lora_files.read_adapters(file, abstract)
    bad = dict(keys)
    bad["diffusion_model.blocks.1.self_attn.o.dora_scale"] = np.ones((1, 48), np.float32)  # LyCORIS' [1, in]
    save_file(bad, folder.parent / "bad_dora.safetensors")
    with pytest.raises(LoraFileError, match="per-input-column"):
        lora_files.read_adapters(folder.parent / "bad_dora.safetensors", model)


def test_merged_and_attached_dora_equal_the_live_model(wan):
    _, _, model, inputs, out, folder = wan
    x = [jnp.asarray(a) for a in inputs]
    adapters = lora_files.read_adapters(folder, model)  # the diffusers file
    merged, attached = _base(wan), _base(wan)
    lora.merge_adapters(merged, [(adapters, 1.0)])
    lora.attach_adapters(attached, [(adapters, 1.0)])
    assert attached.blocks.attn1.wq_lora_m.shape == (2, 3, 16)  # [L, K, H]
    for name, got in (("merged", merged), ("attached", attached)):
        err = rel_err(np.asarray(got(*x)), out)
        print(f"wan dora {name} at weight 1: max abs diff / max abs output {err:.2e}")
        assert err < 1e-5, err
    # weight 0.5: W' = m (W + 0.5 s A B) / ||W + 0.5 s A B||, merged == attached
    merged, attached = _base(wan), _base(wan)
    lora.merge_adapters(merged, [(adapters, 0.5)])
    lora.attach_adapters(attached, [(adapters, 0.5)])
    y = np.asarray(merged(*x))
    assert rel_err(y, out) > 1e-3
    assert rel_err(np.asarray(attached(*x)), y) < 1e-5
    peft_model = copy.deepcopy(wan[0])  # peft at adapter weight 0.5 (its scaling halved) gives the same
    state_dict = diffusers.WanPipeline.lora_state_dict(str(folder / lora_files.FILES[Layout.DIFFUSERS]))
    diffusers.WanPipeline.load_lora_into_transformer(state_dict, transformer=peft_model, adapter_name="ours")
    peft_model.set_adapters(["ours"], [0.5])
    err = rel_err(_torch_forward(peft_model, *inputs), y)
    print(f"wan dora merged at weight 0.5 vs diffusers+peft set_adapters 0.5: {err:.2e}")
    assert err < TOL, err
    # a layer without magnitude (NaN row) is plain LoRA there: drop block 1's magnitudes from the file
    tensors = load_file(folder / lora_files.FILES[Layout.DIFFUSERS])
    part = {k: v for k, v in tensors.items() if not (".blocks.1." in k and k.endswith("magnitude_vector"))}
    save_file(part, folder.parent / "part.safetensors")
    some = lora_files.read_adapters(folder.parent / "part.safetensors", model)
    assert (
        np.isnan(some.kernels["blocks/attn1/wq"].m[1]).all()
        and not np.isnan(some.kernels["blocks/attn1/wq"].m[0]).any()
    )
    merged, attached = _base(wan), _base(wan)
    lora.merge_adapters(merged, [(some, 1.0)])
    lora.attach_adapters(attached, [(some, 1.0)])
    assert rel_err(np.asarray(attached(*x)), np.asarray(merged(*x))) < 1e-5
    # mixing a DoRA adapter with another one on a kernel has no exact unmerged form
    with pytest.raises(ValueError, match="DoRA") as e:
        lora.attach_adapters(_base(wan), [(adapters, 1.0), (adapters, 0.5)])
    assert "\n" not in str(e.value)
    with pytest.raises(ValueError, match="DoRA"):
        lora.attach_adapters(copy.deepcopy(model), [(adapters, 1.0)])  # the model's own DoRA adapter + one


def test_dit_dora_file_merged_into_the_torch_twin_matches_jax(tmp_path):
    cfg = DIT_VARIANTS["pixel"]
    model = DiT(cfg, rngs=nnx.Rngs(0))
    flat = randomized(model, std=0.05)
    lora.add_adapters(model, lora.LoraSpec(rank=3, alpha=6.0, targets=DIT_TARGETS, dora=True), seed=1)
    _random_dora(model, seed=3, std=0.2)
    written = lora_files.write_adapters(model, tmp_path)
    keys = load_file(written[0])
    assert keys["transformer.blocks.0.mlp.fc2.lora_magnitude_vector"].ndim == 1
    twin = SoraTransformer3DModel(**configs.transformer_config(cfg))
    load_twin(twin, flat)
    args, jx = dit_inputs(cfg)
    changed = twin.load_lora_weights(str(tmp_path), weight=1.0)
    assert len(changed) == cfg.depth * 10
    with torch.no_grad():
        got = twin(*args).permute(0, 2, 3, 4, 1).numpy()
    want = np.asarray(model(*jx))
    m, wq = np.asarray(model.blocks.attn.wq_lora_m[...]), model.blocks.attn.wq[...]
    assert np.abs(m / np.asarray(lora.column_norm(wq, 1, 1)) - 1).max() > 0.1  # m is not the base's norms
    err = rel_err(got, want)
    print(f"dit dora via the torch twin: max abs diff / max abs output {err:.2e}")
    assert err < TOL, err
