"""Video writers and reader: MP4/GIF round trips, contact sheets, corrupt files, atomic writes."""

from __future__ import annotations

import numpy as np
import pytest

from sora_jax.sample import video_io


@pytest.fixture(scope="module")
def clip() -> np.ndarray:
    """One moving-digits clip, uint8 [8, 32, 32, 3] (a synthetic fallback keeps the tests independent)."""
    try:
        from sora_jax.data.moving_digits import generate

        return generate("train", 1, seed=7)["video"][0]
    except ImportError:  # pragma: no cover
        video = np.zeros((8, 32, 32, 3), np.uint8)
        for t in range(8):
            video[t, 8:24, 2 + 2 * t : 12 + 2 * t] = 255
        return video


def test_mp4_roundtrip(tmp_path, clip):
    path = video_io.write_mp4(tmp_path / "a.mp4", clip, fps=8)
    back = video_io.read_video(path)
    scale = video_io.default_scale(32, 32)
    assert scale == 4
    assert back.shape == (8, 32 * scale, 32 * scale, 3) and back.dtype == np.uint8
    err = np.abs(back.astype(np.float32) - video_io.upscale(clip, scale)).mean()
    assert err < 6.0, err


def test_mp4_odd_size_is_padded_to_even(tmp_path):
    video = np.full((3, 15, 21, 3), 200, np.uint8)
    back = video_io.read_video(video_io.write_mp4(tmp_path / "odd.mp4", video, fps=4, scale=1))
    assert back.shape == (3, 16, 22, 3)
    assert np.abs(back[:, :15, :21].astype(np.float32) - 200).mean() < 6


def test_gif_roundtrip(tmp_path, clip):
    path = video_io.write_gif(tmp_path / "a.gif", clip, fps=8, scale=2)
    back = video_io.read_video(path)
    assert back.shape == (8, 64, 64, 3)
    assert np.abs(back.astype(np.float32) - video_io.upscale(clip, 2)).max() <= 8


def test_save_video_dispatch(tmp_path, clip):
    assert video_io.read_video(video_io.save_video(tmp_path / "v.gif", clip, scale=1)).shape == clip.shape
    with pytest.raises(ValueError, match=r"\.avi"):
        video_io.save_video(tmp_path / "v.avi", clip)


def test_contact_sheet_dimensions(tmp_path, clip):
    videos = np.stack([clip, clip[::-1], clip])
    sheet = video_io.contact_sheet(videos, ["a 3 moves left", "b", "c"], tmp_path / "s.png", scale=2)
    g, c = 2, 14
    assert sheet.shape == (3 * (c + 64 + g) + g, 8 * (64 + g) + g, 3)
    from PIL import Image

    assert Image.open(tmp_path / "s.png").size == (sheet.shape[1], sheet.shape[0])
    plain = video_io.contact_sheet(videos, None, tmp_path / "p.png", scale=1)
    assert plain.shape == (3 * (32 + g) + g, 8 * (32 + g) + g, 3)
    with pytest.raises(ValueError, match="captions"):
        video_io.contact_sheet(videos, ["one"], tmp_path / "x.png")


def test_corrupt_file_raises_with_path(tmp_path):
    bad = tmp_path / "broken.mp4"
    bad.write_bytes(b"not a video at all" * 64)
    with pytest.raises(ValueError, match="cannot decode video .*broken.mp4"):
        video_io.read_video(bad)
    with pytest.raises(FileNotFoundError):
        video_io.read_video(tmp_path / "missing.mp4")


def test_bad_input_is_rejected(tmp_path):
    with pytest.raises(ValueError, match="uint8"):
        video_io.write_mp4(tmp_path / "f.mp4", np.zeros((2, 8, 8, 3), np.float32), fps=8)
    with pytest.raises(ValueError, match=r"\[T, H, W, 3\]"):
        video_io.write_gif(tmp_path / "f.gif", np.zeros((8, 8, 3), np.uint8), fps=8)
    assert list(tmp_path.iterdir()) == []


def test_atomic_writes_leave_no_temp_files(tmp_path, clip):
    video_io.write_mp4(tmp_path / "a.mp4", clip, fps=8)
    video_io.write_gif(tmp_path / "a.gif", clip, fps=8)
    video_io.contact_sheet(clip[None], ["x"], tmp_path / "s.png")
    # Overwriting replaces in place, and a failed write leaves the old file untouched.
    video_io.write_mp4(tmp_path / "a.mp4", clip[:4], fps=8)
    assert video_io.read_video(tmp_path / "a.mp4").shape[0] == 4
    with pytest.raises(ValueError):
        video_io.write_mp4(tmp_path / "a.mp4", clip, fps=0)
    assert video_io.read_video(tmp_path / "a.mp4").shape[0] == 4
    assert sorted(p.name for p in tmp_path.iterdir()) == ["a.gif", "a.mp4", "s.png"]


def test_failed_write_cleans_up_and_keeps_old_file(tmp_path, clip, monkeypatch):
    path = video_io.write_mp4(tmp_path / "a.mp4", clip, fps=8)
    before = path.read_bytes()
    calls = {"n": 0}
    real = video_io.av.VideoFrame.from_ndarray

    def flaky(*args, **kwargs):
        calls["n"] += 1
        if calls["n"] > 2:
            raise RuntimeError("disk full")
        return real(*args, **kwargs)

    monkeypatch.setattr(video_io.av.VideoFrame, "from_ndarray", flaky)
    with pytest.raises(RuntimeError, match="disk full"):
        video_io.write_mp4(path, clip, fps=8)
    assert path.read_bytes() == before
    assert [p.name for p in tmp_path.iterdir()] == ["a.mp4"]
