"""The code behind the published numbers, end to end at a smoke size: ``sora-jax eval --metrics`` (and
``--compare``) on a DiT workdir, the prompting evaluation and ``sora-jax demo --smoke``; every number is read
back from the files they write and checked against the library computing it directly."""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import ROOT, run_cli

from sora_jax.errors import UserError

CONFIG = f"{ROOT}/configs/quickstart.py:smoke_eval"


@pytest.fixture(scope="module")
def dit(tmp_path_factory):
    """The smoke DiT on 8 x 32 x 32 digits (what the reader reads), 6 steps, checkpoints at 3 and 6."""
    workdir = tmp_path_factory.mktemp("dit32")
    run_cli("train", "--config", CONFIG, "--workdir", workdir)
    return workdir


def test_eval_metrics_report_matches_the_library(dit, tmp_path):
    from sora_jax.eval import suite
    from sora_jax.eval.evaluate import split_prompts
    from sora_jax.sample.pipeline import load_pipeline

    out = tmp_path / "report"
    r = run_cli(
        "eval", "--workdir", dit, "--metrics", "adherence,fd_digits,fd_frames,psnr", "--num_videos", "6",
        "--step", "3", "--ref_count", "16", "--out", out,
    )  # fmt: skip
    assert "| fd_digits (lower is better) |" in r.stdout
    report = json.loads((out / "metrics_step3.json").read_text())
    rows = {row["metric"]: row for row in report["rows"]}
    assert report["step"] == 3 and list(rows) == ["adherence", "fd_digits", "fd_frames", "psnr"]
    assert all(row["count"] == 6 and row["step"] == 3 and row["seconds"] >= 0 for row in rows.values())
    assert rows["fd_digits"]["ref_count"] == 16 and rows["fd_frames"]["samples"] == 6 * 8
    assert rows["psnr"]["value"] > 40  # the luma codec is lossless on grey digits up to rounding

    pipe = load_pipeline(dit, step=3)
    prompts = split_prompts(dit / "data", "test", 6, 0)
    videos = pipe.generate(prompts, seed=0)
    direct = suite.score_videos(
        videos, prompts, ["adherence", "fd_digits", "fd_frames"], data_dir=dit / "data", ref_count=16
    )
    for name, res in direct.items():
        assert rows[name]["value"] == pytest.approx(res["value"], rel=1e-6), name
    assert rows["fd_digits"]["value"] > 0


def test_eval_compare_puts_two_checkpoints_side_by_side(dit, tmp_path):
    out = tmp_path / "cmp"
    r = run_cli(
        "eval", "--workdir", dit, "--step", "3", "--compare", dit, "--compare_step", "6",
        "--metrics", "fd_digits", "--num_videos", "4", "--ref_count", "8", "--out", out,
    )  # fmt: skip
    both = json.loads((out / "compare.json").read_text())
    steps = [rep["step"] for rep in both["reports"]]
    assert steps == [3, 6] and f"{dit.name}@3 | {dit.name}@6" in r.stdout
    values = [rep["rows"][0]["value"] for rep in both["reports"]]
    assert values[0] != values[1]  # different weights, different videos


@pytest.mark.parametrize(
    "args, expected",
    [
        (["--metrics", "adherence,fid"], "unknown metric(s) fid"),
        (["--metrics", "adherence", "--num_videos", "1"], "--num_videos must be at least 2"),
        (["--metrics", "adherence", "--split", "paraphrase"], "use test or train"),
    ],
)
def test_eval_metrics_bad_input_one_line(dit, args, expected):
    r = run_cli("eval", "--workdir", dit, *args, check=False)
    lines = r.stderr.strip().splitlines()
    assert r.returncode == 2 and len(lines) == 1 and expected in lines[0], r.stderr


def test_score_videos_refuses_what_it_cannot_score():
    from sora_jax.eval import suite

    videos = np.zeros((2, 8, 32, 32, 3), np.uint8)
    with pytest.raises(UserError, match="none given"):
        suite.score_videos(videos, None, ["adherence"])
    with pytest.raises(UserError, match="give data_dir"):
        suite.score_videos(videos, None, ["fd_digits"])
    with pytest.raises(UserError, match="autoencoder"):
        suite.score_videos(videos, None, ["psnr"])


def test_prompting_evaluation_report(dit, tmp_path):
    """i2v keeps the given frame (a clean frame through the lossless luma codec), the report on disk holds
    the returned numbers, and the long videos have the asked length."""
    from sora_jax.eval.prompting import evaluate_prompting

    m = evaluate_prompting(dit, num=3, seconds=2.0, num_long=1, out=tmp_path)
    saved = json.loads((tmp_path / "prompting.json").read_text())["metrics"]
    assert saved["i2v_frame0_psnr"] == pytest.approx(m["i2v_frame0_psnr"])
    assert m["clips"] == 3 and m["i2v_frame0_psnr"] > 40
    assert 0.0 <= m["i2v_both_accuracy"] <= 1.0
    assert m["long_segments"] == 3 and m["long_videos"] == 1  # 2 s at 8 fps: 8 + 7 + 1 frames
    assert (tmp_path / "prompting_long.png").is_file()


def test_demo_smoke_end_to_end(tmp_path):
    """``sora-jax demo --smoke``: trains, samples, evaluates, writes the report; its numbers are the files'."""
    workdir = tmp_path / "demo"
    run_cli("demo", "--smoke", "--workdir", workdir, timeout=600)
    summary = json.loads((workdir / "report.json").read_text())
    test = json.loads((workdir / "eval" / "adherence_test.json").read_text())
    para = json.loads((workdir / "eval" / "adherence_paraphrase.json").read_text())
    demo = json.loads((workdir / "eval" / "adherence_demo_prompts.json").read_text())
    assert summary["test_prompts"] == test["metrics"] and summary["paraphrase_prompts"] == para["metrics"]
    assert summary["demo_prompts"] == demo["metrics"] and test["metrics"]["count"] == 8
    assert sum(r["both_ok"] for r in test["per_video"]) / 8 == pytest.approx(test["metrics"]["both_accuracy"])
    report = (workdir / "report.md").read_text()
    assert f"| {test['metrics']['count']} | {test['metrics']['digit_accuracy']:.3f} |" in report
    assert (workdir / "samples" / "contact_sheet.png").is_file()
    assert {r["mode"] for r in summary["prompting"]} == {"i2v", "extend", "long_2s"}
    long = summary["prompting"][-1]
    c = long["consistency"]
    assert c["segments"] == len(long["read"]) == 3 and c["seconds"] == 2.0  # 16 frames: 8 + 7 + 1
    assert "## The 2-second video" in report and f"| {c['segment_digit_accuracy']:.3f} |" in report
    assert (workdir / "samples" / "prompting" / "long_2s_accuracy.png").is_file()
