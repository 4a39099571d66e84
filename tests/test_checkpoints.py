"""Checkpoints that never lose a run: SIGTERM saves and exits 0, restore onto other meshes, damaged or foreign
checkpoints, NaN never saved, keep policy, and ``sora-jax checkpoints``."""

import os
import shutil
import signal
import time
from pathlib import Path

import jax
import numpy as np
import pytest
from helpers import cli_env, start_cli

from configs import quickstart
from sora_jax import loading
from sora_jax.cli import main as cli_main
from sora_jax.config import load_config
from sora_jax.parallel.mesh import make_mesh
from sora_jax.train import checkpoint
from sora_jax.train.loop import build_train_fns, train


def config(data_dir, **overrides):
    items = [
        f"--config.data.path={data_dir}",
        "--config.train.log_every=1",
        "--config.train.keep_checkpoints=3",
    ]
    items += [f"--config.{k}={v}" for k, v in overrides.items()]
    return load_config(f"{quickstart.__file__}:smoke", items)


@pytest.fixture(scope="module")
def trained(data_dir, tmp_path_factory):
    """A smoke run on 1 device with checkpoints at steps 3 and 6."""
    workdir = tmp_path_factory.mktemp("trained")
    train(config(data_dir, **{"mesh.data": 1}), workdir, progress=False, devices=jax.devices()[:1])
    return workdir


def _abstract(cfg, devices):
    mesh = make_mesh(cfg.mesh, devices)
    return build_train_fns(cfg, mesh).abstract_state


def _biggest_array_file(workdir: Path, step: int) -> Path:
    files = [p for p in (workdir / "checkpoints" / str(step) / "state").rglob("*") if p.is_file()]
    return max((p for p in files if "/d/" in str(p)), key=lambda p: p.stat().st_size)


@pytest.mark.parametrize("damage", ["truncate", "delete"])
def test_damaged_latest_falls_back_to_previous_with_one_warning(trained, data_dir, tmp_path, caplog, damage):
    workdir = tmp_path / "w"
    shutil.copytree(trained, workdir)
    target = _biggest_array_file(workdir, 6)
    if damage == "truncate":
        os.truncate(target, target.stat().st_size // 3)
    else:
        target.unlink()
    cfg = config(data_dir, **{"mesh.data": 1})
    abstract = _abstract(cfg, jax.devices()[:1])
    with checkpoint.manager(workdir) as mgr, caplog.at_level("WARNING", logger="sora_jax.train"):
        step, state = checkpoint.restore_latest_good(workdir, mgr, abstract, cfg)
        assert mgr.all_steps() == [3]
    assert step == 3 and int(state["step"]) == 3
    warnings = [r.getMessage() for r in caplog.records if r.levelname == "WARNING" and r.name != "absl"]
    assert len(warnings) == 1 and "checkpoint 6 is unreadable" in warnings[0] and "\n" not in warnings[0]
    assert [p.name.split("-")[0] for p in (workdir / "checkpoints_corrupt").iterdir()] == ["6"]
    # the one the fallback used equals a direct restore of step 3 in the untouched run
    with checkpoint.manager(trained, read_only=True) as mgr:
        _, ref = checkpoint.restore_train_state(mgr, abstract, step=3)
    for a, b in zip(jax.tree.leaves(state["params"]), jax.tree.leaves(ref["params"])):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))


def test_nothing_readable_moves_nothing_and_says_so(trained, data_dir, tmp_path):
    workdir = tmp_path / "w"
    shutil.copytree(trained, workdir)
    for step in (3, 6):
        _biggest_array_file(workdir, step).unlink()
    cfg = config(data_dir, **{"mesh.data": 1})
    with checkpoint.manager(workdir) as mgr, pytest.raises(checkpoint.CheckpointError, match="no checkpoint"):
        checkpoint.restore_latest_good(workdir, mgr, _abstract(cfg, jax.devices()[:1]), cfg)
    assert sorted(p.name for p in (workdir / "checkpoints").iterdir()) == ["3", "6"]
    assert not (workdir / "checkpoints_corrupt").exists()


