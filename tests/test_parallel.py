"""Parallelism on 8 CPU devices: every mesh gives the one-device loss and gradients, sequence-parallel
attention equals plain attention, FSDP really shards the state, and multi-slice meshes build."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx
from helpers import ROOT, cli_env, run_command
from jax.sharding import AxisType, NamedSharding, PartitionSpec

from configs import quickstart
from sora_jax import factory
from sora_jax.config import load_config
from sora_jax.models.layers import dot_product_attention
from sora_jax.parallel import sequence, sharding
from sora_jax.parallel.mesh import MESH_AXES, MeshError, make_mesh
from sora_jax.train.loop import build_train_fns
from sora_jax.train.step import make_loss_fn


def mesh_of(**sizes):
    shape = tuple(sizes.get(a, 1) for a in MESH_AXES)
    devices = np.asarray(jax.devices()[: int(np.prod(shape))]).reshape(shape)
    return jax.sharding.Mesh(devices, MESH_AXES, axis_types=(AxisType.Auto,) * 4)


def small_config(**overrides):
    """4 frames of 16x16 grey in 1x4x4 patches: 64 tokens; width 64, 4 heads, 2 blocks; batch 8."""
    items = [
        "--config.model.width=64",
        "--config.model.num_heads=4",
        "--config.model.depth=2",
        "--config.model.patch_size=(1,4,4)",
        "--config.text.width=32",
        "--config.data.batch_size=8",
    ]
    items += [f"--config.{k}={v}" for k, v in overrides.items()]
    return load_config(f"{quickstart.__file__}:smoke", items)


def make_batch(cfg, seed=0):
    rng = np.random.default_rng(seed)
    d, b = cfg.data, cfg.data.batch_size
    ids = rng.integers(1, cfg.text.vocab_size, (b, cfg.text.max_length), dtype=np.int32)
    mask = np.arange(cfg.text.max_length)[None] < rng.integers(3, cfg.text.max_length, (b, 1))
    return {
        "video": rng.integers(0, 256, (b, d.num_frames, d.height, d.width, 3), dtype=np.uint8),
        "tokens": np.where(mask, ids, 0).astype(np.int32),
        "text_mask": mask,
    }


def loss_and_grads(cfg, params, batch, mesh=None):
    """float32 loss and gradients of the training loss, jitted onto ``mesh`` (None: one device, no mesh)."""
    model = nnx.eval_shape(lambda: factory.make_model(cfg, 0))
    graphdef, _ = nnx.split(model, nnx.Param)
    tok = factory.make_text_input(cfg)
    null_text, null_mask = tok.encode([""])
    loss_fn = make_loss_fn(
        graphdef,
        factory.make_process(cfg),
        factory.make_autoencoder(cfg),
        null_text=jnp.asarray(null_text[0]),
        null_mask=jnp.asarray(null_mask[0]),
        caption_dropout=0.25,
    )
    key = jax.random.key_data(jax.random.key(3))

    def f(p, b, k):
        with sharding.activation_sharding(mesh):
            return jax.value_and_grad(lambda p, b, k: loss_fn(p, b, {}, k)[0])(
                p, b, jax.random.wrap_key_data(k)
            )

    if mesh is None:
        return jax.jit(f)(params, batch, key)
    p_sh = sharding.state_shardings(params, mesh)
    b_sh = {k: sharding.batch_sharding(mesh, v.ndim) for k, v in batch.items()}
    params = jax.device_put(params, p_sh)
    batch = jax.device_put(batch, b_sh)
    return jax.jit(f, in_shardings=(p_sh, b_sh, None), out_shardings=(None, p_sh))(params, batch, key)


@pytest.fixture(scope="module")
def reference():
    cfg = small_config()
    params = nnx.state(factory.make_model(cfg, 0), nnx.Param)
    # zero-initialised layers (adaLN-Zero, output projections) would give exactly-zero gradients upstream:
    # perturb every parameter so all of them carry signal
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(
        tree, [x + 0.05 * jax.random.normal(k, x.shape) for x, k in zip(leaves, keys)]
    )
    batch = make_batch(cfg)
    with jax.default_device(jax.devices()[0]):
        loss, grads = loss_and_grads(cfg, params, batch)
    return params, batch, float(loss), grads


MESHES = [
    ({"data": 8}, "none"),
    ({"fsdp": 8}, "none"),
    ({"data": 2, "fsdp": 2, "tensor": 2}, "none"),
    ({"fsdp": 2, "seq": 4}, "ulysses"),
    ({"fsdp": 2, "seq": 4}, "ring"),
]


@pytest.mark.parametrize("sizes,seq_parallel", MESHES, ids=lambda x: str(x))
def test_mesh_gives_one_device_loss_and_gradients(reference, sizes, seq_parallel):
    params, batch, loss_ref, grads_ref = reference
    cfg = small_config(**{"model.seq_parallel": seq_parallel})
    mesh = mesh_of(**sizes)
    loss, grads = loss_and_grads(cfg, params, batch, mesh)
    assert abs(float(loss) - loss_ref) <= 1e-5 * abs(loss_ref)
    ref_flat = jax.tree_util.tree_flatten_with_path(grads_ref)[0]
    got = jax.tree.leaves(grads)
    assert len(got) == len(ref_flat)
    for (path, g_ref), g in zip(ref_flat, got):
        g_ref, g = np.asarray(g_ref, np.float64), np.asarray(g, np.float64)
        scale = np.linalg.norm(g_ref)
        assert scale > 0, f"{jax.tree_util.keystr(path)} has a zero reference gradient"
        rel = np.linalg.norm(g - g_ref) / scale
        assert rel <= 1e-5, f"{sizes} {seq_parallel}: {jax.tree_util.keystr(path)} differs by {rel:.2e}"
    # the parameters really are laid out on the mesh the test names
    if sizes.get("fsdp", 1) > 1:
        w = grads["dit"]["blocks"]["mlp"]["fc1"]["kernel"].value
        assert "fsdp" in str(w.sharding.spec)


@pytest.mark.parametrize("mode", ["ulysses", "ring"])
def test_sequence_parallel_attention_equals_plain_attention(mode):
    mesh = mesh_of(data=2, seq=4)
    ks = jax.random.split(jax.random.key(0), 4)
    q, k, v = (jax.random.normal(x, (2, 32, 8, 16)) for x in ks[:3])
    ct = jax.random.normal(ks[3], q.shape)

    def plain(q, k, v):
        return dot_product_attention(q, k, v, implementation="reference")

    def sharded(q, k, v):
        return sequence.attention(q, k, v, mode=mode, kernel=plain, mesh=mesh)

    spec = NamedSharding(mesh, PartitionSpec(("data", "fsdp"), "seq"))
    args = jax.device_put((q, k, v), spec)
    out = jax.jit(sharded)(*args)
    np.testing.assert_allclose(out, plain(q, k, v), rtol=1e-5, atol=1e-5)
    g = jax.jit(jax.grad(lambda *a: jnp.vdot(sharded(*a), ct), argnums=(0, 1, 2)))(*args)
    g_ref = jax.grad(lambda *a: jnp.vdot(plain(*a), ct), argnums=(0, 1, 2))(q, k, v)
    for a, b in zip(g, g_ref):
        assert float(jnp.linalg.norm(a - b) / jnp.linalg.norm(b)) < 1e-5


def test_sequence_parallel_rejects_shapes_that_do_not_split():
    mesh = mesh_of(seq=8)
    q = jnp.zeros((1, 12, 8, 16))  # 12 tokens over seq=8
    with pytest.raises(sequence.SequenceParallelError, match="12 tokens"):
        sequence.attention(q, q, q, mode="ring", kernel=dot_product_attention, mesh=mesh)
    q = jnp.zeros((1, 16, 4, 16))  # 4 heads over seq=8
    with pytest.raises(sequence.SequenceParallelError, match="ring"):
        sequence.attention(q, q, q, mode="ulysses", kernel=dot_product_attention, mesh=mesh)
    with pytest.raises(ValueError, match="seq_parallel"):
        sequence.check_mode("allgather")


def test_fsdp8_state_bytes_per_device_are_a_sixth_or_less():
    cfg = load_config(quickstart.__file__, ["--config.mesh.data=1", "--config.mesh.fsdp=8"])
    mesh = make_mesh(cfg.mesh)
    state = build_train_fns(cfg, mesh).init()
    trained = {"params": state["params"], "opt_state": state["opt_state"]}
    leaves = [x for x in jax.tree.leaves(trained) if hasattr(x, "addressable_shards")]
    total = sum(x.nbytes for x in leaves)
    dev0 = jax.devices()[0]
    on_dev0 = sum(s.data.nbytes for x in leaves for s in x.addressable_shards if s.device == dev0)
    print(f"params + Adam state: {total / 2**20:.2f} MiB in all, {on_dev0 / 2**20:.3f} MiB on device 0")
    assert on_dev0 <= total / 6
    # the same number from the shardings alone (what --compile_only reports before allocating anything)
    assert sharding.bytes_per_device(trained) == (total, on_dev0)
    assert sharding.check_sufficiently_sharded(state["params"], mesh, tolerance=0.35) <= 1 / 6


def test_sufficiently_sharded_check_names_replicated_parameters():
    mesh = mesh_of(fsdp=8)
    big = jax.device_put(jnp.zeros((512, 64)), NamedSharding(mesh, PartitionSpec()))  # replicated
    small = jax.device_put(jnp.zeros((8, 64)), NamedSharding(mesh, PartitionSpec("fsdp")))
    with pytest.raises(sharding.ShardingError, match=r"\['big'\]"):
        sharding.check_sufficiently_sharded({"big": big, "small": small}, mesh)
    ok = jax.device_put(jnp.zeros((512, 64)), NamedSharding(mesh, PartitionSpec("fsdp")))
    assert sharding.check_sufficiently_sharded({"big": ok}, mesh) == pytest.approx(1 / 8)


def test_mesh_from_config_fills_and_rejects():
    cfg = load_config(quickstart.__file__, ["--config.mesh.data=2", "--config.mesh.fsdp=-1"])
    assert dict(make_mesh(cfg.mesh).shape) == {"data": 2, "fsdp": 4, "tensor": 1, "seq": 1}
    bad = load_config(quickstart.__file__, ["--config.mesh.data=3"])
    with pytest.raises(MeshError, match="needs 3 devices"):
        make_mesh(bad.mesh)
    dcn = load_config(quickstart.__file__, ["--config.mesh.data=-1", "--config.mesh.dcn.data=3"])
    with pytest.raises(MeshError):
        make_mesh(dcn.mesh)


def test_two_processes_of_four_devices_match_one_process_of_eight(tmp_path):
    """launch/local_multihost.sh: 2 processes x 4 CPU devices through jax.distributed on localhost train 3
    steps on a data=2 (across processes, as across slices) x fsdp=4 mesh; the losses equal a single process with 8 devices, and the two processes
    read disjoint halves of each global batch."""
    from test_train import losses

    from sora_jax.data import moving_digits, pipeline
    from sora_jax.train.loop import train

    data = tmp_path / "data"
    moving_digits.build(data, num_train=64, num_test=16, num_frames=4, height=16, width=16, fps=4, seed=0)
    args = [
        "--config",
        f"{quickstart.__file__}:smoke",
        f"--config.data.path={data}",
        "--config.train.num_steps=3",
        "--config.train.log_every=1",
        "--config.mesh.data=2",
        "--config.mesh.fsdp=4",
        "--config.mesh.dcn.data=2",  # each process is a "slice": data parallel across, FSDP within
    ]
    env = cli_env(
        devices=4, LOGDIR=tmp_path / "logs"
    )  # PYTHONPATH: the script's `sora-jax` runs this checkout
    cmd = ["bash", "launch/local_multihost.sh", "2", "--workdir", tmp_path / "mh", *args]
    run = run_command(cmd, env=env, check=False, timeout=600)
    logs = "\n".join(p.read_text() for p in sorted((tmp_path / "logs").glob("*.log")))
    assert run.returncode == 0, run.stderr + logs[-3000:]
    assert "over 8 devices (2 processes)" in logs

    cfg = load_config(f"{quickstart.__file__}:smoke", args[2:-1])
    train(cfg, tmp_path / "single", progress=False)
    multi, single = losses(tmp_path / "mh"), losses(tmp_path / "single")
    assert sorted(multi) == sorted(single) == [1, 2, 3]
    np.testing.assert_allclose([multi[s] for s in (1, 2, 3)], [single[s] for s in (1, 2, 3)], rtol=1e-5)

    # what each process reads: its own block of every global batch; together, in process order, exactly
    # the batch one process reads (so the same examples meet the same noise)
    def captions(index, count, batch):
        ds = pipeline.make_dataset(
            data,
            "train",
            global_batch_size=8,
            tokenize=factory.make_text_input(cfg).encode,
            seed=0,
            process_index=index,
            process_count=count,
        )
        it = iter(ds)
        return [list(map(str, next(it)["caption"])) for _ in range(batch)]

    whole, first, second = captions(0, 1, 3), captions(0, 2, 3), captions(1, 2, 3)
    for w, a, b in zip(whole, first, second):
        assert len(a) == len(b) == 4
        assert a + b == w


@pytest.mark.parametrize(
    "name,mesh_shape,max_state_gib",
    [("pod_dit_1b", (1, 16, 1, 1), 1.0), ("pod_dit_8b", (1, 8, 2, 4), 8.5)],
)
def test_pod_configs_shard_their_state_over_the_pod(name, mesh_shape, max_state_gib):
    """The pod configs on an abstract mesh of their device count (no devices needed): parameters are
    sharded as FSDP promises and the train state per device is what their docstrings report."""
    from jax.sharding import AbstractMesh

    cfg = load_config(str(ROOT / "configs" / f"{name}.py"))
    mesh = AbstractMesh(mesh_shape, MESH_AXES, axis_types=(AxisType.Auto,) * 4)
    assert (
        tuple(cfg.mesh[a] if cfg.mesh[a] > 0 else mesh_shape[i] for i, a in enumerate(MESH_AXES))
        == mesh_shape
    )
    state = build_train_fns(cfg, mesh).abstract_state
    frac = sharding.check_sufficiently_sharded(state["params"], mesh)  # raises if not
    total, per_device = sharding.bytes_per_device(state)
    print(f"{name}: state {total / 2**30:.1f} GiB, {per_device / 2**30:.2f} GiB per device ({frac:.4f})")
    assert per_device / 2**30 <= max_state_gib
    # params (f32) + Adam (2x) + EMA = 4 copies of the parameters
    n_params = sum(int(np.prod(x.shape)) for x in jax.tree.leaves(state["params"]))
    assert abs(total - 16 * n_params) < 0.01 * total


@pytest.mark.parametrize(
    "env,expected",
    [
        ({}, None),
        ({"SLURM_JOB_ID": "7", "SLURM_STEP_NUM_TASKS": "1"}, None),  # a single-task step: no cluster
        ({"SLURM_JOB_ID": "7", "SLURM_STEP_NUM_TASKS": "4"}, "slurm"),
        ({"TPU_WORKER_HOSTNAMES": "t-0"}, None),  # one TPU VM host
        ({"TPU_WORKER_HOSTNAMES": "t-0,t-1,t-2,t-3"}, "tpu"),
        ({"MEGASCALE_COORDINATOR_ADDRESS": "10.0.0.2"}, "tpu-multislice"),
        ({"OMPI_COMM_WORLD_SIZE": "2"}, "mpi"),
        ({"SORA_JAX_AUTO_DISTRIBUTED": "1"}, "requested"),
    ],
)
def test_cluster_discovery_from_the_environment(monkeypatch, env, expected):
    from sora_jax.parallel import mesh as mesh_lib

    for key in (
        "SLURM_STEP_NUM_TASKS",
        "TPU_WORKER_HOSTNAMES",
        "MEGASCALE_COORDINATOR_ADDRESS",
        "OMPI_COMM_WORLD_SIZE",
        "SORA_JAX_AUTO_DISTRIBUTED",
    ):
        monkeypatch.delenv(key, raising=False)
    for key, value in env.items():
        monkeypatch.setenv(key, value)
    assert mesh_lib._auto_cluster() == expected


def test_explicit_multiprocess_start_needs_its_coordinator(monkeypatch):
    from sora_jax.parallel.mesh import initialize_distributed

    monkeypatch.delenv("JAX_COORDINATOR_ADDRESS", raising=False)
    with pytest.raises(MeshError, match="--coordinator_address"):
        initialize_distributed(num_processes=2, process_id=0)
