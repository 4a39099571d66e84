"""A LoRA run's frozen base stored int8 / fp8 / bf16 (``config.lora.base_dtype``, sora_jax/models/quant.py) and
DoRA (``config.lora.dora``): the quantized models stay close to the full-precision base (errors measured and
printed), only adapters train over a quantized base, the compiled step's arguments shrink, DoRA starts at the
base, trains its magnitudes and equals its merged weight."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from configs import quickstart
from sora_jax import factory, loading
from sora_jax.config import ConfigError, load_config
from sora_jax.models import lora, quant
from sora_jax.models.wan_t2v import WanTextToVideo
from sora_jax.models.wan_transformer import wan_config
from sora_jax.parallel.mesh import make_mesh
from sora_jax.train.loop import _initial_state, build_train_fns, train
from tests.test_lora import _base_workdir, _batch, _lora_config, _perturbed

# max |quantized - base| / max |base| of a tiny model's output (float32 compute): measured 0.5% (int8) and 2.3%
# (fp8) on the tiny Wan; the bounds leave room for other seeds
REL_TOL = {"int8": 0.02, "float8_e4m3fn": 0.06, "bfloat16": 0.02}


def _wan():
    """A tiny Wan with adapters and scales, its graph, base and adapters, and an input (latents, t, text)."""
    model = WanTextToVideo(wan_config("tiny"), rngs=nnx.Rngs(0))
    lora.add_adapters(model, lora.LoraSpec(rank=4, alpha=4.0), seed=3)
    quant.add_scales(lora.adaptable(model))
    graph, params = nnx.split(model, nnx.Param)
    adapters, base = nnx.split_state(params, nnx.LoRAParam, ...)
    lat = jax.random.normal(jax.random.key(1), (2, 2, 4, 4, 4))
    t, text = jnp.array([10.0, 900.0]), jax.random.normal(jax.random.key(2), (2, 5, 32))
    return graph, base, adapters, (lat, t, text)


def _dit():
    cfg = _lora_config(**{"lora.base_dtype": "int8"})
    model = factory.make_model(cfg, seed=0)
    graph, params = nnx.split(model, nnx.Param)
    adapters, base = nnx.split_state(params, nnx.LoRAParam, ...)
    base = _perturbed(base)  # a fresh DiT outputs zeros (adaLN-Zero)
    k = jax.random.split(jax.random.key(0), 2)
    base_cfg = load_config(f"{quickstart.__file__}:smoke")
    ids = jax.random.randint(k[1], (2, base_cfg.text.max_length), 0, base_cfg.text.vocab_size)
    x = jax.random.normal(k[0], (2, 4, 16, 16, 1)), jnp.array([100.0, 700.0]), ids, jnp.ones(ids.shape, bool)
    return graph, base, adapters, x


@pytest.mark.parametrize("arch", ["dit", "wan"])
def test_quantized_base_is_close_to_the_full_precision_base(arch):
    graph, base, adapters, x = _dit() if arch == "dit" else _wan()
    run = lambda b: np.asarray(  # noqa: E731
        (lambda m: m(*x) if arch == "dit" else m.transformer(*x))(
            nnx.merge(graph, nnx.merge_state(b, adapters))
        )
    )
    ref = run(base)
    assert np.abs(ref).max() > 0
    for dtype, tol in REL_TOL.items():
        stored = quant.store_base(base, dtype)
        kernels = {str(p[-1]): v.value.dtype for p, v in nnx.to_flat_state(stored)}
        if dtype in quant.QUANTIZED:
            assert kernels["wq"] == jnp.dtype(dtype) and kernels["wq_qscale"] == jnp.float32
        err = float(np.abs(run(stored) - ref).max() / np.abs(ref).max())
        print(f"{arch} base {dtype}: max |out - out_f32| / max |out_f32| = {err:.4f}, "
              f"base {quant.nbytes(stored)} of {quant.nbytes(base)} bytes")  # fmt: skip
        assert err < tol, (dtype, err)
        assert quant.nbytes(stored) < 0.6 * quant.nbytes(base)


def test_quantize_roundtrip_per_output_channel():
    w = jax.random.normal(jax.random.key(0), (3, 16, 2, 4)) * jnp.arange(1, 9).reshape(2, 4)  # [L, D, K, H]
    q, s = quant.quantize(w, (3, 1, 2, 4), "int8")
    assert q.dtype == jnp.int8 and s.shape == (3, 1, 2, 4)
    assert int(jnp.abs(q).max()) == 127  # absmax maps to 127 in every channel
    back = quant.dequantize(q, s, jnp.float32)
    assert float(jnp.max(jnp.abs(back - w) / s)) <= 0.5 + 1e-5  # half a step at most


def test_int8_base_trains_adapters_only_and_the_compiled_base_shrinks(tmp_path):
    base_wd = _base_workdir(tmp_path / "base")
    mesh = make_mesh(_lora_config(**{"mesh.data": 1}).mesh, jax.devices()[:1])
    args = {}
    for dtype in ("", "int8"):
        cfg = _lora_config(**{"lora.init_from": str(base_wd), "mesh.data": 1, "lora.base_dtype": dtype})
        fns = build_train_fns(cfg, mesh, shapes_only=True)
        spec = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=a.sharding),
                            _batch(cfg, mesh, 0))  # fmt: skip
        mem = fns.step.lower(fns.abstract_state, spec, fns.frozen).compile().memory_analysis()
        args[dtype] = (mem.argument_size_in_bytes, quant.nbytes(fns.frozen["base"]), mem.temp_size_in_bytes)
    print(f"compiled step (argument, base, temp bytes): f32 base {args['']}, int8 base {args['int8']}")
    assert args["int8"][1] < 0.5 * args[""][1]  # the tiny DiT: embedders and adaLN (bf16) weigh a lot
    assert args[""][0] - args["int8"][0] >= 0.9 * (args[""][1] - args["int8"][1])  # the saving is the base's

    fns = build_train_fns(cfg, mesh)  # the int8 run, its base read from the workdir and quantized
    assert fns.frozen["base"]["dit"]["blocks"]["mlp"]["fc1"]["kernel"].value.dtype == jnp.int8
    state = fns.init()
    before, start = jax.device_get(fns.frozen["base"]), jax.device_get(state["params"])
    for i in range(3):  # lr 0 at step 0 (warmup), A moves once B has: 3 steps move every adapter
        state, metrics = fns.step(state, _batch(cfg, mesh, i), fns.frozen)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    for (_, b0), (_, b1) in zip(nnx.to_flat_state(before), nnx.to_flat_state(fns.frozen["base"])):
        np.testing.assert_array_equal(np.asarray(b0.value), np.asarray(b1.value))
    moved = [not np.array_equal(a.value, b.value) for (_, a), (_, b) in zip(
        nnx.to_flat_state(start), nnx.to_flat_state(jax.device_get(state["params"])))]  # fmt: skip
    assert all(moved)


def test_bad_base_dtype_is_one_line():
    with pytest.raises(ConfigError, match="config.lora.base_dtype") as e:
        _lora_config(**{"lora.base_dtype": "float16"})
    assert "\n" not in str(e.value)


# ---------------------------------------------------------------------------------------------------- DoRA


def _dora_wan():
    model = WanTextToVideo(wan_config("tiny"), rngs=nnx.Rngs(0))
    graph0, params0 = nnx.split(model, nnx.Param)
    model = nnx.merge(graph0, _perturbed(params0))
    lat = jax.random.normal(jax.random.key(1), (2, 2, 4, 4, 4))
    t, text = jnp.array([10.0, 900.0]), jax.random.normal(jax.random.key(2), (2, 5, 32))
    ref = np.asarray(model.transformer(lat, t, text))
    lora.add_adapters(model, lora.LoraSpec(rank=4, alpha=8.0, dora=True), seed=3)
    return model, ref, (lat, t, text)


def test_dora_starts_at_the_base_and_its_magnitudes_get_gradients():
    model, ref, x = _dora_wan()
    m = model.transformer.blocks.ffn.fc1.kernel_lora_m
    assert m.value.shape == (2, 96) and isinstance(m, nnx.LoRAParam)  # [L, *O]
    np.testing.assert_allclose(np.asarray(model.transformer(*x)), ref, rtol=1e-5, atol=1e-5)
    graph, params = nnx.split(model, nnx.Param)
    adapters, base = nnx.split_state(params, nnx.LoRAParam, ...)
    adapters = jax.tree.map(lambda v: v + 0.01, adapters)  # B != 0: every gradient path is live

    def loss(ad):
        return jnp.mean(jnp.square(nnx.merge(graph, nnx.merge_state(base, ad)).transformer(*x)))

    grads = jax.grad(loss)(adapters)
    for path, g in nnx.to_flat_state(grads):
        assert np.abs(np.asarray(g.value)).max() > 0, path  # m, A and B all receive gradients


def test_dora_equals_its_merged_weight():
    model, _, x = _dora_wan()
    graph, params = nnx.split(model, nnx.Param)
    adapters, base = nnx.split_state(params, nnx.LoRAParam, ...)
    adapters = _perturbed(adapters, seed=5)  # moved A, B (B != 0) and m
    dora = nnx.merge(graph, nnx.merge_state(base, adapters))
    out = np.asarray(dora.transformer(*x))
    # merged: W' = m (W + s A B) / ||W + s A B||_I, no adapters
    plain = nnx.merge(graph, nnx.merge_state(base, adapters))
    for _, (module, name, n_in) in lora._candidates(plain).items():
        w = lora.merged_kernel(module, name, n_in)
        m = getattr(module, f"{name}_lora_m").value
        getattr(module, name).value = w * (m / lora.column_norm(w, 1, n_in)).reshape(
            m.shape[0], *(1,) * n_in, *m.shape[1:]
        )
        for suffix in ("_lora_a", "_lora_b", "_lora_m", "_lora_scale"):
            delattr(module, name + suffix)
    merged = np.asarray(plain.transformer(*x))
    np.testing.assert_allclose(out, merged, rtol=2e-5, atol=2e-5)


def test_dora_in_training_starts_from_the_loaded_base(tmp_path):
    base_wd = _base_workdir(tmp_path / "base")
    cfg = _lora_config(**{"lora.init_from": str(base_wd), "mesh.data": 1, "lora.dora": True})
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    fns = build_train_fns(cfg, mesh)
    state = _initial_state(cfg, fns)
    wq = fns.frozen["base"]["dit"]["blocks"]["attn"]["wq"].value  # [L, D, K, H]
    m = state["params"]["dit"]["blocks"]["attn"]["wq_lora_m"].value  # [L, K, H]
    np.testing.assert_allclose(np.asarray(m), np.asarray(lora.column_norm(wq, 1, 1)), rtol=1e-6)
    np.testing.assert_array_equal(np.asarray(state["ema"]["dit"]["blocks"]["attn"]["wq_lora_m"].value), m)
    state, metrics = fns.step(state, _batch(cfg, mesh, 0), fns.frozen)
    assert np.isfinite(float(metrics["loss"]))


def test_an_int8_lora_run_trains_and_loads_for_inference(data_dir, tmp_path):
    base_wd = _base_workdir(tmp_path / "base")
    over = {
        "lora.init_from": str(base_wd),
        "data.path": str(data_dir),
        "mesh.data": 1,
        "lora.base_dtype": "int8",
    }
    out = train(_lora_config(**over), tmp_path / "run", progress=False, devices=jax.devices()[:1])
    assert np.isfinite(out["loss"])
    _, step, _, params = loading.restore(tmp_path / "run", use_ema=False)  # adapters over the int8 base
    mlp = params["dit"]["blocks"]["mlp"]["fc1"]
    assert (
        step == 4
        and mlp["kernel"].value.dtype == jnp.int8
        and mlp["kernel_qscale"].value.dtype == jnp.float32
    )


def test_an_adapter_merges_into_an_int8_base_like_it_attaches():
    """``--lora`` on a workdir whose base is int8: merging dequantizes, adds and quantizes again (new scales);
    as close to the float32 model with the adapter as attaching it unmerged is (int8's error, a fraction of
    what the adapter changes)."""
    graph, base, adapters, x = _wan()
    flat = nnx.to_flat_state(adapters)
    keys = jax.random.split(jax.random.key(7), len(flat))
    adapters = nnx.from_flat_state(
        [(p, v.replace(0.05 * jax.random.normal(k, v.value.shape)) if str(p[-1]).endswith("_lora_b") else v)
         for (p, v), k in zip(flat, keys)]
    )  # fmt: skip
    make = lambda b: nnx.clone(nnx.merge(graph, nnx.merge_state(b, adapters)))  # noqa: E731 (no shared Variables)
    extra = lora.model_adapters(make(base))  # a second adapter: the model's own, as a file would bring it
    out = lambda m: np.asarray(m.transformer(*x))  # noqa: E731
    ref = make(base)
    lora.merge_adapters(ref, [(extra, 0.5)])
    want = out(ref)
    stored = quant.store_base(base, "int8")
    merged, attached = make(stored), make(stored)
    lora.merge_adapters(merged, [(extra, 0.5)])
    lora.attach_adapters(attached, [(extra, 0.5)])
    assert merged.transformer.blocks.attn1.wq.get_value().dtype == jnp.int8
    err = {k: float(np.abs(out(m) - want).max() / np.abs(want).max()) for k, m in
           [("merged", merged), ("attached", attached), ("without", make(stored))]}  # fmt: skip
    print("int8 base, adapter at 0.5, max |out - out_f32| / max |out_f32|:", err)
    assert err["merged"] < REL_TOL["int8"] and err["attached"] < REL_TOL["int8"]
    assert err["without"] > 4 * max(err["merged"], err["attached"])  # the adapter's change is well resolved
