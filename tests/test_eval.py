"""The prompt-adherence evaluator: shipped digit-reader accuracy, input checks, scoring and reports."""

from __future__ import annotations

import json

import numpy as np
import pytest
from flax import nnx

from sora_jax.data import moving_digits
from sora_jax.eval import adherence, digit_reader
from sora_jax.eval.digit_reader import DigitReader, ReaderConfig

# Floors for the shipped weights (the 0.98 target). Measured: 0.990 exact on these 300 test clips (0.989 on
# generate("test", 1000, seed=0)), 0.995 on the 200 train clips (0.992 on 1000).
MIN_EXACT_TEST = 0.98
MIN_EXACT_TRAIN = 0.98


@pytest.fixture(scope="module")
def reader() -> DigitReader:
    return digit_reader.load_reader()


@pytest.fixture(scope="module")
def test_clips() -> dict:
    return moving_digits.generate("test", 300, seed=123)


def _intended(data: dict) -> list[list[tuple[int, int]]]:
    return [
        [(int(d), int(k)) for d, k in zip(ds, ks) if d >= 0]
        for ds, ks in zip(data["digits"], data["directions"])
    ]


def test_directions_match_the_generator(reader):
    assert digit_reader.DIRECTIONS == moving_digits.DIRECTIONS
    assert reader.cfg.directions == moving_digits.DIRECTIONS
    assert (reader.cfg.num_frames, reader.cfg.height, reader.cfg.width) == (8, 32, 32)


def test_shipped_reader_reads_fresh_test_clips(reader, test_clips):
    readings = digit_reader.read_videos(test_clips["video"], reader)
    metrics = adherence.score(readings, _intended(test_clips))
    assert metrics["both_accuracy"] >= MIN_EXACT_TEST, metrics
    assert metrics["digit_accuracy"] >= MIN_EXACT_TEST, metrics
    assert metrics["direction_accuracy"] >= MIN_EXACT_TEST, metrics
    # readings are sorted by digit and use direction names
    for reading in readings:
        assert [d for d, _ in reading] == sorted(d for d, _ in reading)
        assert all(name in moving_digits.DIRECTIONS for _, name in reading)


def test_shipped_reader_reads_train_split_too(reader):
    data = moving_digits.generate("train", 200, seed=124)
    metrics = adherence.score(digit_reader.read_videos(data["video"], reader), _intended(data))
    assert metrics["both_accuracy"] >= MIN_EXACT_TRAIN, metrics


def test_reader_frames_and_sizes(reader, test_clips):
    videos = test_clips["video"][:16]
    base = digit_reader.read_videos(videos, reader)
    longer = np.concatenate([videos, videos[:, ::-1]], axis=1)  # 16 frames: the first 8 are read
    assert digit_reader.read_videos(longer, reader) == base
    upscaled = np.repeat(np.repeat(videos, 4, axis=2), 4, axis=3)  # 128x128, e.g. read back from an MP4
    assert digit_reader.read_videos(upscaled, reader) == base
    with pytest.raises(ValueError, match="at least 8 frames"):
        digit_reader.read_videos(videos[:, :4], reader)
    with pytest.raises(ValueError, match="32x32"):
        digit_reader.read_videos(videos[:, :, :30, :30], reader)
    with pytest.raises(ValueError, match="uint8"):
        digit_reader.read_videos(videos.astype(np.float32), reader)
    with pytest.raises(ValueError, match="batched"):
        digit_reader.read_videos(videos[0], reader)


def test_noise_and_black_videos_score_low(reader, test_clips):
    rng = np.random.default_rng(0)
    noise = rng.integers(0, 256, test_clips["video"].shape, dtype=np.uint8)
    black = np.zeros_like(test_clips["video"])
    for videos in (noise, black):
        readings = digit_reader.read_videos(videos, reader)
        assert all(len(r) >= 1 for r in readings)  # never empty: falls back to the most likely digit
        metrics = adherence.score(readings, _intended(test_clips))
        assert metrics["both_accuracy"] < 0.1, metrics
        assert metrics["digit_accuracy"] < 0.3, metrics


def test_evaluate_prompts_parses_captions(reader, test_clips, tmp_path):
    videos, prompts = test_clips["video"][:64], test_clips["captions"][:64]
    out, rows = adherence.evaluate_prompts(videos, prompts, reader)
    assert out["count"] == 64 and out["both_accuracy"] >= 0.95, out
    assert len(rows) == 64 and rows[0]["prompt"] == prompts[0]
    assert rows[0]["intended"] == [
        [d, moving_digits.DIRECTIONS[k]] for d, k in sorted(_intended(test_clips)[0])
    ]
    json_path, md_path = adherence.write_report(tmp_path / "adherence.json", out, rows)
    saved = json.loads(json_path.read_text())
    assert saved["metrics"]["both_accuracy"] == out["both_accuracy"] and len(saved["per_video"]) == 64
    assert "| both_accuracy |" in md_path.read_text()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["adherence.json", "adherence.md"]


