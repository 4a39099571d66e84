"""Long-video consistency (eval/long_video.py): readings per segment, identity changes, direction drift, seams."""

from __future__ import annotations

import numpy as np
import pytest

from sora_jax.eval import long_video
from sora_jax.eval.digit_reader import DIRECTIONS


def test_direction_angles():
    assert long_video.direction_angle("left", "right") == pytest.approx(180.0)
    assert long_video.direction_angle("up", "up-left") == pytest.approx(45.0)
    assert long_video.direction_angle("down-right", "up-right") == pytest.approx(90.0)
    assert all(long_video.direction_angle(d, d) == pytest.approx(0.0) for d in DIRECTIONS)


def _row(intended, read):
    return {
        "intended": intended,
        "read": read,
        "digits_ok": {d for d, _ in intended} == {d for d, _ in read},
        "both_ok": sorted(map(tuple, intended)) == sorted(map(tuple, read)),
    }


def test_summary_counts_identity_changes_decay_and_drift():
    want = [[3, "left"]]
    keep = [_row(want, [[3, "left"]])] * 3 + [
        _row(want, [[3, "up"]])
    ]  # video 0: the direction drifts at the end
    swap = [_row(want, [[3, "left"]])] * 2 + [_row(want, [[5, "left"]])] * 2  # video 1: the 3 becomes a 5
    rows = [[keep[s], swap[s]] for s in range(4)]
    m, per = long_video.summarize_long(rows, seconds_per_segment=1.5)
    assert m["segment_digit_accuracy"] == pytest.approx(6 / 8)
    assert m["segment_both_accuracy"] == pytest.approx(5 / 8)
    assert m["first_quarter_digit_accuracy"] == 1.0 and m["last_quarter_digit_accuracy"] == 0.5
    assert m["videos_all_segments_digits_ok"] == 0.5 and m["videos_identity_changed"] == 0.5
    assert m["identity_changes_per_minute"] == pytest.approx(0.5 / (4 * 1.5 / 60))
    np.testing.assert_allclose(per["angle_error_deg"], [0, 0, 0, 90])  # the 5 is not the 3: no angle
    assert m["first_quarter_angle_error_deg"] == 0 and m["last_quarter_angle_error_deg"] == 90
    np.testing.assert_allclose(per["direction_accuracy"], [1, 1, 1, 0])


@pytest.fixture(scope="module")
def long_clips(tmp_path_factory):
    """24-frame moving-digit clips at 32 x 32 (the reader's size) with their captions."""
    from sora_jax.data import moving_digits
    from sora_jax.eval.prompting import split_clips

    path = tmp_path_factory.mktemp("digits24")
    moving_digits.build(path, num_train=8, num_test=16, num_frames=24, height=32, width=32, fps=8, seed=1)
    return split_clips(path, "test", 16, seed=0)


def test_score_long_on_real_clips(long_clips):
    """A real 24-frame clip cut into segments: a steady reading and seams like any frame change; the same clip
    with its last segment taken from a clip of other digits: one identity change and a seam jump."""
    from sora_jax.data.moving_digits import parse_prompt
    from sora_jax.eval.digit_reader import read_videos

    clips, captions = long_clips
    digits = [frozenset(d for d, _ in parse_prompt(c)) for c in captions]
    a = 0
    b = next(i for i in range(1, len(clips)) if digits[i].isdisjoint(digits[a]))
    segments = [(0, 8), (8, 15), (15, 22), (22, 24)]
    spliced = clips[a].copy()
    spliced[15:] = clips[b][15:]
    videos = np.stack([clips[a], spliced])
    m, per, rows = long_video.score_long(videos, segments, [captions[a]] * 2, frames=8, fps=8.0)

    windows = long_video.segment_windows(videos, segments, 8)
    assert windows.shape == (4, 2, 8, 32, 32, 3)
    np.testing.assert_array_equal(windows[3, 0], clips[a][16:24])
    sets = [[frozenset(d for d, _ in r) for r in read_videos(windows[s])] for s in range(4)]
    assert [rows[s][v]["read"] for s in range(4) for v in range(2)] == [
        [[d, r] for d, r in read] for s in range(4) for read in read_videos(windows[s])
    ]
    assert sets[3][1] != sets[1][1]  # the reader sees the other clip's digits in the spliced end
    expected_changed = [any(sets[s][v] != sets[s - 1][v] for s in range(1, 4)) for v in range(2)]
    assert expected_changed[1] and m["videos_identity_changed"] == pytest.approx(np.mean(expected_changed))
    assert m["segments"] == 4 and m["videos"] == 2 and m["seconds"] == 3.0
    assert per["end_seconds"].tolist() == [1.0, 1.875, 2.75, 3.0]

    steady, _, _ = long_video.score_long(videos[:1], segments, [captions[a]], frames=8, fps=8.0)
    assert (
        0.6 < steady["seam_jump_ratio"] < 1.5
    )  # one continuous clip: a boundary is an ordinary frame change
    jumpy, _, _ = long_video.score_long(videos[1:], segments, [captions[a]], frames=8, fps=8.0)
    assert jumpy["seam_jump_ratio"] > steady["seam_jump_ratio"]


def test_plot_long_writes_a_png(tmp_path):
    from PIL import Image

    per = {
        "end_seconds": np.array([1.0, 2.0, 3.0]),
        "digit_accuracy": np.array([1.0, 0.5, 0.5]),
        "both_accuracy": np.array([0.5, 0.5, 0.0]),
        "direction_accuracy": np.array([1.0, np.nan, 0.0]),
    }
    path = long_video.plot_long(per, tmp_path / "long.png", "test")
    with Image.open(path) as im:
        assert im.size == (800, 320)
