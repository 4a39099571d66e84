"""The command line: bad input gets one clear line on stderr and a non-zero exit, never a traceback."""

import pytest
from helpers import ROOT, cli_env, run_cli

from sora_jax.cli import main


def run_in_process(capsys, *argv):
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
    code, err = run_in_process(capsys, *argv)
    assert code == 2
    lines = err.strip().splitlines()
    assert len(lines) == 1, err
    assert lines[0].startswith("sora-jax: error: ") and expected in lines[0], lines[0]
    assert not (tmp_path / "o").exists()


def test_unknown_flag_and_help_via_console():
    out = run_cli("train", "--help")
    assert "--config.key=value" in out.stdout
    bad = run_cli("train", "--config", "x.py", "--workdir", "w", "--bogus", check=False)
    assert bad.returncode == 2 and "unrecognized arguments: --bogus" in bad.stderr
    assert "Traceback" not in bad.stderr


def test_compile_only_on_fake_cpu_devices_reports_memory_and_writes_nothing(tmp_path):
    """`--compile_only --cpu_devices N`: compile the step for an N-device mesh, print per-device memory."""
    workdir = tmp_path / "w"
    env = cli_env()  # one device, not the tests' 8: the flag must make the 4
    args = ["train", "--config", "configs/quickstart.py:smoke", "--workdir", workdir, "--compile_only"]
    args += ["--cpu_devices", "4", "--config.mesh.data=1", "--config.mesh.fsdp=2", "--config.mesh.seq=2"]
    out = run_cli(*args, "--config.model.seq_parallel=ring", env=env)
    assert "'fsdp': 2" in out.stderr and "over 4 devices" in out.stderr
    fields = dict(kv.split("=") for kv in out.stdout.split())
    assert fields["compiled"] == "True" and float(fields["peak_gib"]) > 0
    assert not (workdir / "checkpoints").exists()
    bad = run_cli(*args, "--config.model.seq_parallel=allgather", env=env, check=False)
    assert bad.returncode == 2 and "config.model.seq_parallel = 'allgather' is not one of" in bad.stderr
