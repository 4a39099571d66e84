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
    from sora_jax.data import moving_digits

    path = tmp_path_factory.mktemp("digits")
    moving_digits.build(path, num_train=64, num_test=16, num_frames=4, height=16, width=16, fps=4, seed=0)
    return path


@pytest.fixture(scope="module")
def smoke_t2v():
    """(config, graphdef, params) of the quickstart smoke model with every parameter perturbed: adaLN-Zero
    makes a fresh DiT output zeros, and samples should depend on text and noise."""
    import jax
    from flax import nnx

    from configs import quickstart
    from sora_jax import factory
    from sora_jax.config import load_config

    cfg = load_config(f"{quickstart.__file__}:smoke")
    graphdef, params = nnx.split(factory.make_model(cfg, seed=0), nnx.Param)
    leaves, tree = jax.tree.flatten(params)
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.tree.unflatten(
        tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)]
    )
    return cfg, graphdef, params


def _largest_constant(hlo_text: str) -> int:
    """Elements of the largest constant array literal in lowered StableHLO text (``Lowered.as_text()``); splat
    constants (one value broadcast) count 1. Frozen weights passed as arguments never show up here."""
    import math
    import re

    assert "dense_resource<" not in hlo_text  # an elided literal would hide its size
    sizes = [1]
    for literal, shape in re.findall(r"stablehlo\.constant dense<(.)[^>]*> : tensor<([^>]*)>", hlo_text):
        if literal in ('"', "["):  # hex blob or nested list: a full array
            sizes.append(math.prod(int(d) for d in shape.split("x")[:-1]))
    return max(sizes)


@pytest.fixture(scope="session")
def largest_constant():
    """``f(hlo_text) -> int``: elements of the largest constant array compiled into a lowered function."""
    return _largest_constant
