"""TFDS: the ``captioned_video`` builder (MP4 bytes in ArrayRecord) and ``open_tfds_source`` over it and over
raw-frame datasets (moving_mnist's feature spec, a ClassLabel-captioned tensor video), read through grain.

Needs ``tensorflow-datasets`` (the ``[tfds]`` extra) but not TensorFlow: everything here is written and read
with ``file_format="array_record"`` and images are fed to TFDS already PNG-encoded.
"""

from __future__ import annotations

import csv
import io
import pathlib
import pickle
import sys
from fractions import Fraction

import numpy as np
import pytest

tfds = pytest.importorskip("tensorflow_datasets")

import av  # noqa: E402
import grain  # noqa: E402
from PIL import Image  # noqa: E402

from data_pipelines import tfds_video  # noqa: E402
from sora_jax.data import tfds_source  # noqa: E402
from sora_jax.data.records import decode_clip, read_record  # noqa: E402
from sora_jax.data.tfds_source import open_tfds_source  # noqa: E402

H, W = 32, 48
# (file, frames, fps, caption, split): the CSV leaves split empty for "train"
CLIPS = [
    ("a.mp4", 8, 8, "a red square drifts right", ""),
    ("sub/b.mp4", 12, 10, "ünïcode, with a comma", "train"),
    ("c.mp4", 16, 12, "a slow blue gradient", ""),
    ("d.mp4", 10, 8, "the test clip", "test"),
]


def _frames(k: int, t: int) -> np.ndarray:
    """uint8 [t, H, W, 3]: a smooth gradient that moves, different per clip (H.264 keeps it well)."""
    y, x = np.mgrid[0:H, 0:W].astype(np.float32)
    f = np.arange(t, dtype=np.float32)[:, None, None]
    r = 128 + 90 * np.sin((x[None] + 2 * f) / 9 + k)
    g = 128 + 90 * np.cos((y[None] + f) / 7 - k)
    b = np.broadcast_to(40 + 50 * k + 0 * f, r.shape)
    return np.stack([r, g, b], -1).clip(0, 255).astype(np.uint8)