def test_checkpoint_of_another_model_names_the_keys(trained, data_dir):
    cfg = config(data_dir, **{"mesh.data": 1, "text.width": 64})
    with (
        checkpoint.manager(trained, read_only=True) as mgr,
        pytest.raises(checkpoint.CheckpointMismatchError, match=r"text\.width: 32 in the checkpoint, 64 now"),
    ):
        checkpoint.restore_latest_good(trained, mgr, _abstract(cfg, jax.devices()[:1]), cfg)
    # and from the command line: one line, exit 2, nothing moved
    code = cli_main(["train", "--config", f"{quickstart.__file__}:smoke", "--workdir", str(trained),
                     f"--config.data.path={data_dir}", "--config.text.width=64"])  # fmt: skip
    assert code == 2 and sorted(p.name for p in (trained / "checkpoints").iterdir()) == ["3", "6"]


def test_reshard_fsdp8_checkpoint_onto_2_and_1_devices(data_dir, tmp_path):
    """Saved on fsdp=8, restored on (fsdp=2) and on 1 device: same parameters, same next-step loss."""
    base = tmp_path / "fsdp8"
    over = {"mesh.data": 1, "mesh.fsdp": 8, "train.num_steps": 3}
    train(config(data_dir, **over), base, progress=False, devices=jax.devices()[:8])
    meshes = {8: {"mesh.fsdp": 8}, 2: {"mesh.fsdp": 2}, 1: {"mesh.fsdp": 1}}
    params, next_loss = {}, {}
    for n, mesh in meshes.items():
        cfg = config(data_dir, **{"mesh.data": 1, "train.num_steps": 4, **mesh})
        abstract = _abstract(cfg, jax.devices()[:n])
        with checkpoint.manager(base, read_only=True) as mgr:
            step, state = checkpoint.restore_train_state(mgr, abstract)
        assert step == 3
        leaf = jax.tree.leaves(state["params"])[0]
        assert len(leaf.sharding.device_set) == n
        params[n] = [np.asarray(x) for x in jax.tree.leaves(state["params"])]
        workdir = tmp_path / f"on{n}"
        shutil.copytree(base, workdir)
        next_loss[n] = train(cfg, workdir, progress=False, devices=jax.devices()[:n])["loss"]
    for n in (2, 1):
        for a, b in zip(params[8], params[n]):
            np.testing.assert_array_equal(a, b)
        np.testing.assert_allclose(next_loss[n], next_loss[8], rtol=1e-5)


def test_nan_never_reaches_a_checkpoint(data_dir, tmp_path):
    from sora_jax.train.metrics import NonFiniteLossError

    cfg = config(
        data_dir,
        **{"mesh.data": 1, "optim.lr": 1e30, "optim.grad_clip": 1e30, "optim.warmup_steps": 1},
        **{"train.ckpt_every": 1, "train.log_every": 100, "train.num_steps": 50},
    )
    with pytest.raises(NonFiniteLossError, match=r"at step (\d+)") as err:
        train(cfg, tmp_path, progress=False, devices=jax.devices()[:1])
    bad = int(err.value.args[0].split("at step ")[1].split(":")[0])
    last = checkpoint.latest_step(tmp_path)
    assert last is not None and last < bad
    with checkpoint.manager(tmp_path, read_only=True) as mgr:
        _, state = checkpoint.restore_train_state(mgr, _abstract(cfg, jax.devices()[:1]))
    assert all(np.isfinite(np.asarray(x)).all() for x in jax.tree.leaves(state["params"]))


def test_keep_last_n_plus_every_kth(tmp_path):
    import jax.numpy as jnp

    cfg = quickstart.get_config("smoke")
    with checkpoint.manager(tmp_path, keep=2, keep_every=3) as mgr:
        for step in range(1, 9):
            checkpoint.save(mgr, step, {"x": jnp.full((2,), step, jnp.float32)}, cfg)
            mgr.wait_until_finished()
        assert mgr.all_steps() == [3, 6, 7, 8]


