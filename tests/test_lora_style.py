"""benchmarks/lora_style.py's pieces (issue 22): the style score against hand-computed values, the recolouring,
and the clips -> MP4 (PyAV) -> captions.csv -> ``sora-jax ingest`` -> decoded clips path on two tiny clips."""

from __future__ import annotations

import csv

import ml_collections
import numpy as np
import pytest
from helpers import load_benchmark


@pytest.fixture(scope="module")
def bench():
    return load_benchmark("lora_style")


def test_style_score_is_the_mean_of_the_pixels_above_the_threshold(bench):
    v = np.zeros((1, 2, 4, 4, 3), np.uint8)  # [B, T, H, W, 3]: 32 pixels
    v[0, 0, 1, 1] = (200, 100, 0)  # luma 0.299 * 200 + 0.587 * 100 = 118.5
    v[0, 1, 2, 3] = (255, 255, 255)  # luma 255
    v[0, 1, 0, 0] = (20, 20, 20)  # luma 20: below 32, background
    s = bench.style_score(v)
    assert s["fg_luma"] == pytest.approx((118.5 + 255.0) / 2)
    np.testing.assert_allclose(s["fg_rgb"], [227.5, 177.5, 127.5])
    assert s["fg_fraction"] == pytest.approx(2 / 32)
    assert s["bg_luma"] == pytest.approx(20.0 / 30)
    assert np.isnan(bench.style_score(np.zeros((2, 2, 3), np.uint8))["fg_luma"])  # no foreground
    with pytest.raises(ValueError, match="H, W, 3"):
        bench.style_score(np.zeros((4, 4), np.uint8))


def test_recolour_scales_the_colour_by_the_grey_level(bench):
    grey = np.array([0, 128, 255], np.uint8)[:, None].repeat(3, axis=1)  # [3 pixels, 3]
    out = bench.recolour(grey, (255, 128, 0))
    np.testing.assert_array_equal(out, [[0, 0, 0], [128, 64, 0], [255, 128, 0]])
    assert out.dtype == np.uint8


def test_style_clips_are_written_as_mp4s_and_ingested(bench, tmp_path):
    """Two 8-frame 16x16 grey clips through PyAV and the real ``sora-jax ingest``; decoded back they keep
    their captions and their brightness (H.264 at crf 10 moves it by a few levels at most)."""
    shape = dict(num_frames=8, height=16, width=16)
    videos, captions = bench.style_clips(2, (128, 128, 128), **shape)
    assert videos.shape == (2, 8, 16, 16, 3) and videos.max() == 128
    caps = bench.write_clips(tmp_path / "clips", videos, captions, fps=8)
    with open(caps) as f:
        rows = list(csv.DictReader(f))
    assert [r["caption"] for r in rows] == captions and all(r["split"] == "train" for r in rows)
    assert sorted(p.name for p in (tmp_path / "clips").glob("*.mp4")) == ["clip_00.mp4", "clip_01.mp4"]

    data = bench.ingest_clips(tmp_path / "clips", caps, tmp_path / "data", seconds=1.0)
    cfg = ml_collections.ConfigDict({"data": {**shape, "fps": 8}})
    back, back_captions = bench.dataset_clips(data, cfg)
    assert back.shape == (2, 8, 16, 16, 3) and sorted(back_captions) == sorted(captions)
    a, b = bench.style_score(videos), bench.style_score(back)
    assert abs(a["fg_luma"] - b["fg_luma"]) < 6.0
    assert a["fg_luma"] < 128.5  # grey digits, not white


def test_a_missing_base_is_one_line_and_exit_2(bench, tmp_path, capsys):
    assert bench.main(["--base", str(tmp_path / "nope"), "--work", str(tmp_path / "w")]) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and "no trained base" in err and not (tmp_path / "w").exists()
