"""LoRA (sora_jax/models/lora.py, config.lora): step 0 is the base model exactly (DiT and Wan), training moves
the adapters alone (the optimizer holds adapter-shaped state, the base stays bitwise), a run resumes exactly,
and bad values are one line."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest
from flax import nnx

from configs import finetune_lora, quickstart
from sora_jax import factory, loading
from sora_jax.config import ConfigError, load_config
from sora_jax.models import lora
from sora_jax.models.wan_t2v import WanTextToVideo
from sora_jax.models.wan_transformer import wan_config
from sora_jax.parallel.mesh import make_mesh
from sora_jax.train import checkpoint
from sora_jax.train.loop import build_train_fns, train

ONE_DEVICE = ml_collections.ConfigDict({"data": 1, "fsdp": 1, "tensor": 1, "seq": 1})


def _perturbed(params, seed: int = 1):
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(seed), len(leaves))
    return jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])


def _paths(state) -> set[str]:
    return {"/".join(map(str, p)) for p, _ in nnx.to_flat_state(state)}


def _base_workdir(path):
    """A quickstart smoke workdir whose one checkpoint holds perturbed weights: a fresh DiT (adaLN-Zero) outputs
    zeros whatever its adapters, so nothing would train on it."""
    from sora_jax.train.state import init_state, make_optimizer

    cfg = load_config(f"{quickstart.__file__}:smoke")
    state = init_state(factory.make_model(cfg), make_optimizer(cfg), 0)
    state["params"] = _perturbed(state["params"])
    mgr = checkpoint.manager(path)
    try:
        checkpoint.save(mgr, 0, state, cfg, force=True)
        mgr.wait_until_finished()
    finally:
        mgr.close()
    return path


def _lora_config(**overrides) -> ml_collections.ConfigDict:
    return load_config(f"{finetune_lora.__file__}:smoke", [f"--config.{k}={v}" for k, v in overrides.items()])


def test_dit_step_zero_is_the_base_and_adapters_are_stacked_and_named():
    base_cfg = load_config(f"{quickstart.__file__}:smoke")
    base_graph, base = nnx.split(factory.make_model(base_cfg, seed=0), nnx.Param)
    # a fresh DiT outputs zeros (adaLN-Zero): perturbed, the comparison means something
    base = _perturbed(base)
    model = factory.make_model(_lora_config(), seed=0)
    graph, params = nnx.split(model, nnx.Param)
    adapters, rest = nnx.split_state(params, nnx.LoRAParam, ...)
    assert _paths(rest) == _paths(base)  # the base keeps its paths (init_from, converters, checkpoints)
    a = adapters["dit"]["blocks"]["attn"]
    assert a["wq_lora_a"].value.ndim == 3 and a["wq_lora_b"].value.shape[1] == 8  # [L, D, r], [L, r, K, H]
    assert a["wq_lora_a"].out_sharding == ("layers", "embed", None)
    assert a["wo_lora_b"].out_sharding == ("layers", None, "embed")
    assert all(not np.any(v) for k, v in nnx.to_flat_state(adapters) if k[-1].endswith("_lora_b"))
    assert a["wq_lora_a"].value.shape[0] == model.dit.cfg.depth  # stacked like the scanned blocks

    k = jax.random.split(jax.random.key(0), 4)
    x = jax.random.normal(k[0], (2, 4, 16, 16, 1))
    t = jnp.array([100.0, 700.0])
    ids = jax.random.randint(k[1], (2, base_cfg.text.max_length), 0, base_cfg.text.vocab_size)
    mask = jnp.ones(ids.shape, bool)
    ref = nnx.merge(base_graph, base)(x, t, ids, mask)
    out = nnx.merge(graph, nnx.merge_state(base, adapters))(x, t, ids, mask)
    assert np.abs(np.asarray(ref)).max() > 0
    np.testing.assert_array_equal(np.asarray(out), np.asarray(ref))  # bitwise: B = 0 adds exact zeros
    # the adapters are live: a non-zero B changes the output
    moved = jax.tree.map(lambda v: v + 0.1, adapters)
    out2 = nnx.merge(graph, nnx.merge_state(base, moved))(x, t, ids, mask)
    assert np.abs(np.asarray(out2) - np.asarray(ref)).max() > 1e-4


def test_wan_tiny_gets_adapters_by_pattern_and_step_zero_is_the_base():
    model = nnx.eval_shape(lambda: WanTextToVideo(wan_config("tiny"), rngs=nnx.Rngs(0)))
    graph0, abstract = nnx.split(model, nnx.Param)
    base = _perturbed(jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract))
    model = nnx.merge(graph0, base)
    lat = jax.random.normal(jax.random.key(1), (2, 2, 4, 4, 4))
    t, text = jnp.array([10.0, 900.0]), jax.random.normal(jax.random.key(2), (2, 5, 32))
    ref = np.asarray(model.transformer(lat, t, text))
    added = lora.add_adapters(model, lora.LoraSpec(rank=4, alpha=4.0), seed=3)
    blocks = "transformer/blocks"
    want = [f"{blocks}/{a}/w{n}" for a in ("attn1", "attn2") for n in "kvqo"]
    assert sorted(want + [f"{blocks}/ffn/fc1/kernel", f"{blocks}/ffn/fc2/kernel"]) == added
    adapters = nnx.state(model, nnx.LoRAParam)
    assert adapters["transformer"]["blocks"]["ffn"]["fc1"]["kernel_lora_a"].value.shape == (2, 48, 4)
    np.testing.assert_array_equal(np.asarray(model.transformer(lat, t, text)), ref)
    # the same through the config: configs/wan_t2v_1_3b.py:smoke with config.lora on, shapes only
    from configs import wan_t2v_1_3b

    cfg = load_config(f"{wan_t2v_1_3b.__file__}:smoke", ["--config.lora.enabled=True"])
    built = nnx.state(nnx.eval_shape(lambda: factory.make_model(cfg)), nnx.LoRAParam)
    assert {p.rsplit("_lora_", 1)[0] for p in _paths(built)} == set(added)
    with pytest.raises(ValueError, match="not an attention or MLP projection kernel"):
        lora.add_adapters(model, lora.LoraSpec(rank=4, alpha=4.0, targets=(r"attn1/norm_q",)))


def _batch(cfg, mesh, seed: int):
    from sora_jax.train import data as data_lib

    out, key = {}, jax.random.key(seed)
    for name, s in data_lib.abstract_batch(cfg, mesh).items():
        key, sub = jax.random.split(key)
        if s.dtype == jnp.bool_:
            value = jnp.ones(s.shape, bool)
        elif s.dtype == jnp.uint8:
            value = jax.random.randint(sub, s.shape, 0, 256).astype(jnp.uint8)
        else:
            value = jax.random.randint(sub, s.shape, 0, cfg.text.vocab_size).astype(s.dtype)
        out[name] = jax.device_put(value, s.sharding)
    return out


def test_only_adapters_train_and_the_optimizer_holds_adapter_state(tmp_path):
    base_wd = _base_workdir(tmp_path / "base")
    cfg = _lora_config(**{"lora.init_from": str(base_wd), "mesh.data": 1})
    mesh = make_mesh(cfg.mesh, jax.devices()[:1])
    fns = build_train_fns(cfg, mesh)
    state = fns.init()
    size = lambda tree: sum(x.size for x in jax.tree.leaves(tree))  # noqa: E731
    adapters, base = state["params"], fns.frozen["base"]
    assert all(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(adapters))
    _, source = checkpoint.restore_subtree(base_wd, "params", base)
    for (_, got), (_, want) in zip(nnx.to_flat_state(base), nnx.to_flat_state(source)):
        np.testing.assert_array_equal(np.asarray(got.value), np.asarray(want.value))  # the base workdir's
    before = jax.device_get(base)
    start = jax.device_get(adapters)
    for i in range(3):
        state, metrics = fns.step(state, _batch(cfg, mesh, i), fns.frozen)
    assert np.isfinite(float(metrics["loss"])) and float(metrics["grad_norm"]) > 0
    for (_, b0), (_, b1) in zip(nnx.to_flat_state(before), nnx.to_flat_state(fns.frozen["base"])):
        np.testing.assert_array_equal(np.asarray(b0.value), np.asarray(b1.value))  # frozen, bitwise
    moved = [not np.array_equal(a.value, b.value) for (_, a), (_, b) in zip(
        nnx.to_flat_state(start), nnx.to_flat_state(jax.device_get(state["params"])))]  # fmt: skip
    assert all(moved)  # every adapter (A and B) trained
    # AdamW's mu and nu are adapter-shaped: the optimizer state is ~2x the adapters, a few % of the model
    assert size(state["opt_state"]) <= 2 * size(adapters) + 8
    assert size(adapters) < 0.2 * size(base)
    print(f"lora: adapters {size(adapters)}, base {size(base)}, opt_state {size(state['opt_state'])} values")


def test_lora_run_resumes_exactly(data_dir, tmp_path):
    base_wd = _base_workdir(tmp_path / "base")
    common = {"lora.init_from": str(base_wd), "data.path": str(data_dir), "mesh.data": 1}
    devices = jax.devices()[:1]
    train(_lora_config(**common), tmp_path / "straight", progress=False, devices=devices)
    train(
        _lora_config(**common, **{"train.num_steps": 2}),
        tmp_path / "resumed",
        progress=False,
        devices=devices,
    )
    train(_lora_config(**common), tmp_path / "resumed", progress=False, devices=devices)
    cfg = _lora_config(**common)
    abstract = build_train_fns(cfg, make_mesh(cfg.mesh, devices), shapes_only=True).abstract_state
    a = checkpoint.restore_subtree(tmp_path / "straight", "params", abstract["params"])
    b = checkpoint.restore_subtree(tmp_path / "resumed", "params", abstract["params"])
    assert a[0] == b[0] == cfg.train.num_steps
    for (_, x), (_, y) in zip(nnx.to_flat_state(a[1]), nnx.to_flat_state(b[1])):
        np.testing.assert_array_equal(np.asarray(x.value), np.asarray(y.value))
    # loading a LoRA workdir for inference gives the whole model: its adapters over lora.init_from's base
    _, step, full_abstract, full = loading.restore(tmp_path / "resumed", use_ema=False)
    assert step == cfg.train.num_steps and _paths(full) == _paths(full_abstract.params)
    got = nnx.split_state(full, nnx.LoRAParam, ...)
    _, source = checkpoint.restore_subtree(base_wd, "params", got[1])
    flat = lambda *states: [v for s in states for _, v in nnx.to_flat_state(s)]  # noqa: E731
    for x, y in zip(flat(*got), flat(b[1], source), strict=True):
        np.testing.assert_array_equal(np.asarray(x.value), np.asarray(y.value))


@pytest.mark.parametrize(
    "override, match",
    [
        ("lora.rank=0", "config.lora.rank"),
        ("lora.alpha=-1.0", "config.lora.alpha"),
        ("lora.base_dtype=int4", "config.lora.base_dtype"),
        ("lora.targets=('(',)", "config.lora.targets"),
    ],
)
def test_bad_lora_config_is_one_line(override, match):
    with pytest.raises(ConfigError, match=match) as e:
        _lora_config(**dict([override.split("=", 1)]))
    assert "\n" not in str(e.value)


def test_lora_base_comes_from_lora_init_from_not_model_init_from():
    from sora_jax.config import validate

    cfg = ml_collections.ConfigDict(_lora_config().to_dict())
    cfg.model.init_from = "/somewhere"
    with pytest.raises(ConfigError, match="config.lora.init_from"):
        validate(cfg)


def test_targets_matching_nothing_or_a_norm_are_one_line():
    for targets, match in (("('nothing_here',)", "match no projection"), ("('q_norm',)", "not an attention")):
        cfg = _lora_config(**{"lora.targets": targets})
        with pytest.raises(ConfigError, match=match) as e:
            nnx.eval_shape(lambda c=cfg: factory.make_model(c))
        assert "\n" not in str(e.value) and "config.lora.targets" in str(e.value)


def test_lora_is_off_in_every_config_by_default():
    cfg = load_config(f"{quickstart.__file__}:smoke")
    assert cfg.lora.enabled is False and cfg.lora.dora is False
    assert not any(isinstance(v, nnx.LoRAParam) for _, v in nnx.to_flat_state(
        nnx.state(nnx.eval_shape(lambda: factory.make_model(cfg)), nnx.Param)))  # fmt: skip


def test_adapters_shard_like_their_kernels_under_fsdp():
    cfg = _lora_config(**{"mesh.data": 1, "mesh.fsdp": 8})
    fns = build_train_fns(cfg, make_mesh(cfg.mesh, jax.devices()), shapes_only=True)
    attn = fns.abstract_state["params"]["dit"]["blocks"]["attn"]
    kernel = fns.frozen["base"]["dit"]["blocks"]["attn"]["wq"]
    assert kernel.sharding.spec[1] == attn["wq_lora_a"].sharding.spec[1] == "fsdp"  # [L, D, r]: D over fsdp
    mu = fns.abstract_state["opt_state"][1][0].mu["dit"]["blocks"]["attn"]["wq_lora_a"]
    assert mu.sharding.spec == attn["wq_lora_a"].sharding.spec  # the optimizer state follows
