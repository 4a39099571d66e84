"""The command line: bad input gets one clear line on stderr and a non-zero exit, never a traceback."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from sora_jax.cli import main

ROOT = Path(__file__).resolve().parents[1]


def run_cli(capsys, *argv):
    with pytest.raises(SystemExit) as exc:
        raise SystemExit(main(list(argv)))
    captured = capsys.readouterr()
    return exc.value.code, captured.err


@pytest.mark.parametrize(
    "argv, expected",
    [
        (
            ["train", "--config", "configs/missing.py", "--workdir", "W"],
            "config file not found: configs/missing.py",
        ),
        (
            ["train", "--config", "configs/quickstart.py", "--workdir", "W", "--config.train.nosuch=1"],
            "unknown config key: train.nosuch",
        ),
        (["train", "--config", "configs/quickstart.py:big", "--workdir", "W"], "unknown argument 'big'"),
        (
            [
                "train",
                "--config",
                "configs/quickstart.py",
                "--workdir",
                "W",
                "--config.diffusion.objective=gan",
            ],
            "config.diffusion.objective = 'gan' is not one of",
        ),
        (["sample", "--workdir", "{tmp}", "--prompt", "  ", "--out", "{tmp}/o"], "empty prompt"),
        (
            ["sample", "--workdir", "{tmp}", "--prompt", "a 3 moving left", "--out", "{tmp}/o"],
            "no checkpoints in",
        ),
        (["sample", "--workdir", "{tmp}", "--prompt", "x" * 5000, "--out", "{tmp}/o"], "too long"),
        (["eval", "--workdir", "{tmp}"], "no checkpoints in"),
    ],
)
def test_bad_input_one_line(capsys, tmp_path, monkeypatch, argv, expected):
    monkeypatch.chdir(ROOT)
    argv = [a.replace("{tmp}", str(tmp_path)) for a in argv]
    code, err = run_cli(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sora-jax: error: ") and expected in lines[0], lines[0]
    assert not (tmp_path / "o").exists()


def test_unknown_flag_and_help_via_console():
    out = subprocess.run(
        [sys.executable, "-m", "sora_jax.cli", "train", "--help"], capture_output=True, text=True, cwd=ROOT
    )
    assert out.returncode == 0 and "--config.key=value" in out.stdout
    bad = subprocess.run(
        [sys.executable, "-m", "sora_jax.cli", "train", "--config", "x.py", "--workdir", "w", "--bogus"],
        capture_output=True,
        text=True,
        cwd=ROOT,
    )
    assert bad.returncode == 2 and "unrecognized arguments: --bogus" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_compile_only_on_fake_cpu_devices_reports_memory_and_writes_nothing(tmp_path):
    """`--compile_only --cpu_devices N`: compile the step for an N-device mesh, print per-device memory."""
    workdir = tmp_path / "w"
    env = {**os.environ, "XLA_FLAGS": ""}  # not the tests' 8 devices: the flag must make the 4
    cmd = [sys.executable, "-m", "sora_jax.cli", "train", "--config", "configs/quickstart.py:smoke"]
    cmd += ["--workdir", str(workdir), "--compile_only", "--cpu_devices", "4", "--config.mesh.data=1"]
    cmd += ["--config.mesh.fsdp=2", "--config.mesh.seq=2", "--config.model.seq_parallel=ring"]
    out = subprocess.run(cmd, cwd=ROOT, capture_output=True, text=True, timeout=300, env=env)
    assert out.returncode == 0, out.stderr[-2000:]
    assert "'fsdp': 2" in out.stderr and "over 4 devices" in out.stderr
    fields = dict(kv.split("=") for kv in out.stdout.split())
    assert fields["compiled"] == "True" and float(fields["peak_gib"]) > 0
    assert not (workdir / "checkpoints").exists()
    bad = subprocess.run(
        cmd[:-1] + ["--config.model.seq_parallel=allgather"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        env=env,
    )
    assert bad.returncode == 2 and "config.model.seq_parallel = 'allgather' is not one of" in bad.stderr
