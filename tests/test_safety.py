"""The safeguards where videos are written (``sora_jax/safety/stamp.py``): ``sora-jax sample`` writes MP4s and
GIFs that ``sora-jax detect`` finds watermarked with the run's payload and whose provenance record (a sidecar,
or a C2PA manifest signed with the configured key) is valid; switched off by ``--config.safety.*``; the API's
``save_video`` marks by default. The watermark and the record themselves: test_watermark.py, test_provenance.py.
"""

from __future__ import annotations

import json

import numpy as np
import pytest
from helpers import ROOT, untrained_workdir

from sora_jax import api, cli, commands
from sora_jax.config import ConfigError, load_config
from sora_jax.safety import provenance
from sora_jax.safety.stamp import Stamp, inspect_video, model_id, run_id
from sora_jax.safety.watermark import bits_to_hex, payload_bits

SMOKE = f"{ROOT}/configs/quickstart.py:smoke"
PROMPT = "a 3 moving left"


@pytest.fixture(scope="module")
def workdir(tmp_path_factory):
    """A smoke text-to-video workdir with one checkpoint at step 0 (initial weights: the marks do not depend
    on what the video shows)."""
    return untrained_workdir(tmp_path_factory.mktemp("safety") / "w")


def _payload(workdir, step: int = 0) -> str:
    return bits_to_hex(payload_bits(model_id(load_config(SMOKE)), run_id(workdir, step)))


def test_sample_writes_marked_videos_that_detect_finds(workdir, tmp_path, capsys):
    out = tmp_path / "out"
    argv = ["sample", "--workdir", str(workdir), "--prompt", PROMPT, "--out", str(out), "--steps", "2"]
    assert cli.main(argv) == 0
    assert f"(watermark {_payload(workdir)}; provenance sidecars)" in capsys.readouterr().out
    mp4, gif = sorted(out.glob("*.mp4")), sorted(out.glob("*.gif"))
    assert len(mp4) == len(gif) == 1
    assert cli.main(["detect", str(mp4[0]), str(gif[0]), "--json", "--workdir", str(workdir)]) == 0
    reports = json.loads(capsys.readouterr().out)
    for r in reports:
        assert r["watermark"]["detected"] and r["watermark"]["payload"] == _payload(workdir)
        assert r["matches"] == [0]
    prov = reports[0]["provenance"]
    assert (prov["kind"], prov["valid"], prov["trusted"]) == ("sidecar", True, False)
    facts = prov["facts"]
    assert facts["model"] == model_id(load_config(SMOKE)) and facts["sampler"]["steps"] == 2
    assert facts["checkpoint_sha256"] == provenance.checkpoint_sha256(workdir / "checkpoints" / "0")
    assert PROMPT not in json.dumps(prov) and reports[1]["provenance"] is None  # GIFs carry no record
    # one line per video without --json
    assert cli.main(["detect", str(mp4[0])]) == 0
    line = capsys.readouterr().out.strip()
    assert line.startswith(f"{mp4[0]}: watermark DETECTED") and "sidecar: valid" in line and "\n" not in line


def test_safety_overrides_switch_the_marks_off_for_one_run(workdir, tmp_path, capsys):
    out = tmp_path / "off"
    argv = ["sample", "--workdir", str(workdir), "--prompt", PROMPT, "--out", str(out), "--steps", "2"]
    off = ["--config.safety.watermark.enabled=False", "--config.safety.provenance.enabled=False"]
    assert cli.main([*argv, *off]) == 0
    assert "(no watermark; no provenance)" in capsys.readouterr().out
    [mp4] = out.glob("*.mp4")
    r = inspect_video(mp4)
    assert not r["watermark"]["detected"] and r["watermark"]["p_value"] > 1e-6
    assert r["provenance"]["kind"] == "none" and not r["provenance"]["valid"]
    with pytest.raises(SystemExit) as e:  # only the safeguards change at sampling: argparse's usage error
        cli.main([*argv, "--config.model.depth=3"])
    assert e.value.code == 2 and "--config.safety.* overrides only" in capsys.readouterr().err


