"""Evaluation during training (``config.eval``): the losses and parameters of a run with it equal those of a run
without it bitwise; TensorBoard and metrics.jsonl hold its scalars and a grid of sample videos; the best
checkpoint is kept, survives a resume and loads as ``step="best"``; the evaluator compiles once; bad values are
one ConfigError line.

The digit reader behind ``adherence`` reads 8 frames of 32x32, so these runs train the quickstart smoke model
on clips of that size (its own dataset below)."""

import io
import json
import shutil
import struct
from pathlib import Path

import jax
import ml_collections
import numpy as np
import pytest
from flax import nnx
from PIL import Image

from configs import quickstart
from sora_jax import config as config_lib
from sora_jax import factory, loading
from sora_jax.config import ConfigError, load_config
from sora_jax.eval import in_training
from sora_jax.sample.pipeline import load_pipeline
from sora_jax.train import checkpoint
from sora_jax.train.loop import train
from sora_jax.train.metrics import MetricWriter, video_grid

SHAPE = {"data.num_frames": 8, "data.height": 32, "data.width": 32}
EVAL = {
    "eval.every_steps": 4,  # evaluations at 4 and at the last step, 6
    "eval.metrics": "adherence",
    "eval.num_videos": 4,
    "eval.grid_videos": 3,
    "eval.best_metric": "adherence",
}


@pytest.fixture(scope="module")
def data8(tmp_path_factory):
    """64 train / 16 test moving-digits clips of 8 x 32 x 32 (what the digit reader reads)."""
    from sora_jax.data import moving_digits

    path = tmp_path_factory.mktemp("digits8")
    moving_digits.build(path, num_train=64, num_test=16, num_frames=8, height=32, width=32, fps=8, seed=0)
    return path


def smoke_config(data_dir, **overrides) -> ml_collections.ConfigDict:
    items = [f"--config.data.path={data_dir}", "--config.train.log_every=1", "--config.mesh.data=1"]
    items += [f"--config.{k}={v}" for k, v in (SHAPE | overrides).items()]
    return load_config(f"{quickstart.__file__}:smoke", items)


def run(cfg, workdir) -> dict:
    return train(cfg, workdir, progress=False, devices=jax.devices()[:1])


@pytest.fixture(scope="module")
def runs(data8, tmp_path_factory):
    """The same 6 smoke steps with evaluation off and on: (workdir off, workdir on, train()'s result on)."""
    root = tmp_path_factory.mktemp("runs")
    run(smoke_config(data8), root / "off")
    out = run(smoke_config(data8, **EVAL), root / "on")
    return root / "off", root / "on", out


def rows(workdir) -> list[dict]:
    return [json.loads(line) for line in (Path(workdir) / "metrics.jsonl").read_text().splitlines()]


def eval_rows(workdir) -> dict[int, dict]:
    return {r["step"]: r for r in rows(workdir) if "eval/adherence" in r}


def events(workdir) -> list:
    """Every Event of the workdir's TensorBoard files (TFRecord framing: length, its CRC, data, its CRC)."""
    from tensorboardX.proto.event_pb2 import Event

    out = []
    for path in sorted((Path(workdir) / "tensorboard").iterdir()):
        data, i = path.read_bytes(), 0
        while i < len(data):
            (n,) = struct.unpack("<Q", data[i : i + 8])
            event = Event()
            event.ParseFromString(data[i + 12 : i + 12 + n])
            out.append(event)
            i += 12 + n + 4
    return out


def gif_frames(encoded: bytes) -> list[np.ndarray]:
    image = Image.open(io.BytesIO(encoded))
    assert image.format == "GIF"
    frames = []
    for k in range(image.n_frames):
        image.seek(k)
        frames.append(np.asarray(image.convert("RGB")))
    return frames


# ---------------------------------------------------------------------------------------- the training run


def test_losses_and_params_are_bitwise_the_same_with_evaluation(runs):
    off, on, _ = runs
    train_rows = [{k: v for k, v in r.items() if k != "steps_per_sec"} for r in rows(off)]
    assert [r["step"] for r in train_rows] == list(range(1, 7))
    on_train_rows = [{k: v for k, v in r.items() if k != "steps_per_sec"} for r in rows(on) if "loss" in r]
    assert on_train_rows == train_rows  # loss, grad_norm, lr of every step, bitwise
    for use_ema in (False, True):
        _, step_a, _, a = loading.restore(off, use_ema=use_ema)
        _, step_b, _, b = loading.restore(on, use_ema=use_ema)
        assert step_a == step_b == 6
        leaves_a, leaves_b = jax.tree.leaves(a), jax.tree.leaves(b)
        assert len(leaves_a) == len(leaves_b) > 0
        assert all(np.array_equal(x, y) for x, y in zip(leaves_a, leaves_b))