def test_score_hand_computed():
    readings = [
        [(3, "left")],  # right
        [(3, "left"), (7, "up")],  # 7 has the wrong direction
        [(1, "down")],  # misses the 2
        [(5, "right"), (6, "left")],  # an extra digit
    ]
    intended = [[(3, 0)], [(3, 0), (7, 3)], [(1, 3), (2, 2)], [(5, 1)]]
    m = adherence.score(readings, intended)
    assert m["count"] == 4 and m["num_objects"] == 6
    assert m["digit_accuracy"] == pytest.approx(2 / 4)
    assert m["direction_accuracy"] == pytest.approx(4 / 6)
    assert m["both_accuracy"] == pytest.approx(1 / 4)
    assert m["count_accuracy"] == pytest.approx(2 / 4)
    assert m["chance_direction_accuracy"] == pytest.approx(1 / 8)
    assert m["chance_digit_accuracy"] == pytest.approx((1 / 10 + 1 / 45 + 1 / 45 + 1 / 10) / 4)
    assert m["chance_both_accuracy"] == pytest.approx((2 / 80 + 2 / (45 * 64)) / 4)
    # direction ids and names are interchangeable; order does not matter
    assert adherence.score([[(7, 3), (3, "left")]], [[(3, "left"), (7, "down")]])["both_accuracy"] == 1.0
    with pytest.raises(ValueError, match="readings"):
        adherence.score(readings[:1], intended)
    with pytest.raises(ValueError, match="unknown direction"):
        adherence.score([[(1, "sideways")]], [[(1, 0)]])


def test_parse_prompt_list():
    prompts = ["a 3 moves left", "a 3 moving left and a 7 moving down", "the digit nine rises"]
    parsed = [moving_digits.parse_prompt(p) for p in prompts]
    assert parsed == [[(3, 0)], [(3, 0), (7, 3)], [(9, 2)]]
    names = [[(d, moving_digits.DIRECTIONS[k]) for d, k in p] for p in parsed]
    assert adherence.score(names, parsed)["both_accuracy"] == 1.0


def test_save_load_roundtrip(tmp_path):
    cfg = ReaderConfig(
        num_frames=4, height=16, width=16, widths=(8, 8), strides=(2, 1), hidden=8, metrics={"note": "tiny"}
    )
    model = DigitReader(cfg, rngs=nnx.Rngs(3))
    path = digit_reader.save_reader(tmp_path / "r.npz", model)
    loaded = digit_reader.load_reader(path)
    assert loaded.cfg == cfg and loaded.cfg.metrics == {"note": "tiny"}
    videos = np.random.default_rng(0).integers(0, 256, (3, 5, 16, 16, 3), dtype=np.uint8)
    p0, d0 = digit_reader.predict(model, videos)
    p1, d1 = digit_reader.predict(loaded, videos)
    np.testing.assert_allclose(p0, p1, atol=1e-6)
    np.testing.assert_allclose(d0, d1, atol=1e-6)
    assert [p.name for p in tmp_path.iterdir()] == ["r.npz"]
    with pytest.raises(FileNotFoundError, match="reader_training"):
        digit_reader.load_reader(tmp_path / "missing.npz")


def test_reader_training_chunks_mix_splits_and_speeds():
    from sora_jax.eval import reader_training

    assert reader_training._speeds(["default", "1:2"]) == (None, (1.0, 2.0))
    with pytest.raises(SystemExit, match="MIN:MAX"):
        reader_training._speeds(["fast"])
    cfg = ReaderConfig()
    x, presence, direction = reader_training.make_chunk(40, 300, cfg, speeds=(None, (1.0, 2.0)))
    assert x.shape == (40, 8, 32, 32) and x.dtype == np.uint8
    # every clip has 1-2 digits and a direction exactly where a digit is present
    assert set(presence.sum(-1).tolist()) <= {1.0, 2.0}
    np.testing.assert_array_equal(direction >= 0, presence > 0.5)
    # the slow share moves less: mean frame-to-frame change of the pixels is smaller than the default share
    a, _, _ = reader_training.make_chunk(40, 300, cfg, speeds=(None,))
    b, _, _ = reader_training.make_chunk(40, 300, cfg, speeds=((1.0, 1.0),))
    move = lambda v: np.abs(np.diff(v.astype(np.float32), axis=1)).mean()
    assert move(b) < 0.75 * move(a)


def test_paraphrase_prompts_use_unseen_words_and_parse_to_their_objects():
    from sora_jax.data import moving_digits
    from sora_jax.eval.paraphrase import paraphrase_prompts
    from sora_jax.text.tokenizer import HashWordTokenizer

    prompts = paraphrase_prompts(200, seed=1)
    assert len(prompts) == 200 and len(set(prompts)) > 150
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(3000):  # the caption generator's vocabulary
        k = int(rng.integers(1, 3))
        objs = [(int(d), int(rng.integers(8))) for d in rng.choice(10, k, replace=False)]
        seen |= set(HashWordTokenizer.split(moving_digits.caption(rng, objs)))
    for p in prompts:
        assert moving_digits.parse_prompt(p)  # scored like a caption
    unseen = {"handwritten", "numeral", "wanders", "heads", "scrolls", "floats", "frame", "corner"}
    assert not unseen & seen and unseen <= {w for p in prompts for w in HashWordTokenizer.split(p)}