def test_sigterm_saves_at_the_next_step_and_exits_0(data_dir, tmp_path):
    args = ["--config", f"{quickstart.__file__}:smoke", f"--config.data.path={data_dir}", "--config.mesh.data=1",
            "--config.train.num_steps=100000", "--config.train.log_every=1", "--config.train.ckpt_every=100000"]  # fmt: skip
    proc = start_cli("train", "--workdir", tmp_path, *args)
    metrics = tmp_path / "metrics.jsonl"
    deadline = time.time() + 180
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 5):
        time.sleep(0.05)
    seen = len(metrics.read_text().splitlines())  # steps finished when the notice is sent
    proc.send_signal(signal.SIGTERM)
    _, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 0, stderr[-2000:]
    saved = checkpoint.latest_step(tmp_path)
    assert saved is not None and seen <= saved <= seen + 2  # the step running at the notice, or the next
    assert f"preempted: saved step {saved}" in stderr
    assert "Traceback" not in stderr


def test_sigterm_to_one_of_two_processes_saves_the_same_step_on_both(data_dir, tmp_path):
    """jax.distributed on localhost, 2 processes x 1 device: SIGTERM to process 1 alone; JAX's preemption
    service spreads the notice, both processes save the same step, and both exit 0."""
    import socket

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    args = ["train", "--config", f"{quickstart.__file__}:smoke", "--workdir", str(tmp_path / "w"),
            f"--config.data.path={data_dir}", "--config.mesh.data=2", "--config.train.num_steps=100000",
            "--config.train.log_every=1", "--config.train.ckpt_every=100000"]  # fmt: skip
    procs = []
    for i in range(2):
        env = cli_env(
            devices=1, JAX_NUM_PROCESSES=2, JAX_PROCESS_ID=i, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}"
        )
        procs.append(start_cli(*args, env=env))
    metrics = tmp_path / "w" / "metrics.jsonl"
    deadline = time.time() + 240
    while time.time() < deadline and (not metrics.exists() or len(metrics.read_text().splitlines()) < 3):
        time.sleep(0.05)
    procs[1].send_signal(signal.SIGTERM)
    errs = [p.communicate(timeout=120)[1] for p in procs]
    assert [p.returncode for p in procs] == [0, 0], errs[0][-1500:] + errs[1][-1500:]
    saved = checkpoint.latest_step(tmp_path / "w")
    assert all(f"preempted: saved step {saved}" in e for e in errs)


def test_params_only_restore_and_the_checkpoints_command(trained, data_dir, capsys):

    cfg = config(data_dir, **{"mesh.data": 1})
    abstract = _abstract(cfg, jax.devices()[:1])
    with checkpoint.manager(trained, read_only=True) as mgr:
        _, full = checkpoint.restore_train_state(mgr, abstract)
    for key, use_ema in (("ema", True), ("params", False)):
        _, step, _, params = loading.restore(trained, use_ema=use_ema)  # reads that subtree alone
        assert step == 6
        for a, b in zip(jax.tree.leaves(params), jax.tree.leaves(full[key])):
            np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
    assert cli_main(["checkpoints", "--workdir", str(trained)]) == 0
    lines = capsys.readouterr().out.splitlines()
    rows, cards = lines[1::2], lines[2::2]  # each checkpoint's line, then its data card's
    assert lines[0].split()[:2] == ["step", "saved"] and [ln.split()[0] for ln in rows] == ["3", "6"]
    assert all("t2v smoke, 4x16x16, batch 8" in ln for ln in rows)
    assert all(ln.split()[:2] == ["data", "card"] and "moving_digits: 80 clips" in ln for ln in cards)
    assert cli_main(["checkpoints", "--workdir", str(trained / "nope")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "no checkpoints" in err[0]
