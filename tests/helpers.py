"""Running the project's command lines in a child process, as a user would: the one copy of that set-up (and
``load_benchmark``, a benchmark script imported for its functions).

    from helpers import run_cli
    out = run_cli("train", "--config", "configs/quickstart.py:smoke", "--workdir", str(tmp_path))
    bad = run_cli("train", "--bogus", check=False)               # expected to fail: look at bad.returncode

Every child runs in the repository root with ``cli_env()``: CPU JAX, this checkout first on ``PYTHONPATH`` (so a
child imports the code under test, never another installed copy of the project, and console scripts such as
``sora-jax`` in launch/*.sh too), ``devices`` fake CPU devices (default: JAX's one, not the 8 that
tests/conftest.py gives the test process) and the test run's XLA compilation cache (inherited).
"""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
TIMEOUT_S = 300


def cli_env(devices: int | None = None, **extra: str) -> dict[str, str]:
    """The child's environment: this one plus CPU JAX, ROOT first on PYTHONPATH, ``devices`` fake CPU devices
    (None: XLA_FLAGS empty, so one device), and ``extra`` variables on top."""
    path = [str(ROOT), *filter(None, os.environ.get("PYTHONPATH", "").split(os.pathsep))]
    env = {**os.environ, "JAX_PLATFORMS": "cpu", "PYTHONPATH": os.pathsep.join(path)}
    env["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}" if devices else ""
    return env | {k: str(v) for k, v in extra.items()}


def cli_command(*args, module: str = "sora_jax.cli") -> list[str]:
    """``python -m module args...`` with this interpreter."""
    return [sys.executable, "-m", module, *map(str, args)]


def run_command(
    cmd: list[str], *, env: dict[str, str] | None = None, check: bool = True, timeout: float = TIMEOUT_S
) -> subprocess.CompletedProcess:
    """Runs ``cmd`` in ROOT, output captured as text; ``check``: fail the test, with the end of stderr, unless
    it exits 0."""
    proc = subprocess.run(
        [str(c) for c in cmd],
        cwd=ROOT,
        env=cli_env() if env is None else env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    if check:
        assert proc.returncode == 0, (
            f"{' '.join(map(str, cmd[:6]))} ... exited {proc.returncode}:\n{proc.stderr[-3000:]}"
        )
    return proc


def run_cli(
    *args,
    module: str = "sora_jax.cli",
    env: dict[str, str] | None = None,
    check: bool = True,
    timeout: float = TIMEOUT_S,
) -> subprocess.CompletedProcess:
    """``python -m module args...`` (default: the ``sora-jax`` command line) through ``run_command``."""
    return run_command(cli_command(*args, module=module), env=env, check=check, timeout=timeout)


def run_python(
    *args, env: dict[str, str] | None = None, check: bool = True, timeout: float = TIMEOUT_S
) -> subprocess.CompletedProcess:
    """``python args...`` (e.g. ``"-c", code, ...``) through ``run_command``."""
    return run_command([sys.executable, *args], env=env, check=check, timeout=timeout)


def start_cli(
    *args, module: str = "sora_jax.cli", env: dict[str, str] | None = None, stderr=subprocess.PIPE
) -> subprocess.Popen:
    """``python -m module args...`` started in the background (to signal or kill it): stdout discarded,
    stderr a text pipe (read it with ``communicate``) unless ``stderr`` says otherwise (DEVNULL for a child
    that is killed: a full pipe nobody reads would stall it)."""
    return subprocess.Popen(
        cli_command(*args, module=module),
        cwd=ROOT,
        env=cli_env() if env is None else env,
        stdout=subprocess.DEVNULL,
        stderr=stderr,
        text=True,
    )


def untrained_workdir(path: Path, config: str = f"{ROOT}/configs/quickstart.py:smoke") -> Path:
    """A text-to-video workdir at ``path`` with one checkpoint at step 0 (the initial weights of ``config``):
    for what does not depend on training (the safeguards: policy, watermark, provenance)."""
    from sora_jax import factory
    from sora_jax.config import load_config
    from sora_jax.train import checkpoint
    from sora_jax.train.state import init_state, make_optimizer

    cfg = load_config(config)
    mgr = checkpoint.manager(path)
    try:
        checkpoint.save(mgr, 0, init_state(factory.make_model(cfg), make_optimizer(cfg), 0), cfg, force=True)
        mgr.wait_until_finished()
    finally:
        mgr.close()
    return path


def load_benchmark(name: str):
    """``benchmarks/<name>.py`` imported as a module (a script, not a package member) for its functions."""
    spec = importlib.util.spec_from_file_location(f"bench_{name}", ROOT / "benchmarks" / f"{name}.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod
