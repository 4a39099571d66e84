"""sora_jax.safety.watermark: payload round trip, calibrated null, PSNR, robustness to real edits, bad input."""

from __future__ import annotations

import math

import numpy as np
import pytest
from PIL import Image
from sklearn.datasets import load_digits

from sora_jax.data.video_codec import decode_frames, encode_mp4
from sora_jax.safety import watermark as wmk

WM = wmk.Watermark()


def _noise(rng, t, h, w):
    """Smoothed colour noise drifting 2 px/frame (textured, moving)."""
    base = rng.uniform(0, 255, (h + 2 * t, w + 2 * t, 3))
    base = (base + np.roll(base, 1, 0) + np.roll(base, 1, 1) + np.roll(base, (1, 1), (0, 1))) / 4
    return np.stack([base[2 * k : 2 * k + h, k : k + w] for k in range(t)]).astype(np.uint8)


def _gradient(rng, t, h, w):
    """A colour ramp at a random angle, brightening over time, with light grain."""
    yy, xx = np.mgrid[0:h, 0:w]
    ang = rng.uniform(0, 2 * np.pi)
    ramp = (np.cos(ang) * yy / h + np.sin(ang) * xx / w)[None, ..., None]
    c0, c1 = rng.uniform(20, 120, 3), rng.uniform(130, 235, 3)
    frames = c0 + (c1 - c0) * (ramp - ramp.min()) / np.ptp(ramp) + 2.0 * np.arange(t)[:, None, None, None]
    return np.clip(frames + rng.normal(0, 2, (t, h, w, 3)), 0, 255).astype(np.uint8)


