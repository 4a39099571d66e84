"""Bucketed native-size loading (sora_jax/data/buckets.py): assignment, batch plan, per-process blocks,
exact resume in a fresh process, clip sampling against a reference, and mixed-bucket training that compiles
one step per bucket and never again."""

import json
import pathlib

import jax
import numpy as np
import pytest
from array_record.python.array_record_module import ArrayRecordWriter
from helpers import run_python
from PIL import Image

from sora_jax.data import buckets as bk
from sora_jax.data.records import encode_clip, encode_encoded_clip
from sora_jax.data.video_codec import decode_frames, encode_mp4

# (frames, height, width, fps, kind, count): videos at two sizes and fps (H.264 records) and still images
SPECS = [(12, 16, 16, 8.0, "h264", 10), (20, 16, 24, 16.0, "h264", 10), (1, 32, 32, 0.0, "raw", 12)]
BUCKETS = "4x16x16,8x16x24,1x32x32"


def _clip(i: int, t: int, h: int, w: int) -> np.ndarray:
    """Frame k of clip i is flat grey 10 k + i (so the frames sampled can be read back), plus a ramp."""
    ramp = np.linspace(0, 40, w)[None, None, :, None]
    v = np.arange(t)[:, None, None, None] * 10 + i + ramp + np.zeros((t, h, w, 3))
    return v.clip(0, 255).astype(np.uint8)


def _build(path: pathlib.Path) -> np.ndarray:
    path.mkdir(parents=True, exist_ok=True)
    writer = ArrayRecordWriter(str(path / "train-0.array_record"), "group_size:1")
    rows, i = [], 0
    for t, h, w, fps, kind, count in SPECS:
        for _ in range(count):
            v, caption = _clip(i, t, h, w), f"clip {i}"
            if kind == "h264":
                rec = encode_encoded_clip(encode_mp4(v, fps), shape=(t, h, w), fps=fps, caption=caption)
            else:
                rec = encode_clip(v, caption)
            writer.write(rec)
            rows.append((t, h, w, fps))
            i += 1
    writer.close()
    np.save(path / "train.index.npy", np.asarray(rows, np.float32))
    meta = {
        "splits": {"train": {"shards": ["train-0.array_record"], "num_clips": i, "index": "train.index.npy"}}
    }
    (path / "metadata.json").write_text(json.dumps(meta))
    return np.asarray(rows, np.float32)


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    path = tmp_path_factory.mktemp("buckets") / "data"
    return path, _build(path)


