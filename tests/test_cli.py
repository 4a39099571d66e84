"""The command line: bad input gets one clear line on stderr and a non-zero exit, never a traceback."""

import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT, cli_env, run_cli

from sora_jax.cli import main
from sora_jax.errors import UserError


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


# ------------------------------------------------------------------------------- user errors against bugs


@pytest.mark.parametrize(
    "argv, expected",
    [
        (["sample", "--workdir", "{tmp}", "--prompt", "a 3", "--out", "{tmp}/o", "--image", "x.png"], "--image is for"),
        (["sample", "--workdir", "{tmp}", "--prompt", "a 3", "--out", "{tmp}/o", "--video", "x.mp4"], "--video is for"),
        (["sample", "--workdir", "{tmp}", "--prompt", "a 3", "--out", "{tmp}/o", "--mode", "edit", "--video",
          "{tmp}/missing.mp4"], "no such video file"),
        (["sample", "--workdir", "{tmp}", "--prompt", "a 3", "--out", "{tmp}/o", "--bucket", "4x16"],
         "is not FRAMESxHEIGHTxWIDTH"),
        (["checkpoints", "--workdir", "{tmp}/none"], "no checkpoints in"),
        (["train", "--config", "configs/quickstart.py:smoke", "--workdir", "{tmp}", "--config.mesh.data=3"],
         "needs 3 devices"),
    ],
)  # fmt: skip
def test_more_bad_input_one_line(capsys, tmp_path, monkeypatch, argv, expected):
    monkeypatch.chdir(ROOT)
    code, err = run_in_process(capsys, *[a.replace("{tmp}", str(tmp_path)) for a in argv])
    lines = err.strip().splitlines()
    assert code == 2 and len(lines) == 1 and expected in lines[0], err
    assert not (tmp_path / "o").exists()


def _raiser(exc: BaseException):
    def fail(*args, **kwargs):
        raise exc

    return fail


@pytest.mark.parametrize(
    "exc", [KeyError("params"), RuntimeError("shapes differ"), ValueError("bad reshape"), TypeError("x")]
)
def test_a_bug_shows_its_traceback(capsys, monkeypatch, tmp_path, exc):
    """An exception that is not a user error (here injected into the library function the command calls) is
    a bug: the traceback, naming the exception, and exit 1; not a one-line 'user error'."""
    from sora_jax import commands

    monkeypatch.setattr(commands, "evaluate", _raiser(exc))
    code, err = run_in_process(capsys, "eval", "--workdir", str(tmp_path))
    assert code == 1
    assert "Traceback (most recent call last)" in err and f"{type(exc).__name__}: " in err, err
    assert "in fail" in err  # the frame that raised
    assert "sora-jax: error:" not in err and "internal error" in err.strip().splitlines()[-1]


@pytest.mark.parametrize(
    "exc, kind",
    [
        ("UserError", "sora_jax.errors"),
        ("ConfigError", "sora_jax.config"),
        ("MeshError", "sora_jax.parallel.mesh"),
        ("CheckpointError", "sora_jax.train.checkpoint"),
        ("NonFiniteLossError", "sora_jax.train.metrics"),
    ],
)
def test_the_projects_user_errors_are_one_line(capsys, monkeypatch, tmp_path, exc, kind):
    import importlib

    from sora_jax import commands

    cls = getattr(importlib.import_module(kind), exc)
    monkeypatch.setattr(commands, "evaluate", _raiser(cls("what was wrong\nmore detail")))
    code, err = run_in_process(capsys, "eval", "--workdir", str(tmp_path))
    assert code == 2 and err == "sora-jax: error: what was wrong\n"


@pytest.mark.parametrize("exc", [FileNotFoundError, IsADirectoryError, PermissionError, FileExistsError])
def test_user_path_errors_are_one_line_and_debug_reraises(capsys, monkeypatch, tmp_path, exc):
    from sora_jax import commands

    monkeypatch.setattr(commands, "evaluate", _raiser(exc(2, "No such file or directory", "x.mp4")))
    code, err = run_in_process(capsys, "eval", "--workdir", str(tmp_path))
    assert code == 2 and err.startswith("sora-jax: error: ") and "x.mp4" in err and err.count("\n") == 1
    monkeypatch.setenv("SORA_JAX_DEBUG", "1")
    with pytest.raises(exc):
        main(["eval", "--workdir", str(tmp_path)])


