"""Data cards (``sora_jax.data.datacard``): ingest's card counts what was ingested per license, source and split;
``--require_license`` refuses before any work; the moving-digits card holds the generator's labels; every
checkpoint, ``sora-jax checkpoints``, ``api.list_checkpoints`` and an export carry the card's hash."""

import collections
import csv
import json
import shutil

import jax
import numpy as np
import pytest
from test_ingest import source_frames, write_video

from configs import quickstart
from sora_jax import api
from sora_jax.cli import main as cli_main
from sora_jax.config import load_config
from sora_jax.data import datacard, ingest, moving_digits
from sora_jax.data.pipeline import open_source
from sora_jax.data.records import read_record
from sora_jax.train.loop import train

CLIP_SECONDS, MIN_FRAMES = 1.0, 8
# video: (frames, H, W, fps)
VIDEOS = {"a.mp4": (40, 32, 48, 24), "b.mp4": (30, 32, 32, 12), "c.mp4": (20, 32, 32, 16)}
ROWS = [  # video, caption, split, license, source
    ("a.mp4", "a wave drifts left", "train", "CC-BY-4.0", "camera A"),
    ("b.mp4", "waves, slowly to the right", "train", "CC0-1.0", "camera B"),
    ("c.mp4", "a short wave", "test", "CC-BY-4.0", ""),  # no source
    ("b.mp4", "b again, as a test clip", "test", "CC0-1.0", "camera B"),
]


def expected_clip_seconds(video: str) -> list[float]:
    """Seconds of each clip ingest cuts from ``video`` (whole video, consecutive pieces, short tail dropped)."""
    n, _, _, fps = VIDEOS[video]
    per = int(round(CLIP_SECONDS * fps))
    pieces = [min(per, n - s) for s in range(0, n, per)]
    return [p / fps for p in pieces if p >= MIN_FRAMES]


def write_inputs(root, rows, name="captions.csv"):
    for video, (n, h, w, fps) in VIDEOS.items():
        if not (root / "videos" / video).exists():
            write_video(root / "videos" / video, source_frames(n, h, w), fps)
    path = root / name
    with open(path, "w", newline="") as f:
        out = csv.writer(f)
        out.writerow(["video", "caption", "split", "license", "source"])
        out.writerows(rows)
    return path


def test_ingest_card_counts_what_was_ingested(tmp_path):
    captions = write_inputs(tmp_path, ROWS)
    out = tmp_path / "data"
    report = ingest.ingest(
        tmp_path / "videos",
        captions,
        out,
        clip_seconds=CLIP_SECONDS,
        min_frames=MIN_FRAMES,
        max_short_side=32,
        workers=1,
        progress=False,
        require_license=True,
    )
    card = json.loads((out / "datacard.json").read_text())
    assert card["hash"] == datacard.card_hash(card) == report["datacard"]["hash"]
    assert (out / "datacard.md").read_text().count(card["hash"]) == 1

    # the expectation, from the inputs alone
    clips = collections.defaultdict(lambda: collections.defaultdict(float))  # (what, key) -> split -> clips
    hours = collections.defaultdict(float)
    captions_of = collections.defaultdict(list)
    for video, caption, split, lic, src in ROWS:
        secs = expected_clip_seconds(video)
        for what, key in (("license", lic), ("source", src or datacard.UNSPECIFIED), ("split", split)):
            clips[what, key][split] += len(secs)
            hours[what, key] += sum(secs) / 3600
        captions_of[split] += [caption] * len(secs)
    total = sum(len(expected_clip_seconds(r[0])) for r in ROWS)
    assert card["totals"]["clips"] == report["clips"] == total == 7
    for what, field in (("license", "by_license"), ("source", "by_source")):
        got = card[field]
        keys = {k for (w, k) in clips if w == what}
        assert set(got) == keys
        for k in keys:
            assert got[k]["clips"] == sum(clips[what, k].values())
            assert got[k]["splits"] == {s: n for s, n in clips[what, k].items()}
            assert got[k]["hours"] == pytest.approx(hours[what, k], abs=1e-6)
    for split in ("train", "test"):
        s = card["splits"][split]
        assert s["clips"] == sum(clips["split", split].values())
        assert s["hours"] == pytest.approx(hours["split", split], abs=1e-6)
        n_words = [len(c.replace(",", " ").split()) for c in captions_of[split]]
        w = s["captions"]["words"]
        assert (w["min"], w["max"]) == (min(n_words), max(n_words))
        assert w["mean"] == pytest.approx(np.mean(n_words), abs=1e-4)
        assert sum(w["histogram"]["counts"]) == len(n_words)
    vocab = collections.Counter(
        w for cs in captions_of.values() for c in cs for w in c.replace(",", " ").lower().split()
    )
    assert card["captions"]["vocabulary"]["size"] == len(vocab)
    top = sorted(vocab.items(), key=lambda kv: (-kv[1], kv[0]))[: datacard.TOP_WORDS]
    assert card["captions"]["vocabulary"]["top"] == [list(kv) for kv in top]
    assert top[:2] == [("a", 5), ("wave", 3)]
    assert "7 clips" in card["summary"] and "CC-BY-4.0" in card["summary"]

    # per clip: the record headers and the provenance codes agree with the rows
    meta = json.loads((out / "metadata.json").read_text())
    for split in ("train", "test"):
        p = meta["splits"][split]["provenance"]
        codes = np.load(out / p["file"])
        src = open_source(out, split)
        headers = [read_record(src[i])[0] for i in range(len(src))]
        assert codes.shape == (len(headers), 2)
        for h, (li, si) in zip(headers, codes):
            row = next(r for r in ROWS if r[0] == h["source"] and r[1] == h["caption"])
            assert h["license"] == row[3] == p["license"][li]
            assert h.get("data_source") == (row[4] or None) == (p["source"][si] if si >= 0 else None)


