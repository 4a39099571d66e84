"""Pixel-space codecs: identity and luma against numpy formulas."""

import numpy as np
import pytest

from sora_jax.models.autoencoder import IdentityAutoencoder, LumaAutoencoder, float_to_video, video_to_float


def test_luma_matches_rec601_and_roundtrips_grey_videos():
    rng = np.random.default_rng(0)
    rgb = rng.integers(0, 256, (2, 3, 4, 4, 3), dtype=np.uint8)
    x = np.asarray(video_to_float(rgb), np.float64)
    ae = LumaAutoencoder()
    z = np.asarray(ae.encode(video_to_float(rgb)))
    np.testing.assert_allclose(
        z[..., 0], 0.299 * x[..., 0] + 0.587 * x[..., 1] + 0.114 * x[..., 2], atol=1e-6
    )
    assert ae.latent_shape(3, 4, 4) == (3, 4, 4, 1)
    grey = np.repeat(rng.integers(0, 256, (2, 3, 4, 4, 1), dtype=np.uint8), 3, axis=-1)
    back = np.asarray(float_to_video(ae.decode(ae.encode(video_to_float(grey)))))
    np.testing.assert_array_equal(back, grey)


def test_identity_roundtrip_and_shape_errors():
    rgb = np.random.default_rng(1).integers(0, 256, (1, 2, 4, 4, 3), dtype=np.uint8)
    ae = IdentityAutoencoder()
    np.testing.assert_array_equal(np.asarray(float_to_video(ae.decode(ae.encode(video_to_float(rgb))))), rgb)
    with pytest.raises(ValueError, match="wants"):
        LumaAutoencoder().decode(np.zeros((1, 2, 4, 4, 3), np.float32))