def test_signed_runs_carry_a_c2pa_manifest(workdir, tmp_path):
    creds = provenance.make_test_credentials(tmp_path / "keys")
    cfg = load_config(
        SMOKE,
        [
            f"safety.provenance.cert_chain={creds.cert_chain}",
            f"safety.provenance.private_key={creds.private_key}",
        ],
    )
    stamp = Stamp.for_run(cfg, workdir, 0, steps=2)
    video = np.zeros((8, 32, 32, 3), np.uint8)  # what the digits model writes: a bright block moving on black
    for t in range(8):
        video[t, 10:18, 2 + 3 * t : 10 + 3 * t] = 230
    path = stamp.write(tmp_path / "v.mp4", video, 8, prompt=PROMPT, seed=3)
    r = inspect_video(path, trust_anchors=tmp_path / "keys" / "test_ca.pem")
    assert r["watermark"]["detected"] and r["watermark"]["payload"] == _payload(workdir)
    p = r["provenance"]
    assert (p["kind"], p["valid"], p["trusted"]) == ("c2pa", True, True)
    assert p["facts"]["sampler"]["seed"] == 3 and p["facts"]["sampler"]["height"] == 128
    assert PROMPT.encode() not in path.read_bytes()
    with pytest.raises(ConfigError, match="give both cert_chain and private_key"):
        load_config(SMOKE, [f"safety.provenance.cert_chain={creds.cert_chain}"])


def test_api_save_video_marks_unless_told_not_to(workdir, tmp_path):
    pipe = api.load_pipeline(workdir)
    video = pipe.generate([PROMPT], seed=0)[0]
    marked = api.save_video(tmp_path / "a.mp4", video, 8, pipeline=pipe, prompt=PROMPT)
    plain = api.save_video(tmp_path / "b.mp4", video, 8, mark=False)
    a, b = inspect_video(marked), inspect_video(plain)
    assert a["watermark"]["detected"] and a["provenance"]["valid"]
    assert not b["watermark"]["detected"] and b["provenance"]["kind"] == "none"


def test_checkpoint_hash_is_read_once_and_follows_changes(tmp_path, monkeypatch):
    from sora_jax.safety import stamp

    ckpt = tmp_path / "checkpoints" / "7"
    (ckpt / "params").mkdir(parents=True)
    (ckpt / "params" / "a.bin").write_bytes(b"weights")
    cache = tmp_path / stamp.HASH_CACHE
    first = stamp.checkpoint_hash(ckpt, cache)
    assert first == provenance.checkpoint_sha256(ckpt)
    monkeypatch.setattr(provenance, "checkpoint_sha256", lambda p: pytest.fail("hashed again"))
    assert stamp.checkpoint_hash(ckpt, cache) == first
    monkeypatch.undo()
    (ckpt / "params" / "a.bin").write_bytes(b"weights, changed")
    assert stamp.checkpoint_hash(ckpt, cache) == provenance.checkpoint_sha256(ckpt) != first


def test_payload_distance_counts_differing_bits():
    from sora_jax.safety.stamp import payload_distance

    assert payload_distance("c2d3-8662", "c2d3-8662") == 0
    assert (
        payload_distance("c2d3-8662", "c2d3-8762") == 1 and payload_distance("0000-0000", "ffff-0001") == 17
    )


def test_detect_bad_input_is_one_line(tmp_path, capsys):
    (tmp_path / "notes.txt").write_text("not a video")
    for path in (tmp_path / "missing.mp4", tmp_path / "notes.txt"):
        assert cli.main(["detect", str(path)]) == 2
        err = capsys.readouterr().err.strip()
        assert err.startswith("sora-jax: error:") and str(path) in err and "\n" not in err
    assert commands.detect([]) == []