def _digits(rng, t, h, w):
    """Two sklearn digits scaled up and moving over a grey background with grain."""
    frames = np.full((t, h, w, 3), rng.uniform(40, 200), np.float64)
    images = load_digits().images
    for _ in range(2):
        cell = max(1, h // 32)
        glyph = np.kron(images[rng.integers(len(images))] / 16, np.ones((cell * 2, cell * 2)))
        g = glyph.shape[0]
        colour = rng.uniform(0, 255, 3)
        p0, v = rng.uniform(0, min(h, w) - g, 2), rng.uniform(-3, 3, 2)
        for k in range(t):
            y, x = np.clip(p0 + v * k, 0, min(h, w) - g).astype(int)
            patch = frames[k, y : y + g, x : x + g]
            patch[:] = patch * (1 - glyph[..., None]) + colour * glyph[..., None]
    return np.clip(frames + rng.normal(0, 3, frames.shape), 0, 255).astype(np.uint8)


KINDS = [_noise, _gradient, _digits]


def _psnr(a, b):
    return 10 * math.log10(255**2 / np.mean((a.astype(np.float64) - b.astype(np.float64)) ** 2))


def _h264(video, crf):
    return decode_frames(encode_mp4(video, 8.0, crf=crf, preset="medium"))


def _half(video):
    h, w = video.shape[1] // 2, video.shape[2] // 2
    return np.stack([np.asarray(Image.fromarray(f).resize((w, h), Image.BILINEAR)) for f in video])


def test_payload_bits_and_hex():
    bits = wmk.payload_bits("sora-jax/dit-b2", "run-0042")
    assert bits.shape == (32,) and bits.dtype == np.uint8 and set(np.unique(bits)) <= {0, 1}
    np.testing.assert_array_equal(bits, wmk.payload_bits("sora-jax/dit-b2", "run-0042"))
    other = wmk.payload_bits("sora-jax/dit-b2", "run-0043")
    np.testing.assert_array_equal(bits[:16], other[:16])  # same model half, different run half
    assert np.any(bits[16:] != other[16:])
    text = wmk.bits_to_hex(bits)
    assert len(text) == 9 and text[4] == "-"
    assert int(text.replace("-", ""), 16) == int("".join(map(str, bits)), 2)
    assert wmk.bits_to_hex([1, 0, 1, 0]) == "a"


@pytest.mark.parametrize("kind", KINDS)
def test_embed_detect_exact_payload_and_psnr(kind):
    rng = np.random.default_rng(0)
    clean = kind(rng, 8, 256, 256)
    bits = wmk.payload_bits("sora-jax/dit-b2", "run-0042")
    marked = wmk.embed(clean, bits, WM)
    assert marked.shape == clean.shape and marked.dtype == np.uint8
    assert _psnr(marked, clean) >= 40.0
    det = wmk.detect(marked, WM)
    assert det.detected and det.p_value < 1e-9, det
    np.testing.assert_array_equal(det.bits, bits)
    assert np.all(det.bit_confidence > 0.9)
    assert wmk.bits_to_hex(det.bits) == wmk.bits_to_hex(bits)
    # another key sees nothing
    assert not wmk.detect(marked, wmk.Watermark(key=12345)).detected


def test_odd_sizes_and_single_frame():
    rng = np.random.default_rng(1)
    clean = _digits(rng, 1, 150, 97)
    bits = rng.integers(0, 2, 32)
    det = wmk.detect(wmk.embed(clean, bits, WM), WM)
    assert det.detected
    np.testing.assert_array_equal(det.bits, bits)


def test_flat_video_scores_nothing():
    for size in (64, 200):
        det = wmk.detect(np.full((3, size, size, 3), 77, np.uint8), WM)
        assert not det.detected and det.p_value > 0.99 and not np.any(det.bit_confidence > 0.5), det


def _binomial_interval(n, p, alpha=1e-3):
    """Smallest and largest counts k with two-sided tail probability >= alpha / 2 under Binomial(n, p)."""
    pmf = [math.comb(n, k) * p**k * (1 - p) ** (n - k) for k in range(n + 1)]
    cdf = np.cumsum(pmf)
    lo = int(np.searchsorted(cdf, alpha / 2))
    hi = int(np.searchsorted(cdf, 1 - alpha / 2))
    return lo, hi


def test_unmarked_videos_not_detected_and_p_values_roughly_uniform():
    n = 60
    p_values = []
    for i in range(n):
        rng = np.random.default_rng(100 + i)
        video = KINDS[i % 3](rng, 4, 128, 128)
        det = wmk.detect(video, WM)
        assert not det.detected, (i, det.score, det.p_value)
        p_values.append(det.p_value)
    p_values = np.asarray(p_values)
    for level in (0.1, 0.5):
        lo, hi = _binomial_interval(n, level)
        assert lo <= np.sum(p_values < level) <= hi, (level, np.sort(p_values))


def _edits(rng):
    def crop(v):
        h, w = int(0.9 * v.shape[1]), int(0.9 * v.shape[2])
        y, x = rng.integers(0, v.shape[1] - h + 1), rng.integers(0, v.shape[2] - w + 1)
        return v[:, y : y + h, x : x + w]

    return {
        "h264_crf28": lambda v: _h264(v, 28),
        "resize_half": _half,
        "crop_10pct": crop,
        "fps_8_to_24": lambda v: v.repeat(3, 0),
        "trim_half": lambda v: v[: len(v) // 2],
    }


@pytest.mark.parametrize("kind", [_noise, _digits])
def test_survives_edits_at_256(kind):
    rng = np.random.default_rng(7)
    clean = kind(rng, 16, 256, 256)
    bits = rng.integers(0, 2, 32)
    marked = wmk.embed(clean, bits, WM)
    for name, edit in _edits(rng).items():
        edited = edit(marked)
        det = wmk.detect(edited, WM)
        assert det.detected, (name, det.score, det.p_value)
        assert np.mean(det.bits == bits) >= 0.9, (name, np.mean(det.bits == bits))
        assert not wmk.detect(edit(clean), WM).detected, name
    assert wmk.detect(_half(marked), WM).scale == 0.5


@pytest.mark.parametrize(
    ("video", "bits", "match"),
    [
        (np.zeros((4, 64, 64, 3), np.float32), None, "uint8"),
        (np.zeros((64, 64, 3), np.uint8), None, r"\[T, H, W, 3\]"),
        (np.zeros((4, 64, 64, 4), np.uint8), None, r"\[T, H, W, 3\]"),
        (np.zeros((4, 16, 64, 3), np.uint8), None, "H, W >= 32"),
        (np.zeros((0, 64, 64, 3), np.uint8), None, "T >= 1"),
        (np.zeros((4, 64, 64, 3), np.uint8), np.zeros(31), "32 values of 0/1"),
        (np.zeros((4, 64, 64, 3), np.uint8), np.full(32, 2), "32 values of 0/1"),
    ],
)
def test_bad_input_raises_one_clear_error(video, bits, match):
    with pytest.raises(ValueError, match=match):
        wmk.embed(video, np.zeros(32, np.uint8) if bits is None else bits, WM)
    if bits is None:
        with pytest.raises(ValueError, match=match):
            wmk.detect(video, WM)


def test_bad_config_raises():
    with pytest.raises(ValueError, match="Watermark.tile"):
        wmk.Watermark(tile=30)
    with pytest.raises(ValueError, match="Watermark.scales"):
        wmk.Watermark(scales=(1.0, 0.3))
    with pytest.raises(ValueError, match="Watermark.n_bits"):
        wmk.Watermark(n_bits=200)


def _digits_on_black(rng, t=8):
    """The demo model's format: a grey/white digit moving over black at 32x32, nearest-upscaled 4x to 128."""
    frames = np.zeros((t, 32, 32), np.float64)
    images = load_digits().images
    glyph = np.kron(images[rng.integers(len(images))] / 16, np.ones((2, 2)))  # 16x16 blocky strokes
    p0, v = rng.uniform(2, 14, 2), rng.uniform(-1.5, 1.5, 2)
    shade = rng.uniform(180, 255)
    for k in range(t):
        y, x = np.clip(p0 + v * k, 0, 16).astype(int)
        frames[k, y : y + 16, x : x + 16] = np.maximum(frames[k, y : y + 16, x : x + 16], shade * glyph)
    video = np.repeat(np.round(frames).astype(np.uint8)[..., None], 3, -1)
    return video.repeat(4, 1).repeat(4, 2)


def test_digit_on_black_upscaled_survives_crf18():
    # mostly black, blocky-edged, 8 frames: black clips half the pattern and the edges swamp a plain high-pass
    rng = np.random.default_rng(3)
    bits = wmk.payload_bits("sora-jax/demo", "run-0001")
    for _ in range(2):
        clean = _digits_on_black(rng)
        marked = wmk.embed(clean, bits, WM)
        assert _psnr(marked, clean) >= 40.0
        det = wmk.detect(_h264(marked, 18), WM)
        assert det.detected and det.log10_p < -9, det
        assert np.mean(det.bits == bits) >= 0.95, np.mean(det.bits == bits)
        assert not wmk.detect(_h264(clean, 18), WM).detected