def test_require_license_refuses_before_any_work(tmp_path, capsys):
    rows = [*ROWS[:2], ("c.mp4", "no license here", "train", "", "camera C")]
    captions = write_inputs(tmp_path, rows)
    out = tmp_path / "data"
    argv = ["ingest", "--videos", str(tmp_path / "videos"), "--captions", str(captions), "--out", str(out)]
    assert cli_main([*argv, "--require_license", "--no_progress"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "1 of 3 rows" in err[0] and "'c.mp4'" in err[0] and "license" in err[0]
    assert not out.exists()


@pytest.mark.parametrize("split", moving_digits.SPLITS)
def test_moving_digits_card_holds_the_generators_labels(data_dir, split):
    card = datacard.read_card(data_dir)  # checks the hash against the content
    meta = json.loads((data_dir / "metadata.json").read_text())
    p = meta["params"]
    size = {"train": p["num_train"], "test": p["num_test"]}[split]
    gen = moving_digits.generate(
        split, size, seed=p["seed"], num_frames=p["num_frames"], height=p["height"], width=p["width"]
    )
    present = gen["digits"] >= 0
    labels = card["labels"][split]
    assert labels["digits"] == {str(d): int((gen["digits"][present] == d).sum()) for d in range(10)}
    want_dir = {
        n: int((gen["directions"][present] == k).sum()) for k, n in enumerate(moving_digits.DIRECTIONS)
    }
    assert labels["directions"] == want_dir
    assert labels["objects_per_clip"] == {str(k): int((present.sum(1) == k).sum()) for k in (1, 2)}
    # the captions say the same: parse_prompt reads back every (digit, direction)
    parsed = collections.Counter(pair for c in gen["captions"] for pair in moving_digits.parse_prompt(c))
    assert sum(parsed.values()) == int(present.sum())
    assert {str(d): sum(n for (dd, _), n in parsed.items() if dd == d) for d in range(10)} == labels["digits"]
    s = card["splits"][split]
    assert s["clips"] == size and s["by_license"] == {
        moving_digits.LICENSE: {"clips": size, "hours": round(size * p["num_frames"] / p["fps"] / 3600, 6)}
    }
    assert list(card["by_source"]) == [moving_digits.SOURCE]


def test_cards_of_old_builds_and_latents(data_dir, tmp_path):
    old = tmp_path / "old"
    shutil.copytree(data_dir, old)
    want = json.loads((old / "datacard.json").read_text())
    (old / "datacard.json").unlink()  # a build from before data cards: the next build() call writes it
    meta = json.loads((old / "metadata.json").read_text())
    p = {k: v for k, v in meta["params"].items() if k not in ("interpolation", "speed", "digit_size")}
    moving_digits.build(old, **p, progress=False)
    assert datacard.read_card(old) == want
    latents = tmp_path / "latents"  # a latent dataset without its own card: its source's
    latents.mkdir()
    (latents / "metadata.json").write_text(json.dumps({"source": str(old), "splits": {}}))
    assert datacard.find_card(latents)["hash"] == want["hash"]
    (old / "datacard.json").write_text(json.dumps(want | {"summary": "edited"}))
    with pytest.raises(datacard.UserError, match="not an intact"):
        datacard.find_card(latents)


def test_checkpoints_and_exports_carry_the_card(data_dir, tmp_path, capsys):
    card = datacard.read_card(data_dir)
    cfg = load_config(
        f"{quickstart.__file__}:smoke",
        [
            f"--config.data.path={data_dir}",
            "--config.mesh.data=1",
            "--config.train.num_steps=2",
            "--config.train.ckpt_every=1",
            "--config.train.log_every=1",
        ],
    )
    work = tmp_path / "w"
    train(cfg, work, progress=False, devices=jax.devices()[:1])
    rows = api.list_checkpoints(work)
    assert [r["step"] for r in rows] == [1, 2]
    assert all(r["datacard"] == datacard.reference(card) for r in rows)

    shutil.rmtree(work / "checkpoints" / "1" / "datacard")  # as a checkpoint from before data cards
    assert api.list_checkpoints(work)[0]["datacard"] is None
    assert cli_main(["checkpoints", "--workdir", str(work)]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert lines[2].split() == ["no", "data", "card"]
    assert lines[4].split()[:3] == ["data", "card", card["hash"][:12] + ":"]
    assert card["summary"] in lines[4]

    from sora_jax.export.writer import export

    out = tmp_path / "export"
    export(work, out)
    assert json.loads((out / "datacard.json").read_text()) == card
    (data_dir / "datacard.json").rename(tmp_path / "moved.json")  # the dataset's card gone: the reference
    try:
        export(work, tmp_path / "export2")
    finally:
        (tmp_path / "moved.json").rename(data_dir / "datacard.json")
    assert json.loads((tmp_path / "export2" / "datacard.json").read_text()) == datacard.reference(card)


def test_latent_dataset_carries_its_sources_card(data_dir, tmp_path, monkeypatch):
    from data_pipelines import encode_latents

    class Codec:  # a stand-in VAE: the card copy does not depend on what the latents are
        params: dict = {}

        def with_params(self, params):
            return self

        def encode(self, x):  # [B, T, H, W, 3] -> [B, T, H/4, W/4, 1]
            return x[:, :, ::4, ::4, :1]

    monkeypatch.setattr(encode_latents, "load_codec", lambda vae: (Codec(), 0, "vae"))
    out = encode_latents.encode_dataset("vae", data_dir, tmp_path / "lat", batch_size=16, progress=False)
    assert (out / "datacard.json").read_text() == (data_dir / "datacard.json").read_text()
    assert datacard.find_card(out) == datacard.read_card(data_dir)
