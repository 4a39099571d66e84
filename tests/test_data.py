"""Tests for the moving-digits generator, the clip record codec and the grain pipeline.

The 8-device mesh test relies on tests/conftest.py setting XLA_FLAGS before JAX is imported.
"""

import hashlib
import json

import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec

from sora_jax.data import moving_digits as md
from sora_jax.data import pipeline
from sora_jax.data.records import decode_clip, encode_clip

SMALL = dict(num_frames=4, height=16, width=16)
BUILD = dict(num_train=24, num_test=8, fps=4, seed=3, num_shards=3, progress=False, **SMALL)
MAX_LEN = 12


def toy_tokenize(captions: list[str]) -> tuple[np.ndarray, np.ndarray]:
    """Characters -> ids 1..96, padded with 0 to MAX_LEN."""
    ids = np.zeros((len(captions), MAX_LEN), np.int32)
    for i, c in enumerate(captions):
        codes = [ord(ch) % 96 + 1 for ch in c[:MAX_LEN]]
        ids[i, : len(codes)] = codes
    return ids, ids > 0


def _digest(video: np.ndarray) -> str:
    return hashlib.sha1(np.ascontiguousarray(video).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def built(tmp_path_factory):
    return md.build(tmp_path_factory.mktemp("digits") / "data", **BUILD)


# ---------------------------------------------------------------------------------------------- generator


def test_generate_is_deterministic_and_seeded():
    a = md.generate("train", 16, seed=0, **SMALL)
    b = md.generate("train", 16, seed=0, **SMALL)
    c = md.generate("train", 16, seed=1, **SMALL)
    t = md.generate("test", 16, seed=0, **SMALL)
    assert a["video"].shape == (16, 4, 16, 16, 3) and a["video"].dtype == np.uint8
    assert a["digits"].dtype == np.int32 and a["directions"].shape == (16, 2)
    assert a["video"].tobytes() == b["video"].tobytes() and a["captions"] == b["captions"]
    np.testing.assert_array_equal(a["digits"], b["digits"])
    assert a["video"].tobytes() != c["video"].tobytes()
    assert a["video"].tobytes() != t["video"].tobytes()
    # white digits, 3 identical channels, digit pixels reach full intensity
    v = a["video"]
    np.testing.assert_array_equal(v[..., 0], v[..., 1])
    np.testing.assert_array_equal(v[..., 0], v[..., 2])
    assert v.max() == 255 and v.min() == 0


def test_labels_padding_and_distinct_digits():
    d = md.generate("train", 300, seed=0, **SMALL)
    digits, dirs = d["digits"], d["directions"]
    one = digits[:, 1] < 0
    assert 0.3 < one.mean() < 0.7  # both 1- and 2-object clips
    np.testing.assert_array_equal(dirs[:, 1] < 0, one)
    assert (digits[:, 0] >= 0).all() and (digits[:, 0] <= 9).all() and (dirs[:, 0] <= 7).all()
    assert (digits[~one, 0] != digits[~one, 1]).all()


def test_two_fraction_sets_the_share_of_two_digit_clips():
    base = md.generate("train", 400, seed=0, **SMALL)
    same = md.generate("train", 400, seed=0, two_fraction=0.5, **SMALL)
    np.testing.assert_array_equal(base["video"], same["video"])  # the default draws nothing else
    more = md.generate("train", 400, seed=0, two_fraction=0.75, **SMALL)
    # the same uniform draws decide: every two-digit clip of the default is one here too
    assert ((base["digits"][:, 1] >= 0) <= (more["digits"][:, 1] >= 0)).all()
    assert 0.68 < (more["digits"][:, 1] >= 0).mean() < 0.82
    assert (md.generate("train", 50, seed=0, two_fraction=1.0, **SMALL)["digits"][:, 1] >= 0).all()
    with pytest.raises(ValueError, match="two_fraction"):
        md.generate("train", 5, seed=0, two_fraction=1.5)


def test_build_train_two_fraction_leaves_the_test_split(tmp_path):
    out = md.build(tmp_path / "d", **{**BUILD, "num_train": 40, "num_test": 8}, train_two_fraction=1.0)
    meta = pipeline.read_metadata(out)
    assert meta["params"]["train_two_fraction"] == 1.0
    assert all(d[1] >= 0 for d in meta["splits"]["train"]["digits"])
    ref = md.generate("test", 8, seed=BUILD["seed"], **SMALL)
    assert meta["splits"]["test"]["digits"] == ref["digits"].tolist()
    md.build(tmp_path / "e", **BUILD)  # the default is not listed: builds made before it stay complete
    assert "train_two_fraction" not in pipeline.read_metadata(tmp_path / "e")["params"]


def _closest_approach(corners: np.ndarray) -> np.ndarray:
    """corners int [n, 2, T, 2] -> the two objects' smallest max-norm distance over the frames, [n]."""
    return np.array(
        [min(max(abs(ya - yb), abs(xa - xb)) for (ya, xa), (yb, xb) in zip(*c)) for c in corners.tolist()]
    )


def test_min_gap_keeps_two_digits_apart_in_every_frame():
    rng = np.random.default_rng(0)
    digits, directions = md._sample_objects(rng, "train", 400, 1.0)
    limits = np.array([16.0, 16.0])
    default = md._trajectories(np.random.default_rng(1), directions, 8, limits, 16, (1.0, 2.0))
    apart = md._trajectories(np.random.default_rng(1), directions, 8, limits, 16, (1.0, 2.0), min_gap=10.0)
    assert (_closest_approach(default) < 10).mean() > 0.5  # by default most pairs come within 10 px
    assert (_closest_approach(apart) >= 10).mean() > 0.92  # (measured: 0.945 reach it in 256 draws)
    # both objects still move their labelled way over the two frames before any bounce
    step = np.sign(apart[:, :, 2] - apart[:, :, 0])  # [n, 2, (y, x)]
    np.testing.assert_array_equal(step, np.sign(md.DIRECTION_VECTORS[directions]).astype(int))


def test_build_train_min_gap_leaves_the_test_split(tmp_path):
    big = dict(BUILD, num_frames=8, height=32, width=32, num_train=40, num_test=8)
    out = md.build(tmp_path / "d", **big, train_min_gap=10.0)
    meta = pipeline.read_metadata(out)
    assert meta["params"]["train_min_gap"] == 10.0
    ref = md.generate("test", 8, seed=BUILD["seed"], num_frames=8, height=32, width=32)
    assert meta["splits"]["test"]["captions"] == ref["captions"]
    train = md.generate("train", 40, seed=BUILD["seed"], num_frames=8, height=32, width=32)
    assert meta["splits"]["train"]["digits"] == train["digits"].tolist()  # same objects, other positions


def test_left_to_right_names_the_left_digit_first():
    kw = dict(seed=0, num_frames=8, height=32, width=32)
    anyway = md.generate("train", 200, **kw)
    ordered = md.generate("train", 200, left_to_right=True, **kw)
    np.testing.assert_array_equal(ordered["video"], anyway["video"])  # the same clips, other captions
    firsts = []
    for cap, ds, ks, c in zip(
        ordered["captions"], ordered["digits"], ordered["directions"], ordered["corners"]
    ):
        named = md.parse_prompt(cap)
        if ds[1] < 0:
            assert named == [(int(ds[0]), int(ks[0]))]
            continue
        (y0, x0), (y1, x1) = c[0, 0], c[1, 0]
        left = 0 if (x0, y0) <= (x1, y1) else 1
        assert named == [(int(ds[left]), int(ks[left])), (int(ds[1 - left]), int(ks[1 - left]))], cap
        firsts.append(left)
    assert 0.3 < np.mean(firsts) < 0.7  # the drawn order is random, the naming is not


def test_held_out_pairs_absent_from_train_present_in_every_test_clip():
    assert len(md.HELD_OUT) == 10 and {d for d, _ in md.HELD_OUT} == set(range(10))
    assert (3, 2) in md.HELD_OUT  # 3 -> (3*3+1) % 8 = 2 = "up"
    tr = md.generate("train", 2000, seed=0, **SMALL)
    te = md.generate("test", 500, seed=0, **SMALL)
    train_pairs = {(d, k) for ds, ks in zip(tr["digits"], tr["directions"]) for d, k in zip(ds, ks) if d >= 0}
    assert not train_pairs & md.HELD_OUT
    assert len(train_pairs) == 70  # every other pair is seen
    for ds, ks in zip(te["digits"], te["directions"]):
        assert any((int(d), int(k)) in md.HELD_OUT for d, k in zip(ds, ks))


def test_single_digit_centroid_moves_in_labelled_direction():
    d = md.generate("train", 400, seed=5, num_frames=8, height=32, width=32)
    single = np.flatnonzero(d["digits"][:, 1] < 0)
    assert len(single) > 100
    yy, xx = np.mgrid[:32, :32]
    for i in single:
        frames = d["video"][i, :3, :, :, 0].astype(np.float64)  # [3, H, W]
        mass = frames.sum((1, 2))
        cy = (frames * yy).sum((1, 2)) / mass
        cx = (frames * xx).sum((1, 2)) / mass
        dy, dx = md.DIRECTION_VECTORS[d["directions"][i, 0]]
        for c, v in ((cy, dy), (cx, dx)):
            steps = np.diff(c)  # frames 0->1->2 happen before any bounce
            if v == 0:
                np.testing.assert_allclose(steps, 0, atol=1e-9)
            else:
                assert (np.sign(steps) == np.sign(v)).all() and (np.abs(steps) >= 1 - 1e-9).all(), (i, c, v)


def test_speed_sets_pixels_per_frame():
    # axis-aligned motion at speed v moves rint(p0 + v t): over the two frames before any bounce the
    # corner advances round(v * 2) +- 1 px, and the default speed range is faster than (1, 1.25)
    directions = np.array([[1, -1]] * 300)  # "right", one object
    limits = np.array([16.0, 16.0])
    rng = np.random.default_rng(0)
    slow = md._trajectories(rng, directions, 8, limits, 16, speed=(1.0, 1.25))[:, 0, :, 1]  # x [n, T]
    fast = md._trajectories(rng, directions, 8, limits, 16)[:, 0, :, 1]
    adv_slow, adv_fast = slow[:, 2] - slow[:, 0], fast[:, 2] - fast[:, 0]
    assert ((adv_slow >= 1) & (adv_slow <= 3)).all()
    assert ((adv_fast >= 3) & (adv_fast <= 9)).all()
    d = md.generate("train", 8, seed=0, speed=(1.0, 2.0))
    assert d["video"].shape == (8, 8, 32, 32, 3)
    with pytest.raises(ValueError, match="speed"):
        md.generate("train", 8, seed=0, speed=(2.0, 1.0))


def test_render_pastes_glyphs_with_max_composite():
    g = np.zeros((1, 2, 2, 2), np.uint8)
    g[0, 0] = [[10, 20], [30, 40]]
    g[0, 1] = [[50, 5], [5, 5]]
    corners = np.array([[[[0, 0], [1, 2]], [[0, 1], [1, 2]]]])  # [n=1, O=2, T=2, (y, x)]
    out = md._render(g, corners, 4, 5)
    assert out.shape == (1, 2, 4, 5)
    want0 = np.zeros((4, 5), np.uint8)
    want0[0:2, 0:2] = [[10, 20], [30, 40]]
    want0[0:2, 1:3] = np.maximum(want0[0:2, 1:3], [[50, 5], [5, 5]])
    want1 = np.zeros((4, 5), np.uint8)
    want1[1:3, 2:4] = [[10, 20], [30, 40]]
    want1[1:3, 2:4] = np.maximum(want1[1:3, 2:4], [[50, 5], [5, 5]])
    np.testing.assert_array_equal(out[0, 0], want0)
    np.testing.assert_array_equal(out[0, 1], want1)


def test_resize_matrices():
    img = np.arange(64, dtype=np.float64).reshape(8, 8)
    m = md._resize_matrix(16, 8, "nearest")
    np.testing.assert_array_equal(m @ img @ m.T, np.repeat(np.repeat(img, 2, 0), 2, 1))
    b = md._resize_matrix(16, 8, "bilinear")
    np.testing.assert_allclose(b.sum(1), 1.0)
    up = b @ img @ b.T
    assert up[0, 0] == 0 and up[-1, -1] == 63 and up[1, 0] == pytest.approx(2.0)  # 0.25 of the way to row 1


def test_generate_default_size_renders_every_clip_across_render_chunks():
    """300 clips at the default 8 x 32 x 32 span two render chunks (256 clips each): every frame of every clip
    shows a digit, grey (R = G = B). The generation rate is measured in benchmarks/data_prep.py."""
    d = md.generate("train", 300, seed=0)
    v = d["video"]
    assert v.shape == (300, 8, 32, 32, 3) and v.dtype == np.uint8 and len(d["captions"]) == 300
    assert (v.max(axis=(2, 3, 4)) >= 200).all()  # a glyph's brightest pixel is 239 or 255
    assert (v[..., 0] == v[..., 1]).all() and (v[..., 0] == v[..., 2]).all()


# ---------------------------------------------------------------------------------------------- captions


def test_caption_parse_roundtrip():
    rng = np.random.default_rng(0)
    seen = set()
    for _ in range(5000):
        n = int(rng.integers(1, 3))
        objs = [(int(a), int(k)) for a, k in zip(rng.choice(10, n, replace=False), rng.integers(0, 8, n))]
        text = md.caption(rng, objs)
        seen.add(text.split()[1] if text.startswith(("a ", "an ")) else text.split()[0])
        assert md.parse_prompt(text) == objs, text
    assert len(seen) > 5  # varied wording


def test_generated_captions_match_labels():
    d = md.generate("test", 100, seed=0, **SMALL)
    for text, ds, ks in zip(d["captions"], d["digits"], d["directions"]):
        assert md.parse_prompt(text) == [(int(a), int(k)) for a, k in zip(ds, ks) if a >= 0]


@pytest.mark.parametrize(
    "prompt, want",
    [
        ("a 3 moving left", [(3, 0)]),
        ("the digit 7 drifts down", [(7, 3)]),
        ("a 0 moves right while a 5 moves up", [(0, 1), (5, 2)]),
        ("a 1 going up and to the right", [(1, 5)]),
        ("a 4 moving down-left and a 9 moving right", [(4, 6), (9, 1)]),
        ("the digit 2 slides to the left", [(2, 0)]),
        ("an 8 falls", [(8, 3)]),
        ("a 6 moves up-left", [(6, 4)]),
        ("The digit FIVE rises.", [(5, 2)]),
        ("a 3 and a 7 moving left", [(3, 0), (7, 0)]),
        ("moving right: a 2", [(2, 1)]),
        ("two digits: a 3 moving left and a 7 moving down", [(3, 0), (7, 3)]),
        ("2 numbers: the digit five rises and a 1 moves right", [(5, 2), (1, 1)]),
        ("a cat moves left", []),
        ("a 4", []),
        ("", []),
    ],
)
def test_parse_prompt_user_prompts(prompt, want):
    assert md.parse_prompt(prompt) == want


def test_caption_wording_examples():
    rng = np.random.default_rng(1)
    texts = {md.caption(rng, [(3, 0), (7, 3)]) for _ in range(400)}
    joined = " | ".join(texts)
    for word in ("while", "falls", "to the left", "leftward", "three", "the digit", "moving"):
        assert word in joined, word


# ---------------------------------------------------------------------------------------------- records


def test_record_roundtrip():
    rng = np.random.default_rng(0)
    video = rng.integers(0, 256, (3, 5, 7, 3), dtype=np.uint8)
    rec = encode_clip(video, "a 3 moving left", np.array([3, -1]), np.array([0, -1]))
    out = decode_clip(rec)
    np.testing.assert_array_equal(out["video"], video)
    assert out["video"].dtype == np.uint8 and out["caption"] == "a 3 moving left"
    np.testing.assert_array_equal(out["digits"], [3, -1])
    np.testing.assert_array_equal(out["directions"], [0, -1])
    assert out["digits"].dtype == np.int32
    plain = decode_clip(encode_clip(video, "ünïcode ✓"))
    assert plain["caption"] == "ünïcode ✓"
    np.testing.assert_array_equal(plain["digits"], [-1, -1])
    np.testing.assert_array_equal(plain["directions"], [-1, -1])
    # mostly-black clips compress well
    assert len(encode_clip(np.zeros((8, 32, 32, 3), np.uint8), "x")) < 600


def test_record_corrupt_raises():
    rec = encode_clip(np.full((2, 4, 4, 3), 7, np.uint8), "cap", [1, 2], [3, 4])
    with pytest.raises(ValueError, match="corrupt clip record"):
        decode_clip(b"XXXX" + rec[4:])
    with pytest.raises(ValueError, match="corrupt clip record"):
        decode_clip(rec[:-3])
    with pytest.raises(ValueError, match="corrupt clip record"):
        decode_clip(rec[:10])
    with pytest.raises(ValueError, match="corrupt clip record"):
        decode_clip(rec[:-6] + bytes(6))
    with pytest.raises(ValueError, match="uint8"):
        encode_clip(np.zeros((2, 4, 4, 3), np.float64), "cap")
    with pytest.raises(ValueError, match="uint8"):
        encode_clip(np.zeros((2, 4, 4, 1), np.uint8), "cap")


def test_latent_records_round_trip_as_float32():
    lat = np.random.default_rng(0).normal(size=(3, 2, 2, 4)).astype(np.float16)
    out = decode_clip(encode_clip(lat, "a 3 moving left", [3], [0]))
    assert "video" not in out and out["latents"].dtype == np.float32
    np.testing.assert_array_equal(out["latents"], lat.astype(np.float32))
    assert out["caption"] == "a 3 moving left" and list(out["digits"]) == [3, -1]


# ---------------------------------------------------------------------------------------------- build


def test_build_writes_shards_and_metadata(built):
    meta = pipeline.read_metadata(built)
    assert (
        meta["fps"] == 4 and meta["params"]["num_train"] == 24 and meta["directions"] == list(md.DIRECTIONS)
    )
    assert sorted(map(tuple, meta["held_out"])) == sorted(md.HELD_OUT)
    assert meta["splits"]["train"]["shards"] == [f"train-0000{i}-of-00003.array_record" for i in range(3)]
    ref = md.generate("train", 24, seed=3, **SMALL)
    assert meta["splits"]["train"]["captions"] == ref["captions"]
    assert meta["splits"]["train"]["digits"] == ref["digits"].tolist()
    src = pipeline.open_source(built, "train")
    assert len(src) == 24 and len(pipeline.open_source(built, "test")) == 8
    for i in (0, 9, 23):
        clip = decode_clip(src[i])
        np.testing.assert_array_equal(clip["video"], ref["video"][i])
        np.testing.assert_array_equal(clip["directions"], ref["directions"][i])
        assert clip["caption"] == ref["captions"][i]
    assert not [p for p in built.parent.iterdir() if p.name.startswith(".")]  # no temp dirs left


def test_build_is_idempotent_and_refuses_other_params(built):
    before = {p.name: p.stat().st_mtime_ns for p in built.iterdir()}
    assert md.build(built, **BUILD) == built  # nothing rewritten (the rerun's time: benchmarks/data_prep.py)
    assert {p.name: p.stat().st_mtime_ns for p in built.iterdir()} == before
    with pytest.raises(FileExistsError, match="delete it"):
        md.build(built, **{**BUILD, "num_train": 25})


def test_build_cli(tmp_path):
    out = tmp_path / "cli"
    from data_pipelines.moving_digits import main

    main(["--out", str(out), "--num_train", "4", "--num_test", "2", "--num_frames", "2", "--height", "8"])
    meta = json.loads((out / "metadata.json").read_text())
    assert meta["params"]["height"] == 8 and meta["params"]["width"] == 32
    assert meta["splits"]["test"]["num_clips"] == 2 and len(meta["splits"]["test"]["shards"]) == 2
    main(["--out", str(tmp_path / "apart"), "--num_train", "4", "--num_test", "2", "--train_min_gap", "12"])
    params = json.loads((tmp_path / "apart" / "metadata.json").read_text())["params"]
    assert params["train_min_gap"] == 12.0 and "train_left_to_right" not in params
    main(["--out", str(tmp_path / "ltr"), "--num_train", "4", "--num_test", "2", "--train_left_to_right"])
    assert (
        json.loads((tmp_path / "ltr" / "metadata.json").read_text())["params"]["train_left_to_right"] is True
    )


def test_open_source_missing_says_build(tmp_path):
    with pytest.raises(FileNotFoundError, match="build it"):
        pipeline.open_source(tmp_path / "nope", "train")


# ---------------------------------------------------------------------------------------------- pipeline


def _take(ds, n):
    it = iter(ds)
    return [next(it) for _ in range(n)]


def test_make_dataset_shapes_and_values(built):
    ds = pipeline.make_dataset(built, "train", global_batch_size=4, tokenize=toy_tokenize, seed=0)
    b = _take(ds, 1)[0]
    assert b["video"].shape == (4, 4, 16, 16, 3) and b["video"].dtype == np.uint8
    assert b["tokens"].shape == (4, MAX_LEN) and b["tokens"].dtype == np.int32
    assert b["text_mask"].shape == (4, MAX_LEN) and b["text_mask"].dtype == np.bool_
    assert b["digits"].shape == (4, 2) and b["digits"].dtype == np.int32
    assert b["directions"].shape == (4, 2) and b["directions"].dtype == np.int32
    meta = pipeline.read_metadata(built)["splits"]["train"]
    for cap, tok, dg, dr in zip(b["caption"], b["tokens"], b["digits"], b["directions"]):
        i = meta["captions"].index(str(cap))
        assert meta["digits"][i] == dg.tolist() and meta["directions"][i] == dr.tolist()
        np.testing.assert_array_equal(tok, toy_tokenize([str(cap)])[0][0])


def test_make_dataset_deterministic_per_seed(built):
    kw = dict(global_batch_size=4, tokenize=toy_tokenize)
    a = _take(pipeline.make_dataset(built, "train", seed=0, **kw), 8)  # crosses an epoch (6 batches)
    b = _take(pipeline.make_dataset(built, "train", seed=0, **kw), 8)
    c = _take(pipeline.make_dataset(built, "train", seed=1, **kw), 8)
    va, vb, vc = (np.concatenate([x["video"] for x in s]) for s in (a, b, c))
    np.testing.assert_array_equal(va, vb)
    assert va.tobytes() != vc.tobytes()
    # the first epoch covers all 24 clips once; the second epoch is shuffled differently
    assert len({_digest(v) for v in va[:24]}) == 24
    assert [_digest(v) for v in va[24:32]] != [_digest(v) for v in va[:8]]


def test_make_dataset_with_index_names_each_clips_record(built):
    """``with_index``: the same batches in the same order, plus each clip's record number in the source."""
    kw = dict(global_batch_size=4, tokenize=toy_tokenize, seed=0)
    plain = _take(pipeline.make_dataset(built, "train", **kw), 8)
    indexed = _take(pipeline.make_dataset(built, "train", with_index=True, **kw), 8)
    source = pipeline.open_source(built, "train")
    for p, q in zip(plain, indexed):
        np.testing.assert_array_equal(p["video"], q["video"])
        assert "index" not in p and q["index"].dtype == np.int64
        for i, v in zip(q["index"], q["video"]):
            np.testing.assert_array_equal(decode_clip(source[int(i)])["video"], v)


def test_two_processes_see_disjoint_clips_covering_the_epoch(built):
    src = pipeline.open_source(built, "train")
    everything = {_digest(decode_clip(src[i])["video"]) for i in range(len(src))}
    seen = []
    for pi in (0, 1):
        ds = pipeline.make_dataset(
            built,
            "train",
            global_batch_size=4,
            tokenize=toy_tokenize,
            seed=0,
            repeat=False,
            process_index=pi,
            process_count=2,
        )
        batches = list(ds)
        assert len(batches) == 6 and all(x["video"].shape[0] == 2 for x in batches)
        seen.append({_digest(v) for x in batches for v in x["video"]})
    assert len(seen[0]) == 12 and len(seen[1]) == 12
    assert not seen[0] & seen[1]
    assert seen[0] | seen[1] == everything
    with pytest.raises(ValueError, match="multiple of the process count"):
        pipeline.make_dataset(
            built, "train", global_batch_size=3, tokenize=toy_tokenize, seed=0, process_count=2
        )


def test_iterator_state_resumes_identically(built):
    ds = pipeline.make_dataset(built, "train", global_batch_size=4, tokenize=toy_tokenize, seed=7)
    it = iter(ds)
    for _ in range(3):
        next(it)
    state = it.get_state()
    json.dumps(state)  # grain's checkpoint handler writes it as JSON
    want = [next(it) for _ in range(4)]
    it2 = iter(ds)
    it2.set_state(state)
    got = [next(it2) for _ in range(4)]
    for w, g in zip(want, got):
        np.testing.assert_array_equal(w["video"], g["video"])
        np.testing.assert_array_equal(w["tokens"], g["tokens"])
        assert list(w["caption"]) == list(g["caption"])


def test_worker_processes_give_the_same_stream(built):
    kw = dict(global_batch_size=4, tokenize=toy_tokenize, seed=0)
    a = _take(pipeline.make_dataset(built, "train", **kw), 2)
    b = _take(pipeline.make_dataset(built, "train", num_workers=1, **kw), 2)
    for x, y in zip(a, b):
        np.testing.assert_array_equal(x["video"], y["video"])
        np.testing.assert_array_equal(x["tokens"], y["tokens"])


def test_to_global_on_8_devices(built):
    assert jax.device_count() == 8
    mesh = jax.make_mesh(
        (2, 4, 1, 1), ("data", "fsdp", "tensor", "seq"), axis_types=(jax.sharding.AxisType.Auto,) * 4
    )
    b = _take(pipeline.make_dataset(built, "train", global_batch_size=8, tokenize=toy_tokenize, seed=0), 1)[0]
    g = pipeline.to_global(b, mesh)
    assert set(g) == {"video", "tokens", "text_mask", "digits", "directions"}  # captions dropped
    for k, v in g.items():
        assert v.shape == b[k].shape and v.dtype == b[k].dtype
        assert v.sharding.spec == PartitionSpec(("data", "fsdp"))
        assert {s.data.shape[0] for s in v.addressable_shards} == {1}
        np.testing.assert_array_equal(np.asarray(v), b[k])


def test_two_digit_gap_is_validated():
    from sora_jax.config import ConfigError, load_config, validate

    cfg = load_config("configs/quickstart.py")
    cfg.data.two_digit_gap = 40.0
    with pytest.raises(ConfigError, match="two_digit_gap must be in"):
        validate(cfg)


def test_uci_digits_are_sklearns_load_digits():
    """The glyphs are read from scikit-learn's CSV file without importing scikit-learn: the same arrays."""
    from sklearn.datasets import load_digits

    images, target = md.uci_digits()
    ref = load_digits()
    assert images.dtype == ref.images.dtype and images.shape == (1797, 8, 8)
    np.testing.assert_array_equal(images, ref.images)
    np.testing.assert_array_equal(target, ref.target)