def test_a_bug_from_the_console_prints_a_traceback(tmp_path):
    """The same through a real process: a KeyError deep in the library is a traceback, exit 1."""
    code = (
        "import sys; from sora_jax import commands, cli\n"
        "def evaluate(*a, **k):\n    return {}['missing']\n"
        "commands.evaluate = evaluate\n"
        f"sys.exit(cli.main(['eval', '--workdir', {str(tmp_path)!r}]))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 1, out.stderr
    assert "Traceback" in out.stderr and "KeyError: 'missing'" in out.stderr


def test_the_cli_calls_one_library_function_with_typed_arguments(capsys, monkeypatch, tmp_path):
    """`sora-jax sample` hands its flags to commands.sample as typed values (a SampleMode, lists, numbers)."""
    from sora_jax import commands
    from sora_jax.choices import SampleMode

    calls = []
    monkeypatch.setattr(commands, "sample", lambda *a, **k: calls.append((a, k)) or "done")
    argv = ["sample", "--workdir", str(tmp_path), "--prompt", "a 3", "--out", str(tmp_path / "o")]
    argv += ["--mode", "connect", "--video", "a.mp4", "--video", "b.mp4", "--strength", "0.5", "--steps", "3"]
    code, _ = run_in_process(capsys, *argv)
    ((args, kw),) = calls
    assert code == 0 and args == (str(tmp_path), ["a 3"], str(tmp_path / "o"))
    assert kw["mode"] is SampleMode.CONNECT and kw["videos"] == ["a.mp4", "b.mp4"]
    assert kw["strength"] == 0.5 and kw["steps"] == 3 and kw["cfg_scale"] is None


# ---------------------------------------------------------------------- the commands on a trained workdir


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    """A 2-step quickstart smoke run on 8x32x32 clips (what the digit reader reads), trained through the
    command line; the trainer builds its small dataset into the workdir."""
    workdir = tmp_path_factory.mktemp("cli_trained")
    argv = ["train", "--config", f"{ROOT}/configs/quickstart.py:smoke", "--workdir", str(workdir),
            "--config.data.num_frames=8", "--config.data.height=32", "--config.data.width=32", "--config.train.num_steps=2", "--config.train.ckpt_every=2",
            "--config.diffusion.sample_steps=2"]  # fmt: skip
    assert main(argv) == 0
    return workdir


def test_sample_t2v_and_i2v_from_a_trained_workdir(trained, tmp_path, capsys):
    from PIL import Image

    out = tmp_path / "t2v"
    assert main(["sample", "--workdir", str(trained), "--prompt", "a 3 moving left", "--out", str(out)]) == 0
    assert "wrote 1 videos" in capsys.readouterr().out
    assert (out / "contact_sheet.png").is_file() and len(list(out.glob("*.mp4"))) == 1
    Image.fromarray(np.full((20, 24, 3), 200, np.uint8)).save(tmp_path / "still.png")
    out = tmp_path / "i2v"
    argv = ["sample", "--workdir", str(trained), "--prompt", "a 3 moving left", "--out", str(out)]
    assert main([*argv, "--mode", "i2v", "--image", str(tmp_path / "still.png")]) == 0
    assert "wrote 1 i2v video(s) of 8 frames" in capsys.readouterr().out
    assert {p.name for p in out.iterdir()} == {
        "i2v_00.mp4", "i2v_00.gif", "i2v_contact_sheet.png", "i2v_00.mp4.provenance.json"
    }  # fmt: skip


def test_evaluate_picks_the_evaluator_of_the_task(trained, tmp_path, capsys):
    from sora_jax import commands

    metrics = commands.evaluate(trained, num_prompts=4, out=tmp_path / "e")
    assert metrics["split"] == "test" and metrics["step"] == 2 and metrics["count"] == 4
    assert (tmp_path / "e" / "adherence_test.json").is_file()
    with pytest.raises(UserError, match="no split 'paraphrase'|--prompting starts from clips"):
        commands.evaluate(trained, prompting=True, split="paraphrase")
    assert main(["eval", "--workdir", str(trained), "--num_prompts", "2", "--out", str(tmp_path / "e2")]) == 0
    words = dict(w.split("=") for w in capsys.readouterr().out.split())
    assert words["split"] == "test" and words["step"] == "2" and 0 <= float(words["digit_accuracy"]) <= 1


@pytest.mark.parametrize(
    "config, kwargs, called",
    [
        ("vae_digits.py:smoke", {}, "sora_jax.eval.reconstruction.evaluate_vae"),
        ("quickstart.py:smoke", {}, "sora_jax.eval.evaluate.evaluate_workdir"),
        ("quickstart.py:smoke", {"prompting": True}, "sora_jax.eval.prompting.evaluate_prompting"),
        ("vae_digits.py:smoke", {"prompting": True}, "scores a text-to-video model"),
        ("vae_digits.py:smoke", {"split": "paraphrase"}, "scores a text-to-video model"),
    ],
)
def test_evaluate_dispatches_on_the_task(monkeypatch, config, kwargs, called):
    """commands.evaluate reads the checkpoint's config and calls its task's evaluator (or refuses, one line)."""
    import importlib

    from sora_jax import commands, loading
    from sora_jax.config import load_config

    cfg = load_config(f"{ROOT}/configs/{config}")
    monkeypatch.setattr(loading, "saved_config", lambda workdir: (1, cfg))
    calls = []
    for target in (
        "reconstruction.evaluate_vae",
        "evaluate.evaluate_workdir",
        "prompting.evaluate_prompting",
    ):
        module, name = target.split(".")
        fake = lambda *a, _t=f"sora_jax.eval.{target}", **k: calls.append(_t) or {"metrics": {}}  # noqa: E731
        monkeypatch.setattr(importlib.import_module(f"sora_jax.eval.{module}"), name, fake)
    monkeypatch.setattr("sora_jax.eval.clips.eval_dataset", lambda cfg, workdir, data=None: "D")
    monkeypatch.setattr("sora_jax.eval.evaluate.split_prompts", lambda *a: ["a 3 moving left"])
    if called.startswith("sora_jax"):
        commands.evaluate("W", **kwargs)
        assert calls == [called]
    else:
        with pytest.raises(UserError, match=called):
            commands.evaluate("W", **kwargs)
        assert calls == []