def test_scalars_and_sample_grid_reach_tensorboard_and_metrics_jsonl(runs):
    _, on, out = runs
    evals = eval_rows(on)
    assert sorted(evals) == [4, 6]  # every 4 steps, and the last step
    for r in evals.values():
        assert 0.0 <= r["eval/adherence"] <= 1.0 and r["eval/adherence/count"] == 4
        assert np.isfinite(r["eval/seconds"]) and "loss" not in r
    assert out["eval/adherence"] == evals[6]["eval/adherence"] and "eval_seconds" in out

    scalars, images = {}, {}
    for event in events(on):
        for v in event.summary.value:
            if v.HasField("image"):
                images[(v.tag, event.step)] = v.image
            elif v.tag.startswith("eval/"):
                scalars[(v.tag, event.step)] = v.simple_value
    for step, r in evals.items():
        for tag in ("eval/adherence", "eval/adherence/digit_accuracy", "eval/seconds"):
            assert scalars[(tag, step)] == pytest.approx(r[tag], rel=1e-6)
    assert sorted(images) == [("eval/samples", 4), ("eval/samples", 6)]
    # 3 clips of 32 x 32 upscaled x2 in a 2 x 2 grid with 2-pixel gaps: 2 * (64 + 2) + 2 = 134
    for image in images.values():
        assert (image.width, image.height) == (134, 134)
        frames = gif_frames(image.encoded_image_string)
        assert 1 < len(frames) <= 8 and frames[0].shape == (134, 134, 3)
    # the contact sheets: 3 rows (caption strip 14 + 64 + 2) of 8 frames (64 + 2), 2-pixel border
    for step in (4, 6):
        with Image.open(on / "eval" / f"samples_{step}.png") as sheet:
            assert sheet.size == (8 * 66 + 2, 3 * 80 + 2)


def test_best_checkpoint_is_kept_and_loads_as_step_best(runs, capsys):
    off, on, _ = runs
    evals = eval_rows(on)
    value = max(r["eval/adherence"] for r in evals.values())
    step = min(s for s, r in evals.items() if r["eval/adherence"] == value)  # ties keep the first
    best = json.loads((on / "checkpoints_best" / "best.json").read_text())
    assert best == {"step": step, "metric": "adherence", "value": value, "higher_is_better": True}
    assert sorted(p.name for p in (on / "checkpoints_best").iterdir() if p.is_dir()) == [str(step)]

    pipe = load_pipeline(on, step="best")
    assert pipe.step == step
    latest = load_pipeline(on)
    assert latest.step == 6
    same = all(
        np.array_equal(x, y) for x, y in zip(jax.tree.leaves(pipe.params), jax.tree.leaves(latest.params))
    )
    assert same == (step == 6)  # the best step's own weights, not the latest's

    from sora_jax.cli import main

    assert main(["checkpoints", "--workdir", str(on)]) == 0
    assert f"best: step {step} by adherence = {value:.4g}" in capsys.readouterr().out

    with pytest.raises(checkpoint.CheckpointError, match="no best checkpoint in") as info:
        load_pipeline(off, step="best")
    assert "\n" not in str(info.value)


def test_a_resumed_run_keeps_the_best_and_reads_configs_from_before_eval(runs, data8, tmp_path):
    """A copy of the evaluated run, its checkpoints' configs stripped of ``eval`` (as saved before the group
    existed), trained on to step 8: it resumes, its old configs load with evaluation off, and the best of
    best.json stands unless step 8 beats it."""
    _, on, _ = runs
    work = tmp_path / "w"
    shutil.copytree(on, work)
    for meta in (work / "checkpoints").glob("*/config/metadata"):
        saved = json.loads(meta.read_text())
        del saved["eval"]
        meta.write_text(json.dumps(saved))
    _, old = loading.saved_config(work)
    assert dict(old.eval) == config_lib.EVAL_DEFAULTS
    assert load_pipeline(work).step == 6

    out = run(smoke_config(data8, **EVAL, **{"train.num_steps": 8}), work)
    assert out["steps_run"] == 2
    evals = eval_rows(work)
    assert sorted(evals) == [4, 6, 8]
    value = max(r["eval/adherence"] for r in evals.values())
    step = min(s for s, r in evals.items() if r["eval/adherence"] == value)
    assert json.loads((work / "checkpoints_best" / "best.json").read_text())["step"] == step
    assert load_pipeline(work, step="best").step == step


# ------------------------------------------------------------------------------------------- the parts


