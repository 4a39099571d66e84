"""Test setup: 8 fake CPU devices (for mesh tests) before JAX is imported, and shared tiny fixtures."""

import getpass
import os
import tempfile

_FLAG = "--xla_force_host_platform_device_count=8"
if _FLAG not in os.environ.get("XLA_FLAGS", ""):
    os.environ["XLA_FLAGS"] = (os.environ.get("XLA_FLAGS", "") + " " + _FLAG).strip()
os.environ.setdefault("JAX_PLATFORMS", "cpu")
# one persistent XLA compilation cache for the whole run (xdist workers and the CLI subprocesses inherit it):
# the many tests that compile the same smoke configs compile them once
os.environ.setdefault(
    "JAX_COMPILATION_CACHE_DIR",
    os.path.join(tempfile.gettempdir(), f"sora_jax_test_xla_cache_{getpass.getuser()}"),
)
os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "1")

import pytest  # noqa: E402  (after the XLA flags above)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
    """64 train / 16 test moving-digits clips of 4 x 16 x 16 (the smoke config's shape)."""
    from data_pipelines import moving_digits

    path = tmp_path_factory.mktemp("digits")
    moving_digits.build(path, num_train=64, num_test=16, num_frames=4, height=16, width=16, fps=4, seed=0)
    return path
