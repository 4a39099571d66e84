"""The benchmarks' own measuring tools measure what they claim (benchmarks/sample.py's ``PeakWhile``,
benchmarks/speedrun.py's splits and its latent path's budget)."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from helpers import ROOT, load_benchmark


@pytest.fixture(scope="module")
def sample_bench():
    return load_benchmark("sample")


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the RSS peak is reset through /proc")
def test_peak_while_counts_the_work_inside_not_before(sample_bench):
    before = np.ones(300 * 2**20 // 8)  # 300 MB touched, then freed, before the measurement starts
    del before
    with sample_bench.PeakWhile() as quiet:
        np.ones(1000).sum()
    with sample_bench.PeakWhile() as busy:
        inside = np.ones(300 * 2**20 // 8)
        del inside
    assert quiet.rss_reset and busy.rss_reset
    assert busy.rss_peak_mb - quiet.rss_peak_mb > 250  # the 300 MB inside shows; the 300 MB before did not
    assert quiet.device_peak_mb is None  # CPU reports no device bytes


def test_speedrun_by_objects_splits_one_and_two_digit_prompts():
    by_objects = load_benchmark("speedrun").by_objects
    rows = [
        {"intended": [[3, "up"]], "read": [[3, "up"]], "digits_ok": True, "both_ok": True},
        {"intended": [[4, "left"]], "read": [[7, "left"]], "digits_ok": False, "both_ok": False},
        # digits right, one direction right, the other wrong
        {
            "intended": [[1, "up"], [5, "down"]],
            "read": [[1, "up"], [5, "up"]],
            "digits_ok": True,
            "both_ok": False,
        },
        # digits right, no direction right
        {
            "intended": [[0, "left"], [2, "right"]],
            "read": [[0, "up"], [2, "up"]],
            "digits_ok": True,
            "both_ok": False,
        },
        {
            "intended": [[6, "left"], [8, "right"]],
            "read": [[6, "left"]],
            "digits_ok": False,
            "both_ok": False,
        },
    ]
    got = by_objects(rows)
    assert got["1"] == {"prompts": 2, "digits": 0.5, "both": 0.5, "object_directions": 1.0}
    assert got["2"] == {
        "prompts": 3,
        "digits": 2 / 3,
        "both": 0.0,
        "object_directions": 0.25,
        "object_swapped": 0.25,  # the 5 read moving up, the 1's way
        "pair_same_direction": 1.0,  # both videos read their two digits moving the same way
    }
    assert by_objects(rows[1:2])["1"]["object_directions"] is None


def test_speedrun_latent_path_trains_the_vae_inside_the_budget(tmp_path):
    speedrun = load_benchmark("speedrun")
    out = tmp_path / "r.json"
    argv = ["--config", "configs/digits_latent.py:smoke", "--budget_s", "3", "--num_prompts", "0"]
    argv += [
        "--vae_config",
        "configs/vae_digits.py:smoke",
        "--vae_budget_s",
        "3",
        "--workdir",
        str(tmp_path / "w"),
    ]
    assert speedrun.main([*argv, "--out", str(out)]) == 0
    r = json.loads(out.read_text())
    assert r["vae"]["steps"] >= 1 and r["vae"]["latent_shape"]
    assert r["budget_total_s"] == pytest.approx(r["vae"]["seconds"]["train"] + r["seconds"]["train"])
    from sora_jax.loading import saved_config

    _, cfg = saved_config(tmp_path / "w")  # the DiT trained on the latents of the VAE trained first
    assert (
        cfg.autoencoder.path == str(tmp_path / "w" / "vae") and cfg.autoencoder.vae_step == r["vae"]["steps"]
    )
    assert speedrun.main([*argv[:6], "--vae_config", "configs/vae_digits.py:smoke", "--out", str(out)]) == 2


def test_two_digit_data_reports_the_closest_approach(tmp_path):
    """benchmarks/two_digit_data.py: its shares and percentiles against a per-clip loop over the generator's
    corners, and its sheet."""
    from sora_jax.data import moving_digits as md

    bench = load_benchmark("two_digit_data")
    out = tmp_path / "gap.json"
    assert bench.main(["--gaps", "0", "10", "--clips", "64", "--out", str(out)]) == 0
    rows = json.loads(out.read_text())["rows"]
    for row, gap in zip(rows, (0.0, 10.0)):
        g = md.generate("train", 64, seed=0, speed=(1.0, 2.0), min_gap=gap, num_frames=8, height=32, width=32)
        d = []
        for digits, c in zip(g["digits"], g["corners"].tolist()):
            if digits[1] >= 0:
                d.append(min(max(abs(ya - yb), abs(xa - xb)) for (ya, xa), (yb, xb) in zip(*c)))
        assert row["two_digit_clips"] == len(d)
        assert row["reach_gap"] == pytest.approx(np.mean(np.asarray(d) >= gap))
        assert row["closest_approach_px"]["p50"] == pytest.approx(np.median(d))
    assert rows[1]["closest_approach_px"]["p50"] > rows[0]["closest_approach_px"]["p50"]
    assert out.with_suffix(".png").is_file()


def _bench(name: str, *args: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, str(ROOT / "benchmarks" / f"{name}.py"), *args],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=True,
    )


def test_cpu_step_profile_splits_the_step_by_part(tmp_path):
    """benchmarks/cpu_step_profile.py: every part of the smoke step is found (blocks both ways, the rest, the
    optimizer, the EMA; no REPA in the smoke config), and the parts add up to all traced ops."""
    out = tmp_path / "p.json"
    _bench("cpu_step_profile", "--config", "configs/quickstart.py:smoke", "--steps", "2", "--out", str(out))
    r = json.loads(out.read_text())
    parts = r["parts"]
    for part in ("blocks forward", "blocks backward", "model, rest forward", "optimizer", "EMA"):
        assert parts[part] > 0, part
    assert parts["REPA encoder and term"] == 0.0
    assert sum(parts.values()) == pytest.approx(r["op_ms_per_step"])
    assert sum(r["parts_by_kind"].values()) == pytest.approx(r["op_ms_per_step"])


@pytest.fixture(scope="module")
def profile_bench():
    sys.path.insert(0, str(ROOT / "benchmarks"))  # it imports host_malloc.py beside it
    try:
        return load_benchmark("cpu_step_profile")
    finally:
        sys.path.remove(str(ROOT / "benchmarks"))


@pytest.mark.parametrize(
    "op_name, part",
    [
        ("jit(sharded_step)/transpose(jvp(blocks))/while/body/dot_general", "blocks backward"),
        ("jit(sharded_step)/jvp(blocks)/dot_general", "blocks forward"),
        ("jit(sharded_step)/jvp(repa)/conv_general_dilated", "REPA encoder and term"),
        ("jit(sharded_step)/optimizer/vmap()/closed_call/dot_general", "optimizer"),
        ("jit(sharded_step)/ema/add", "EMA"),
        ("jit(sharded_step)/transpose(jvp())/dot_general", "model, rest backward"),
        ("state['ema']['dit']['repa_proj'][0]['bias'].value", "model, rest forward"),  # a name, not a scope
    ],
)
def test_cpu_step_profile_part_names(profile_bench, op_name, part):
    assert profile_bench.part_of(op_name) == part


def test_step_ab_times_both_variants_alternately(tmp_path):
    out = tmp_path / "ab.json"
    _bench(
        "step_ab",
        "--config",
        "configs/quickstart.py:smoke",
        "--a",
        "model.scan_layers=True",
        "--b",
        "model.scan_layers=False",
        "--rounds",
        "3",
        "--block",
        "2",
        "--out",
        str(out),
    )
    r = json.loads(out.read_text())
    assert [len(r["ms_per_step"][k]) for k in "AB"] == [3, 3]
    assert r["median_ms_per_step"]["A"] == pytest.approx(np.median(r["ms_per_step"]["A"]))
    assert r["speedup_b_over_a"] == pytest.approx(r["median_ms_per_step"]["A"] / r["median_ms_per_step"]["B"])
    a, b = r["ms_per_step"]["A"], r["ms_per_step"]["B"]
    assert r["b_faster_in_rounds"] == sum(y < x for x, y in zip(a, b))