def _write_mp4(path, frames: np.ndarray, fps: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    with av.open(str(path), "w") as c:
        s = c.add_stream("libx264", rate=Fraction(fps))
        s.width, s.height, s.pix_fmt, s.options = W, H, "yuv420p", {"crf": "8"}
        for frame in frames:
            c.mux(s.encode(av.VideoFrame.from_ndarray(frame, format="rgb24")))
        c.mux(s.encode())


@pytest.fixture(scope="module")
def captioned(tmp_path_factory):
    """(data_dir, {caption: (frames, fps)}) of a captioned_video dataset built with the CLI."""
    root = tmp_path_factory.mktemp("captioned")
    videos = root / "videos"
    truth = {}
    for k, (name, t, fps, caption, _) in enumerate(CLIPS):
        truth[caption] = (_frames(k, t), fps)
        _write_mp4(videos / name, truth[caption][0], fps)
    with (root / "captions.csv").open("w", newline="", encoding="utf-8") as f:
        w = csv.writer(f)
        w.writerow(["video", "caption", "split"])
        w.writerows([(name, caption, split) for name, _, _, caption, split in CLIPS])
    data_dir = root / "tfds"
    tfds_video.main(
        ["--videos", str(videos), "--captions", str(root / "captions.csv"), "--data_dir", str(data_dir)]
    )
    return str(data_dir), truth


def test_captioned_video_roundtrip(captioned):
    data_dir, truth = captioned
    files = sorted(p.name for p in (pathlib.Path(data_dir) / "captioned_video" / "1.0.0").iterdir())
    assert any(".array_record-" in f for f in files), files
    train = open_tfds_source("captioned_video", "train", data_dir, caption_key="caption")
    test = open_tfds_source("captioned_video", "test", data_dir, caption_key="caption")
    assert (len(train), len(test), train.kind, train.video_key) == (3, 1, "mp4", "video")
    seen = []
    index = train.clip_index()
    assert index.dtype == np.float32 and index.shape == (3, 4)
    for i in range(len(train)):
        record = train[i]
        assert isinstance(record, bytes)
        header, payload = read_record(record)
        assert payload[4:8] == b"ftyp"  # the stored MP4, not re-encoded on the way out
        clip = decode_clip(record)
        frames, fps = truth[clip["caption"]]
        seen.append(clip["caption"])
        assert clip["video"].shape == frames.shape and clip["video"].dtype == np.uint8
        # two lossy trips (the source MP4, then the stored one at crf 20, both yuv420p) cost ~3.8
        assert np.abs(clip["video"].astype(np.float32) - frames).mean() < 6.0
        assert header["fps"] == fps and header["source"].endswith(".mp4")
        np.testing.assert_array_equal(index[i], [len(frames), H, W, fps])
    assert sorted(seen) == sorted(c for _, _, _, c, s in CLIPS if s != "test")
    assert decode_clip(test[0])["caption"] == "the test clip"
    # without caption_key every record gets the fixed caption
    fixed = open_tfds_source("captioned_video", "test", data_dir, caption="a video")
    assert decode_clip(fixed[0])["caption"] == "a video"


def _png(image: np.ndarray) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(image[..., 0] if image.shape[-1] == 1 else image).save(buf, format="png")
    return buf.getvalue()


def _prepare(builder_cls, data_dir) -> None:
    builder_cls(data_dir=str(data_dir), file_format="array_record").download_and_prepare()


class TinyMovingMnist(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """moving_mnist's exact feature spec, 4 examples (TFDS encodes numpy images with TF, so feed PNGs)."""

    VERSION = tfds.core.Version("1.0.0")
    url_infos = None  # no downloads (and no importlib_resources lookup of a checksums file)
    EXAMPLES = np.random.default_rng(0).integers(0, 256, (4, 20, 64, 64, 1), dtype=np.uint8)

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self,
            features=tfds.features.FeaturesDict(
                {"image_sequence": tfds.features.Sequence(tfds.features.Image(shape=(64, 64, 1)), length=20)}
            ),
        )

    def _split_generators(self, dl_manager):
        return {"test": self._generate_examples()}

    def _generate_examples(self):
        for i, video in enumerate(self.EXAMPLES):
            yield i, {"image_sequence": [_png(f) for f in video]}


def test_raw_frames_through_grain(tmp_path):
    _prepare(TinyMovingMnist, tmp_path)
    src = open_tfds_source("tiny_moving_mnist", "test", str(tmp_path), caption="digits moving", fps=10)
    assert (len(src), src.kind, src.video_key) == (4, "frames", "image_sequence")
    assert isinstance(src, grain.sources.RandomAccessDataSource)
    expected = {v.tobytes(): v for v in np.repeat(TinyMovingMnist.EXAMPLES, 3, axis=-1)}
    for record in src.__getitems__([0, 1, 2, 3]):
        video = decode_clip(record)["video"]
        assert video.shape == (20, 64, 64, 3) and video.dtype == np.uint8
        assert video.tobytes() in expected  # PNG is lossless; grey repeated to 3 channels
    np.testing.assert_array_equal(src.clip_index(), np.tile([20, 64, 64, 10], (4, 1)))

    ds = grain.MapDataset.source(src).map(decode_clip)
    element = ds[1]
    assert element["video"].shape == (20, 64, 64, 3) and element["caption"] == "digits moving"
    np.testing.assert_array_equal(element["digits"], [-1, -1])
    # what grain's worker processes get: a pickle that reopens the dataset lazily
    clone = pickle.loads(pickle.dumps(src))
    assert len(pickle.dumps(src)) < 4096 and clone[2] == src[2] and repr(clone) == repr(src)

    with pytest.raises(ValueError, match="not a feature of TFDS dataset"):
        open_tfds_source("tiny_moving_mnist", "test", str(tmp_path), video_key="nope")
    with pytest.raises(FileNotFoundError, match="not found"):
        open_tfds_source("no_such_dataset", "test", str(tmp_path))


class TinyLabelled(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """ucf101-like: a uint8 tensor video [T, H, W, 3] of varying length with a ClassLabel."""

    VERSION = tfds.core.Version("1.0.0")
    url_infos = None

    def _info(self):
        video = tfds.features.Tensor(
            shape=(None, 8, 8, 3), dtype=np.uint8, encoding=tfds.features.Encoding.ZLIB
        )
        label = tfds.features.ClassLabel(names=["ApplyEyeMakeup", "brush_hair"])
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict({"video": video, "label": label})
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        for i in range(3):
            yield i, {"video": np.full((i + 2, 8, 8, 3), 40 * i, np.uint8), "label": i % 2}


class TinyNoVideo(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    VERSION = tfds.core.Version("1.0.0")
    url_infos = None

    def _info(self):
        return tfds.core.DatasetInfo(
            builder=self, features=tfds.features.FeaturesDict({"text": tfds.features.Text(), "n": np.int32})
        )

    def _split_generators(self, dl_manager):
        return {"train": self._generate_examples()}

    def _generate_examples(self):
        yield 0, {"text": "hello", "n": 1}


def test_class_label_captions_and_variable_length(tmp_path):
    _prepare(TinyLabelled, tmp_path)
    src = open_tfds_source("tiny_labelled", "train", str(tmp_path), caption_key="label")
    clips = sorted((decode_clip(src[i]) for i in range(len(src))), key=lambda c: len(c["video"]))
    assert [c["caption"] for c in clips] == [
        "a video of apply eye makeup",
        "a video of brush hair",
        "a video of apply eye makeup",
    ]
    assert [int(c["video"][0, 0, 0, 0]) for c in clips] == [0, 40, 80]
    lengths = sorted(src.clip_index()[:, 0].tolist())
    assert lengths == [2, 3, 4] and set(src.clip_index()[:, 1:].ravel().tolist()) == {8.0, 0.0}

    _prepare(TinyNoVideo, tmp_path)
    with pytest.raises(ValueError, match="has no video feature"):
        open_tfds_source("tiny_no_video", "train", str(tmp_path))


def test_missing_tfds_says_how_to_install(monkeypatch):
    monkeypatch.setitem(sys.modules, "tensorflow_datasets", None)
    with pytest.raises(ImportError, match=r"pip install 'sora_jax\[tfds\]'"):
        tfds_source.open_tfds_source("moving_mnist", "test", None)


def test_captions_csv_and_unreadable_videos(tmp_path):
    (tmp_path / "bad.csv").write_text("file,caption\nx.mp4,hi\n")
    with pytest.raises(ValueError, match="header must name the columns 'video' and 'caption'"):
        tfds_video.read_captions(tmp_path / "bad.csv")
    (tmp_path / "split.csv").write_text("video,caption,split\nx.mp4,hi,no-dash\n")
    with pytest.raises(ValueError, match=r"split.csv:2: split must be letters, digits or '_', got 'no-dash'"):
        tfds_video.read_captions(tmp_path / "split.csv")

    _write_mp4(tmp_path / "v" / "ok.mp4", _frames(0, 6), 8)
    (tmp_path / "v" / "junk.mp4").write_bytes(b"not a video")
    (tmp_path / "c.csv").write_text("video,caption\nok.mp4,fine\njunk.mp4,junk\n")
    assert [r.split for r in tfds_video.read_captions(tmp_path / "c.csv")] == ["train", "train"]
    with pytest.raises(ValueError, match="cannot decode video .*junk.mp4"):
        tfds_video.build(tmp_path / "v", tmp_path / "c.csv", tmp_path / "d1")
    builder = tfds_video.build(
        tmp_path / "v", tmp_path / "c.csv", tmp_path / "d2", skip_unreadable=True, max_frames=4, size=(16, 24)
    )
    assert builder.info.splits["train"].num_examples == 1
    src = open_tfds_source("captioned_video", "train", str(tmp_path / "d2"))
    np.testing.assert_array_equal(src.clip_index(), [[4, 16, 24, 8]])
    assert decode_clip(src[0])["video"].shape == (4, 16, 24, 3)


def test_trainer_reads_a_tfds_dataset_through_buckets(tmp_path):
    """`data.tfds.*` in the config: the trainer trains on a prepared TFDS dataset (20x64x64 grey clips
    sampled to a 4x32x32 bucket at 5 fps from 10)."""
    import jax

    from configs import quickstart
    from sora_jax.train.loop import train

    _prepare(TinyMovingMnist, tmp_path / "tfds")
    cfg = quickstart.get_config("smoke")
    cfg.data.tfds.update(name="tiny_moving_mnist", data_dir=str(tmp_path / "tfds"), split="test")
    cfg.data.tfds.update(caption="digits moving", fps=10.0)
    cfg.data.update(buckets="4x32x32", batch_size=2, fps=5)
    cfg.train.num_steps = 3
    out = train(cfg, tmp_path / "run", progress=False, devices=jax.devices()[:1])
    assert out["compiled_steps"] == 1 and np.isfinite(out["loss"])