def _plan(index, **kw):
    kw = {"token_budget": 64, "tokens_fn": lambda b: b.frames * (b.height // 8) * (b.width // 8), **kw}
    return bk.BucketPlan(index, bk.parse_buckets(BUCKETS), target_fps=8.0, seed=3, **kw)


def test_parse_buckets_errors():
    assert bk.parse_buckets("16x256x256, 1x512x512")[1] == bk.Bucket(1, 512, 512)
    for bad in ("16x256", "0x8x8", "", "4x8x8,4x8x8", "ax8x8"):
        with pytest.raises(ValueError, match="buckets"):
            bk.parse_buckets(bad)


def test_plan_assignment_and_batch_sizes(data):
    _, index = data
    plan = _plan(index)
    # 16x16 clips -> 4x16x16 (same aspect); 16x24 at 16 fps -> stride 2, 15 frames fit 8; images -> 1x32x32
    assert plan.counts() == {"4x16x16": 10, "8x16x24": 10, "1x32x32": 12, "dropped": 0}
    assert plan.batch_sizes == [64 // 16, 64 // 48, 64 // 16]  # budget // tokens per clip
    assert plan.batches_per_epoch == 10 // 4 + 10 // 1 + 12 // 4
    # too short at the target fps: 8 frames at stride 2 need 15 source frames
    short = _plan(np.array([[14, 16, 24, 16.0]]), check_batches=False)
    assert short.assignment[0] != 1
    # never upscale past max_upscale: a 8x8 image fits no bucket
    assert _plan(np.array([[1, 8, 8, 0.0]]), check_batches=False).counts()["dropped"] == 1
    # image_fraction: that share of the videos trains in the image bucket, the same clips every time
    mixed = _plan(index, image_fraction=0.5, max_upscale=2.0)  # 16x16 videos cover 32x32 at 2x
    moved = np.flatnonzero(mixed.assignment != plan.assignment)
    assert 0 < len(moved) < 20 and np.all(mixed.assignment[moved] == 2) and np.all(index[moved, 0] > 1)
    np.testing.assert_array_equal(
        _plan(index, image_fraction=0.5, max_upscale=2.0).assignment, mixed.assignment
    )
    # the token budget must fit one clip of every bucket (a multiple of the batch multiple)
    with pytest.raises(ValueError, match="token_budget"):
        _plan(index, batch_multiple=2)  # 8x16x24 fits 1 clip, not 2


def test_epochs_cover_each_bucket_once_and_reshuffle(data):
    _, index = data
    plan = _plan(index)
    e0, e1 = plan.epoch(0), plan.epoch(1)
    for epoch in (e0, e1):
        seen = np.concatenate([ids for _, ids in epoch])
        assert len(seen) == len(set(seen.tolist()))  # no clip twice in an epoch
        for k, ids in epoch:
            assert np.all(plan.assignment[ids] == k) and len(ids) == plan.batch_sizes[k]
        for k, members in enumerate(plan.members):  # all but the remainder of each bucket
            got = {int(r) for kk, ids in epoch if kk == k for r in ids}
            assert len(got) == len(members) // plan.batch_sizes[k] * plan.batch_sizes[k]
    assert [ids.tolist() for _, ids in e0] != [ids.tolist() for _, ids in e1]
    assert [ids.tolist() for _, ids in _plan(index).epoch(0)] == [ids.tolist() for _, ids in e0]


def test_two_processes_disjoint_cover_epoch_and_assemble_one_process_batch(data):
    path, index = data
    from sora_jax.data.pipeline import open_source

    source = open_source(path, "train")
    plan = _plan(index, batch_multiple=2, token_budget=128)
    n = plan.batches_per_epoch
    one = iter(bk.make_bucketed_dataset(source, plan, process_index=0, process_count=1))
    procs = [iter(bk.make_bucketed_dataset(source, plan, process_index=p, process_count=2)) for p in (0, 1)]
    seen: list[set] = [set(), set()]
    for _ in range(n):
        whole, halves = next(one), [next(it) for it in procs]
        for p in (0, 1):
            seen[p] |= set(halves[p]["record"].tolist())
        np.testing.assert_array_equal(np.concatenate([h["video"] for h in halves]), whole["video"])
        assert list(np.concatenate([h["caption"] for h in halves])) == list(whole["caption"])
    assert not seen[0] & seen[1]
    expected = {int(r) for _, ids in plan.epoch(0) for r in ids}
    assert seen[0] | seen[1] == expected


_RESUME = """
import json, sys
import jax, numpy as np
from sora_jax.data import buckets as bk
from sora_jax.data.pipeline import open_source
from sora_jax.train import checkpoint
index = np.load(sys.argv[1] + "/train.index.npy")
plan = bk.BucketPlan(index, bk.parse_buckets({buckets!r}), token_budget=64,
    tokens_fn=lambda b: b.frames * (b.height // 8) * (b.width // 8), target_fps=8.0, seed=3)
it = iter(bk.make_bucketed_dataset(open_source(sys.argv[1], "train"), plan))
with checkpoint.manager(sys.argv[2]) as mgr:
    step, _ = checkpoint.restore_train_state(mgr, {{"x": jax.ShapeDtypeStruct((1,), np.float32)}}, data_iter=it)
assert step == 13, step
out = [next(it) for _ in range(4)]
print(json.dumps([[b["record"].tolist(), float(b["video"].astype(np.float64).sum())] for b in out]))
"""


def test_resume_from_a_checkpoint_in_a_fresh_process_gives_the_exact_next_batches(data, tmp_path):
    path, index = data
    import jax.numpy as jnp

    from configs import quickstart
    from sora_jax.data.pipeline import open_source
    from sora_jax.train import checkpoint

    it = iter(bk.make_bucketed_dataset(open_source(path, "train"), _plan(index)))
    k = 13  # past the end of epoch 0 (11 batches)
    for _ in range(k):
        next(it)
    with checkpoint.manager(tmp_path) as mgr:  # the trainer's orbax checkpoint: state + iterator + config
        checkpoint.save(mgr, k, {"x": jnp.zeros(1)}, quickstart.get_config("smoke"), it)
        mgr.wait_until_finished()
    expected = [
        [b["record"].tolist(), float(b["video"].astype(np.float64).sum())]
        for b in (next(it) for _ in range(4))
    ]
    code = _RESUME.format(buckets=BUCKETS)
    out = run_python("-c", code, path, tmp_path)
    assert json.loads(out.stdout.strip().splitlines()[-1]) == expected


def test_load_clip_matches_reference_sampling_resize_and_crop(data):
    path, _ = data
    from sora_jax.data.pipeline import open_source

    source = open_source(path, "train")
    # record 10: 20 frames of 16x24 at 16 fps -> bucket 8x16x24 at 8 fps: stride 2, no resize
    video, caption = bk.load_clip(
        source[10], bk.Bucket(8, 16, 24), target_fps=8.0, rng=np.random.default_rng(1)
    )
    start = int(np.random.default_rng(1).integers(0, 20 - 15 + 1))
    full = decode_frames(encode_mp4(_clip(10, 20, 16, 24), 16.0))
    np.testing.assert_array_equal(video, full[start : start + 15 : 2])
    assert caption == "clip 10" and video.shape == (8, 16, 24, 3)
    # record 0 (16x16) into a 16x8 bucket: cover 16x16 (no resize) and crop the centre 8 columns
    video, _ = bk.load_clip(source[0], bk.Bucket(2, 16, 8), target_fps=8.0, rng=np.random.default_rng(0))
    start = int(np.random.default_rng(0).integers(0, 12 - 2 + 1))
    full = decode_frames(encode_mp4(_clip(0, 12, 16, 16), 8.0))
    np.testing.assert_array_equal(video, full[start : start + 2, :, 4:12])
    # raw record 25 (32x32 image) into 1x16x24: resize to 24x24 with PIL bicubic, crop rows 4..20
    video, _ = bk.load_clip(source[25], bk.Bucket(1, 16, 24), target_fps=8.0, rng=np.random.default_rng(0))
    ref = np.asarray(Image.fromarray(_clip(25, 1, 32, 32)[0]).resize((24, 24), Image.Resampling.BICUBIC))
    np.testing.assert_array_equal(video[0], ref[4:20])
    with pytest.raises(ValueError, match="too short"):
        bk.load_clip(source[0], bk.Bucket(16, 16, 16), target_fps=8.0, rng=np.random.default_rng(0))


def test_worker_processes_give_the_same_stream(data):
    path, index = data
    from sora_jax.data.pipeline import open_source

    plan = _plan(index)
    a = iter(bk.make_bucketed_dataset(open_source(path, "train"), plan))
    b = iter(bk.make_bucketed_dataset(open_source(path, "train"), plan, num_workers=2))
    for _ in range(4):
        x, y = next(a), next(b)
        np.testing.assert_array_equal(x["video"], y["video"])
        np.testing.assert_array_equal(x["record"], y["record"])


def test_mixed_bucket_training_compiles_one_step_per_bucket(data, tmp_path):
    path, _ = data
    from configs import quickstart
    from sora_jax.train.loop import train

    cfg = quickstart.get_config("smoke")
    cfg.data.path = str(path)
    cfg.data.buckets = BUCKETS
    cfg.data.token_budget = 64
    cfg.data.fps = 8
    cfg.model.patch_size = (1, 8, 8)
    cfg.train.num_steps = 12  # more than an epoch (11 batches): every bucket, twice
    out = train(cfg, tmp_path / "run", progress=False, devices=jax.devices()[:1])
    assert out["compiled_steps"] == 3  # one per bucket, compiled before the loop, none after
    assert np.isfinite(out["loss"])