def test_evaluator_compiles_once_and_samples_the_params_it_is_given(data8, tmp_path):
    cfg = ml_collections.ConfigDict(smoke_config(data8, **EVAL).to_dict())
    graphdef, params = nnx.split(factory.make_model(cfg, seed=0), nnx.Param)
    leaves, tree = jax.tree.flatten(params)  # perturbed: a fresh adaLN-Zero DiT outputs zeros
    keys = jax.random.split(jax.random.key(1), len(leaves))
    params = jax.device_get(
        jax.tree.unflatten(tree, [p + 0.05 * jax.random.normal(k, p.shape) for p, k in zip(leaves, keys)])
    )
    other = jax.tree.map(lambda p: p * 1.5, params)

    evaluator = in_training.InTrainingEvaluator(cfg, graphdef, tmp_path, devices=jax.devices()[:1])
    from sora_jax.data.pipeline import split_captions

    assert len(evaluator.prompts) == 4 and set(evaluator.prompts) <= set(split_captions(data8, "test"))
    first = evaluator(params, 1)
    lowered = []

    def listen(event, duration, **kw):
        if event == "/jax/core/compile/jaxpr_to_mlir_module_duration":
            lowered.append(kw.get("fun_name"))

    jax.monitoring.register_event_duration_secs_listener(listen)
    try:
        second = evaluator(other, 2)
        third = evaluator(params, 3)
    finally:
        jax.monitoring.unregister_event_duration_listener(listen)
    assert lowered == []  # nothing traced or compiled after the first evaluation
    assert first.videos.shape == (4, 8, 32, 32, 3) and first.videos.dtype == np.uint8
    assert not np.array_equal(first.videos, second.videos)  # the parameters of the call are sampled
    assert np.array_equal(first.videos, third.videos)
    assert set(first.scalars) >= {"adherence", "adherence/digit_accuracy"} and third.step == 3
    assert evaluator.pipeline.step == 3


def test_explicit_prompts_cycle_and_the_best_rule():
    cfg = quickstart.get_config("smoke")
    cfg.eval.prompts, cfg.eval.num_videos = ("a 3 moving left", "an 8 falls"), 5
    assert in_training.eval_prompts(cfg, "/nonexistent") == ["a 3 moving left", "an 8 falls"] * 2 + [
        "a 3 moving left"
    ]
    assert in_training.improves(0.1, True, None)
    assert in_training.improves(0.2, True, {"value": 0.1}) and not in_training.improves(
        0.1, True, {"value": 0.1}
    )
    assert in_training.improves(3.0, False, {"value": 4.0}) and not in_training.improves(
        5.0, False, {"value": 4.0}
    )
    assert not in_training.improves(float("nan"), True, None)


def test_video_grid_goes_to_tensorboard_as_an_animated_gif(tmp_path):
    rng = np.random.default_rng(0)
    colours = rng.integers(0, 256, size=(3, 4, 3), dtype=np.uint8)  # per clip and frame, one colour
    videos = np.broadcast_to(colours[:, :, None, None, :], (3, 4, 16, 16, 3)).copy()
    writer = MetricWriter(tmp_path)
    writer.write_videos(7, "eval/samples", videos, fps=4)
    writer.close()
    (event,) = [e for e in events(tmp_path) if e.summary.value]
    value = event.summary.value[0]
    assert (event.step, value.tag) == (7, "eval/samples")
    grid = video_grid(videos)
    assert grid.shape == (4, 2 * (64 + 2) + 2, 2 * (64 + 2) + 2, 3)  # 16 px upscaled x4, 2 columns
    assert np.array_equal(grid[2, 2:66, 68:132], np.broadcast_to(colours[1, 2], (64, 64, 3)))
    assert (value.image.width, value.image.height) == (grid.shape[2], grid.shape[1])
    frames = gif_frames(value.image.encoded_image_string)
    assert len(frames) == 4 and all(np.array_equal(f, g) for f, g in zip(frames, grid))


@pytest.mark.parametrize(
    "override, key",
    [
        ({"eval.every_steps": -1}, "config.eval.every_steps"),
        ({"eval.best_metric": "fvd"}, "config.eval.best_metric"),
        ({"eval.grid_videos": 40}, "config.eval.grid_videos"),
        ({"eval.num_videos": 0}, "config.eval.num_videos"),
        ({"eval.prompts": " "}, "config.eval.prompts"),
    ],
)
def test_a_bad_eval_value_is_one_config_error_line(override, key):
    items = [f"--config.{k}={v}" for k, v in override.items()]
    with pytest.raises(ConfigError, match=key.replace(".", r"\.")) as info:
        load_config(f"{quickstart.__file__}:smoke", items)
    assert "\n" not in str(info.value)


def test_an_unknown_metric_stops_training_before_it_starts(data8, tmp_path):
    cfg = smoke_config(data8, **{"eval.every_steps": 2, "eval.metrics": "adherence,nope"})
    with pytest.raises(ConfigError, match=r"config\.eval\.metrics .*unknown metric\(s\) nope") as info:
        run(cfg, tmp_path / "w")
    assert "\n" not in str(info.value) and not (tmp_path / "w").exists()


def test_configs_saved_before_eval_get_it_off():
    upgraded = config_lib.upgrade({"task": "t2v", "model": {}})
    assert upgraded["eval"] == config_lib.EVAL_DEFAULTS and upgraded["eval"]["every_steps"] == 0
    assert set(config_lib.EVAL_DEFAULTS) == set(quickstart.get_config().eval)
