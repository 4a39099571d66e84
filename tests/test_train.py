"""Training: the same loss curve on 1 and 8 devices, bitwise-exact resume after a kill (NaN handling:
test_checkpoints.py)."""

import json
import signal
import subprocess
import time
from pathlib import Path

import jax
import numpy as np
from helpers import run_cli, start_cli

from configs import quickstart
from sora_jax.config import load_config
from sora_jax.train import checkpoint
from sora_jax.train.loop import train_and_evaluate


def smoke_config(data_dir, **overrides):
    items = [f"--config.data.path={data_dir}", "--config.train.log_every=1"]
    items += [f"--config.{k}={v}" for k, v in overrides.items()]
    return load_config(f"{quickstart.__file__}:smoke", items)


def losses(workdir) -> dict[int, float]:
    out = {}
    for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines():
        row = json.loads(line)
        out[row["step"]] = row["loss"]  # a resumed run rewrites steps after its checkpoint: keep the last
    return out


def test_train_one_device_then_sharded_same_loss_curve(data_dir, tmp_path):
    assert jax.device_count() == 8
    one = smoke_config(data_dir, **{"mesh.data": 1})
    train_and_evaluate(one, tmp_path / "one", progress=False, devices=jax.devices()[:1])
    eight = smoke_config(data_dir, **{"mesh.data": 2, "mesh.fsdp": 4})
    train_and_evaluate(eight, tmp_path / "eight", progress=False)
    a, b = losses(tmp_path / "one"), losses(tmp_path / "eight")
    assert sorted(a) == list(range(1, one.train.num_steps + 1))
    assert a.keys() == b.keys()
    np.testing.assert_allclose([a[k] for k in a], [b[k] for k in a], rtol=2e-4, atol=1e-6)
    # the loss went down from its first value: the model learns something even in 6 steps
    assert a[max(a)] < a[1]
    # checkpoints: keep 2, the last one at the final step
    assert checkpoint.latest_step(tmp_path / "one") == one.train.num_steps
    assert list((tmp_path / "one" / "tensorboard").iterdir())


def test_time_limit_saves_and_stops_then_resumes(data_dir, tmp_path):
    cfg = smoke_config(data_dir, **{"train.num_steps": 400, "train.time_limit_s": 1e-9, "mesh.data": 1})
    out = train_and_evaluate(cfg, tmp_path / "w", progress=False, devices=jax.devices()[:1])
    assert out["time_limit_reached"] and out["step"] == 1  # the budget is spent after the first step
    assert checkpoint.latest_step(tmp_path / "w") == 1
    again = train_and_evaluate(cfg, tmp_path / "w", progress=False, devices=jax.devices()[:1])
    assert (
        again["step"] == 2 and checkpoint.latest_step(tmp_path / "w") == 2
    )  # a rerun resumes, one more step


def test_kill_and_rerun_resumes_exactly(data_dir, tmp_path):
    steps = 60
    args = [
        "--config",
        f"{quickstart.__file__}:smoke",
        f"--config.data.path={data_dir}",
        f"--config.train.num_steps={steps}",
        "--config.train.log_every=1",
        "--config.train.ckpt_every=10",
        "--config.mesh.data=1",
    ]
    killed = ["train", "--workdir", tmp_path / "killed", *args]
    proc = start_cli(*killed, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and (checkpoint.latest_step(tmp_path / "killed") or 0) < 20:
        time.sleep(0.2)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = checkpoint.latest_step(tmp_path / "killed")
    assert killed_at is not None and killed_at < steps, "the run finished before it could be killed"
    rerun = run_cli(*killed)
    assert f"resumed from step {killed_at}" in rerun.stderr
    assert checkpoint.latest_step(tmp_path / "killed") == steps
    # reference: the same job never interrupted
    run_cli("train", "--workdir", tmp_path / "ref", *args)
    a, b = losses(tmp_path / "killed"), losses(tmp_path / "ref")
    assert sorted(a) == sorted(b) == list(range(1, steps + 1))
    assert [a[k] for k in sorted(a)] == [b[k] for k in sorted(b)]  # bitwise, data order included
