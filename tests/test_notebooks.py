"""The notebooks in ``notebooks/`` run top to bottom (nbclient, the venv's ``python3`` kernel) on tiny workdirs
trained here, so they never rot, and are saved without outputs; the API functions they use (``sora_jax.api``),
on inputs whose answers are known.

Two workdirs, trained at once through the command line: a quickstart smoke DiT on 8 x 32 x 32 clips (what the
digit reader reads; pixel space through the ``luma`` codec; checkpoints at steps 2 and 4; evaluated during
training) and a smoke VAE.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import json
import shutil

import numpy as np
import pytest
from helpers import ROOT, cli_env, start_cli

from sora_jax import api
from sora_jax.errors import UserError

NOTEBOOKS = ROOT / "notebooks"
CELL_TIMEOUT_S = 300
_spec = importlib.util.spec_from_file_location("strip_outputs", NOTEBOOKS / "strip_outputs.py")
strip_outputs = importlib.util.module_from_spec(_spec)
_spec.loader.exec_module(strip_outputs)


@pytest.fixture(scope="module")
def workdirs(tmp_path_factory):
    """{"dit": a text-to-video workdir with checkpoints 2 and 4, evaluated during training (``eval/adherence``
    in its metrics, a best checkpoint), "vae": a VAE workdir without latent statistics}; both train at once."""
    root = tmp_path_factory.mktemp("notebook_runs")
    dit, vae = root / "dit", root / "vae"
    runs = {
        dit: ["--config", "configs/quickstart.py:smoke", "--config.data.num_frames=8", "--config.data.height=32",
              "--config.data.width=32", "--config.train.num_steps=4", "--config.train.ckpt_every=2",
              "--config.diffusion.sample_steps=2", "--config.eval.every_steps=2", "--config.eval.num_videos=4",
              "--config.eval.grid_videos=4", "--config.eval.best_metric=adherence"],
        vae: ["--config", "configs/vae_digits.py:smoke"],
    }  # fmt: skip
    procs = []
    for workdir, argv in runs.items():
        log = open(root / f"{workdir.name}.log", "w")  # noqa: SIM115 (closed below)
        procs.append((start_cli("train", *argv, "--workdir", workdir, stderr=log), log, workdir))
    for proc, log, workdir in procs:
        code = proc.wait(timeout=600)
        log.close()
        assert code == 0, (
            f"training {workdir.name} failed:\n{(root / f'{workdir.name}.log').read_text()[-3000:]}"
        )
    return {"dit": dit, "vae": vae}


def execute(name: str, tmp_path, **env: str) -> tuple[dict, dict[str, list[dict]]]:
    """Runs notebooks/<name>.ipynb top to bottom in a fresh ``python3`` kernel with ``env`` set (CPU JAX, this
    checkout first on PYTHONPATH: ``helpers.cli_env``; temporary files under ``tmp_path``); a failing cell
    fails the test with its traceback. Returns (the executed notebook as JSON, cell id -> outputs)."""
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    client = nbclient.NotebookClient(
        nb, timeout=CELL_TIMEOUT_S, kernel_name="python3", resources={"metadata": {"path": str(NOTEBOOKS)}}
    )
    client.execute(
        env=cli_env(MPLBACKEND="module://matplotlib_inline.backend_inline", TMPDIR=str(tmp_path), **env)
    )
    executed = json.loads(json.dumps(nb))
    return executed, {c["id"]: c.get("outputs", []) for c in executed["cells"]}


def data(outputs: list[dict], mime: str) -> list[str]:
    return [o["data"][mime] for o in outputs if mime in o.get("data", {})]


def text(outputs: list[dict]) -> str:
    """Everything a cell printed (stdout) and displayed as markdown."""
    printed = ["".join(o["text"]) for o in outputs if o.get("name") == "stdout"]
    return "\n".join(printed + ["".join(m) for m in data(outputs, "text/markdown")])


def gif_size(outputs: list[dict]) -> tuple[int, int]:
    """(width, height) of the one animated GIF among ``outputs``."""
    from PIL import Image

    (gif,) = data(outputs, "image/gif")
    with Image.open(io.BytesIO(base64.b64decode(gif))) as im:
        assert im.format == "GIF" and im.n_frames > 1
        return im.size


def assert_figures(outputs: list[dict], n: int = 1) -> None:
    assert len(data(outputs, "image/png")) == n, [list(o.get("data", {})) for o in outputs]


def assert_strips_back(executed: dict, name: str) -> None:
    """Stripping the executed notebook gives the saved one back: what is saved is exactly the code."""
    import nbformat  # (its reader joins each cell's source lines, as the executed copy has them)

    saved = json.loads(json.dumps(nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)))
    assert strip_outputs.strip(executed) == saved


# ----------------------------------------------------------------------------------------------- notebooks


def test_notebooks_are_saved_without_outputs(tmp_path):
    paths = sorted(NOTEBOOKS.glob("*.ipynb"))
    assert [p.stem for p in paths] == ["evaluate", "explore_vae", "prompting"]
    for path in paths:
        nb = json.loads(path.read_text())
        code = [c for c in nb["cells"] if c["cell_type"] == "code"]
        assert code and all(c["outputs"] == [] and c["execution_count"] is None for c in code), path.name
        assert strip_outputs.strip(nb) == nb, f"{path.name}: run python notebooks/strip_outputs.py"
        assert nb["metadata"]["kernelspec"]["name"] == "python3"
        assert nb["cells"][0]["cell_type"] == "markdown" and "SORA_JAX_WORKDIR" in "".join(
            nb["cells"][0]["source"]
        )
    assert strip_outputs.main(["--check", *map(str, paths)]) == 0

    # the script finds outputs and strips them
    dirty = json.loads(paths[0].read_text())
    cell = next(c for c in dirty["cells"] if c["cell_type"] == "code")
    cell["outputs"] = [{"output_type": "stream", "name": "stdout", "text": ["hi\n"]}]
    cell["execution_count"] = 3
    cell["metadata"]["execution"] = {"iopub.execute_input": "2026-01-01T00:00:00Z"}
    dirty["metadata"]["language_info"] = {"name": "python", "version": "3.11.9"}
    path = tmp_path / "dirty.ipynb"
    path.write_text(strip_outputs.dumps(dirty))
    assert strip_outputs.main(["--check", str(path)]) == 1
    assert strip_outputs.main([str(path)]) == 0
    assert json.loads(path.read_text()) == json.loads(paths[0].read_text())


def test_evaluate_notebook(workdirs, tmp_path):
    nb, out = execute(
        "evaluate",
        tmp_path,
        SORA_JAX_WORKDIR=str(workdirs["dit"]),
        SORA_JAX_NUM_VIDEOS="4",
        SORA_JAX_MAX_CHECKPOINTS="2",
    )
    assert "| 2 |" in text(out["setup"]) and "| 4 |" in text(out["setup"])  # the checkpoint table
    assert "best checkpoint: step" in text(out["setup"])
    assert_figures(out["curves"])
    assert "eval scalars: eval/adherence, eval/adherence/digit_accuracy" in text(out["curves"])
    assert gif_size(out["grid"]) == (3 * (4 * 34 - 2), 3 * 32)  # 4 videos in a row, 3x enlarged
    assert "4 prompts -> videos (4, 8, 32, 32, 3)" in text(out["grid"])
    assert_figures(out["frames"])
    assert "| adherence |" in text(out["metrics"]) and "| both |" in text(out["metrics"])
    assert_figures(out["confusion"])
    assert "intended objects whose digit was not read" in text(out["confusion"])
    assert_figures(out["steps"])
    steps_table = text(out["steps"])
    assert "| step | both | digits | directions |" in steps_table
    assert "\n| 2 |" in steps_table and "\n| 4 |" in steps_table
    assert_strips_back(nb, "evaluate")


@pytest.mark.parametrize("which", ["vae", "pixel"])
def test_explore_vae_notebook(workdirs, which, tmp_path):
    env = {"SORA_JAX_VAE_WORKDIR": str(workdirs["vae"])} if which == "vae" else {}
    nb, out = execute(
        "explore_vae", tmp_path, SORA_JAX_WORKDIR=str(workdirs["dit"]), SORA_JAX_NUM_CLIPS="3", **env
    )
    shown = text(out["setup"])
    if which == "vae":  # 5-frame 16x16 clips -> 2 x 4 x 4 x 4 latents
        assert "the VAE of" in shown and "raw posterior means" in shown
        assert "(5, 16, 16, 3) -> latents (2, 4, 4, 4)" in shown
        assert "frame 0 (coded alone)" in text(out["psnr"])
        channels, size = 4, 16
    else:  # the DiT's luma codec: 8-frame 32x32 clips, one channel, reproduced exactly
        assert "the pixel codec 'luma'" in shown and "(8, 32, 32, 3) -> latents (8, 32, 32, 1)" in shown
        assert "reproduced exactly" in text(out["psnr"])
        channels, size = 1, 32
    scale = 96 // size
    assert gif_size(out["reconstructions"]) == (scale * (3 * (size + 2) - 2), scale * (2 * size + 2))
    assert_figures(out["reconstructions"])
    assert_figures(out["psnr"])
    stats = text(out["latent-stats"])
    assert f"| {channels - 1} |" in stats and f"| {channels} |" not in stats
    assert_figures(out["latent-stats"])
    assert gif_size(out["interpolation"]) == (scale * (5 * (size + 2) - 2), scale * size)
    assert_figures(out["interpolation"])
    assert_strips_back(nb, "explore_vae")


def test_prompting_notebook(workdirs, tmp_path):
    nb, out = execute("prompting", tmp_path, SORA_JAX_WORKDIR=str(workdirs["dit"]))
    assert "clips of 8 frames 32x32" in text(out["setup"])
    for cell, size in (("i2v", (3 * 66, 96)), ("extend", (3 * 66, 96)), ("connect", (96, 96))):
        assert gif_size(out[cell]) == size, cell
        assert_figures(out[cell])
    assert_strips_back(nb, "prompting")


# ----------------------------------------------------------------------------------- the API they use


def test_read_metrics_merges_steps_and_skips_a_cut_last_line(tmp_path):
    with pytest.raises(UserError, match="metrics.jsonl not found"):
        api.read_metrics(tmp_path)
    rows = [
        {"step": 2, "loss": 3.0},
        {"step": 4, "loss": 2.0},
        {"step": 4, "eval/adherence": 0.5},  # evaluation during training, a row of its own
        {"step": 2, "loss": 2.5},  # a resumed run logs step 2 again
    ]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"step": 6, "lo')
    with pytest.warns(UserWarning, match="unreadable last line"):
        got = api.read_metrics(tmp_path)
    assert got == [{"step": 2, "loss": 2.5}, {"step": 4, "loss": 2.0, "eval/adherence": 0.5}]
    path.write_text('{"step": 2}\nnot json\n{"step": 4}\n')
    with pytest.raises(UserError, match="line 2 is not JSON"):
        api.read_metrics(tmp_path)


def test_adherence_confusion_counts_by_hand():
    rows = [
        {"intended": [[3, "left"]], "read": [[3, "left"]]},  # right
        {"intended": [[3, "up"]], "read": [[8, "up"]]},  # a 3 read as an 8
        {"intended": [[1, "down"], [7, "right"]], "read": [[1, "up"]]},  # 7 not read; 1 read moving up
        {"intended": [[0, "left"]], "read": [[0, "right"], [0, "left"], [5, "down"]]},  # an extra 5
    ]
    c = api.adherence_confusion(rows)
    want = np.zeros((10, 11), int)
    want[3, 3] = want[3, 8] = want[7, 10] = want[1, 1] = want[0, 0] = 1
    np.testing.assert_array_equal(c.digits, want)
    d = {name: i for i, name in enumerate(api.DIRECTIONS)}
    want = np.zeros((8, 8), int)
    want[d["left"], d["left"]] = 2  # rows 1 and 4 (the reader saw the 0 move left, among others)
    want[d["down"], d["up"]] = 1
    np.testing.assert_array_equal(c.directions, want)
    assert (c.extra_digits, c.unread_objects) == (1, 2)
    assert c.digit_labels[-1] == "none" and len(c.direction_labels) == 8


def test_psnr_per_frame_and_video_grid():
    a = np.zeros((2, 3, 4, 4, 3), np.uint8)
    b = a.copy()
    b[1, 2] = 5  # one frame off by 5 levels everywhere
    p = api.psnr_per_frame(a, b)
    assert p.shape == (2, 3) and np.isinf(p[0]).all() and np.isinf(p[1, :2]).all()
    np.testing.assert_allclose(p[1, 2], 20 * np.log10(255 / 5))
    with pytest.raises(UserError, match="one shape"):
        api.psnr_per_frame(a, b[:, :2])

    videos = np.arange(3 * 2 * 2 * 2 * 3, dtype=np.uint8).reshape(3, 2, 2, 2, 3)
    grid = api.video_grid(videos, cols=2, gap=1, fill=7)  # 2 rows: videos 0 1 / 2 and an empty cell
    assert grid.shape == (2, 5, 5, 3)
    np.testing.assert_array_equal(grid[:, 3:, :2], videos[2])
    np.testing.assert_array_equal(grid[:, :2, 3:], videos[1])
    assert (grid[:, 2] == 7).all() and (grid[:, 3:, 3:] == 7).all()
    with pytest.raises(UserError, match="video_grid"):
        api.video_grid(videos[0])


def test_dataset_clips_draw_what_the_prompting_evaluator_draws(workdirs):
    from sora_jax.eval.prompting import split_clips

    clips, captions = api.dataset_clips(workdirs["dit"], "test", 5, seed=3)
    want, want_captions = split_clips(api.data_dir(workdirs["dit"]), "test", 5, 3)
    np.testing.assert_array_equal(clips, want)
    assert captions == want_captions and clips.shape == (5, 8, 32, 32, 3)
    assert len(api.dataset_prompts(workdirs["dit"], "test", 5)) == 5
    with pytest.raises(UserError, match="no split"):
        api.dataset_clips(workdirs["dit"], "validation")


def test_load_autoencoder_of_a_vae_workdir_raw_then_normalised(workdirs, tmp_path):
    raw = api.load_autoencoder(workdirs["vae"])
    assert raw.kind == "vae" and raw.step == 4 and "raw posterior means" in raw.description
    clips, _ = api.dataset_clips(raw.data_workdir, "test", 2)
    z = raw.encode(clips)
    assert z.shape == (2, 2, 4, 4, 4)  # (decoding: the explore_vae notebook)

    copy = shutil.copytree(workdirs["vae"], tmp_path / "vae")
    (copy / "latent_stats.json").write_text(json.dumps({"step": 4, "shift": 0.5, "scale": 2.0}))
    normalised = api.load_autoencoder(copy)
    assert "normalised" in normalised.description
    np.testing.assert_allclose(normalised.encode(clips), (z - 0.5) / 2.0, rtol=1e-5, atol=1e-5)

    with pytest.raises(UserError, match="holds a vae model, not a text-to-video one"):
        api.load_pipeline(workdirs["vae"])

    pixel = api.load_autoencoder(workdirs["dit"])
    assert pixel.kind == "luma" and pixel.step is None and pixel.data_workdir == workdirs["dit"]
