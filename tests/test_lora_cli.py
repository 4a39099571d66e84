"""LoRA workdirs end to end: ``sora-jax export`` writes the adapters alone (diffusers safetensors, a small orbax
checkpoint), and sampling the base with them (``sora-jax sample --lora F:W``, merged or unmerged) gives what
sampling the LoRA workdir itself gives; bad ``--lora`` values are one line."""

import json

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest
from flax import nnx

from sora_jax import factory
from sora_jax.cli import main
from sora_jax.commands import parse_lora
from sora_jax.errors import UserError
from sora_jax.export.lora_files import read_adapters
from sora_jax.loading import saved_config
from sora_jax.sample.pipeline import load_pipeline
from sora_jax.train.loop import train
from tests.test_lora import _base_workdir, _lora_config

PROMPTS = ["the digit 3 moving left", "a 7 drifts up"]


@pytest.fixture(scope="module")
def runs(data_dir, tmp_path_factory):
    """(base workdir, LoRA workdir trained 4 steps on it, the LoRA's export folder)."""
    root = tmp_path_factory.mktemp("lora_cli")
    base = _base_workdir(root / "base")
    overrides = {"lora.init_from": str(base), "data.path": str(data_dir), "mesh.data": 1, "optim.lr": 5e-3}
    cfg = _lora_config(**overrides)  # a large lr: 4 steps move the adapters visibly
    train(cfg, root / "lora", progress=False, devices=jax.devices()[:1])
    assert main(["export", "--workdir", str(root / "lora"), "--out", str(root / "export")]) == 0
    return base, root / "lora", root / "export"


def _adapters(workdir, path, weight=1.0):
    _, cfg = saved_config(workdir)
    abstract = nnx.eval_shape(lambda: factory.make_module(cfg, cfg.seed))
    return [(read_adapters(path, abstract), weight)]


def test_export_writes_the_adapters_alone(runs):
    base, lora_wd, export = runs
    names = {p.name for p in export.iterdir()}
    assert {"pytorch_lora_weights.safetensors", "adapter_config.json", "adapter"} <= names
    assert "transformer" not in names  # the base is not written
    config = json.loads((export / "adapter_config.json").read_text())
    assert config["base_model"] == "dit" and config["metadata"]["sora_jax_base"] == str(base)
    # the orbax checkpoint holds the EMA adapters the workdir samples with
    with ocp.StandardCheckpointer() as ckpt:
        saved = ckpt.restore((export / "adapter").absolute())
    pipe = load_pipeline(lora_wd)
    own = nnx.split_state(pipe.params, nnx.LoRAParam, ...)[0]
    flat_saved = {tuple(map(str, k)): v for k, v in jax.tree_util.tree_flatten_with_path(saved)[0]}
    flat_own = nnx.to_flat_state(own)
    assert len(flat_own) == len(flat_saved) > 0
    trained_b = [v for p, v in flat_own if str(p[-1]).endswith("_lora_b")]
    assert trained_b and all(np.abs(np.asarray(v.get_value())).max() > 0 for v in trained_b)
    for path, v in flat_own:
        key = tuple(f"['{p}']" if isinstance(p, str) else f"[{p}]" for p in path)
        np.testing.assert_array_equal(np.asarray(flat_saved[key]), np.asarray(v.get_value()))


@pytest.mark.parametrize("merge", [True, False], ids=["merged", "unmerged"])
def test_base_with_the_exported_adapter_samples_like_the_lora_workdir(runs, merge):
    base, lora_wd, export = runs
    want = load_pipeline(lora_wd).generate_latents(PROMPTS, seed=3)
    # the LoRA's base is lora.init_from's params (this base workdir's EMA is its untrained initialisation)
    plain = load_pipeline(base, use_ema=False).generate_latents(PROMPTS, seed=3)
    pipe = load_pipeline(base, use_ema=False, adapters=_adapters(base, export), merge_adapters=merge)
    got = pipe.generate_latents(PROMPTS, seed=3)
    scale = np.abs(want).max()
    assert (
        np.abs(plain - want).max() > 50 * 1e-5 * scale
    )  # the adapter changes the samples: 50x the tolerance
    np.testing.assert_allclose(got, want, atol=1e-5 * scale, rtol=0)


def test_two_weighted_adapters_add_up(runs):
    """--lora F:0.8 --lora F:0.2 samples like F at 1.0 (merged: one weight update per kernel)."""
    base, _, export = runs
    one = load_pipeline(base, use_ema=False, adapters=_adapters(base, export)).generate_latents(
        PROMPTS, seed=5
    )
    two = [*_adapters(base, export, 0.8), *_adapters(base, export, 0.2)]
    for merge in (True, False):
        pipe = load_pipeline(base, use_ema=False, adapters=two, merge_adapters=merge)
        got = pipe.generate_latents(PROMPTS, seed=5)
        np.testing.assert_allclose(got, one, atol=1e-5 * np.abs(one).max(), rtol=0)


def test_sample_cli_with_lora_records_it(runs, tmp_path):
    base, _, export = runs
    out = tmp_path / "out"
    spec = f"{export / 'pytorch_lora_weights.safetensors'}:0.8"
    argv = ["sample", "--workdir", str(base), "--prompt", PROMPTS[0], "--out", str(out), "--steps", "2"]
    assert main([*argv, "--lora", spec, "--lora_unmerged"]) == 0
    records = [
        json.loads(p.read_text()) for p in out.rglob("*.json") if "provenance" in p.name or "c2pa" in p.name
    ]
    text = json.dumps(records)
    assert "pytorch_lora_weights.safetensors:0.8" in text


def test_bad_lora_is_one_line(runs, tmp_path, capsys):
    base, _, export = runs
    assert parse_lora(f"{export}:0.5") == (export, 0.5)
    assert parse_lora(str(export)) == (export, 1.0)
    with pytest.raises(UserError, match="finite"):
        parse_lora(f"{export}:nan")
    junk = tmp_path / "junk.safetensors"
    junk.write_bytes(b"not a safetensors file")
    argv = ["sample", "--workdir", str(base), "--prompt", PROMPTS[0], "--out", str(tmp_path / "o")]
    for spec, match in [(str(tmp_path / "missing.safetensors"), "does not exist"), (str(junk), "junk")]:
        assert main([*argv, "--lora", spec]) == 2
        err = capsys.readouterr().err.strip()
        assert len(err.splitlines()) == 1 and match in err, err
    assert not (tmp_path / "o").exists()
