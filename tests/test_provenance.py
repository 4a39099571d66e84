"""Provenance (sora_jax/safety/provenance.py): C2PA signing and sidecar records of generated MP4s round-trip,
never hold the prompt, and fail verification once the video bytes or the recorded facts change."""

import datetime as dt
import hashlib
import json

import av
import numpy as np
import pytest
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from sora_jax.errors import UserError
from sora_jax.safety import provenance as pv
from sora_jax.sample.video_io import read_video, write_mp4

PROMPT = "a red fox jumps over a frozen lake at dawn"
STEM = "000_a_red_fox_jumps_over_a_frozen_lake_at"  # how sample.outputs names this prompt's files


@pytest.fixture(scope="module")
def video():
    """16 frames of 128x128: a bright square moving over a gradient (H.264 keeps it close, not exact)."""
    t, h, w = 16, 128, 128
    ys, xs = np.mgrid[0:h, 0:w]
    frames = np.stack([np.stack([xs * 2, ys * 2, (xs + ys + 8 * i) % 256], -1) for i in range(t)])
    frames = frames.astype(np.uint8)
    for i in range(t):
        frames[i, 40:72, 6 * i : 6 * i + 32] = 255
    return frames


@pytest.fixture(scope="module")
def creds(tmp_path_factory):
    return pv.make_test_credentials(tmp_path_factory.mktemp("creds"))


@pytest.fixture
def facts():
    sampler = dict(sampler="ddim", steps=25, cfg_scale=4.5, seed=7, frames=16, height=128, width=128, fps=8)
    return pv.GenerationFacts.from_prompt(
        PROMPT, model="DiT-S/2", model_kind="t2v", checkpoint_sha256="ab" * 32, sampler=sampler
    )


@pytest.fixture
def mp4(tmp_path, video):
    return write_mp4(tmp_path / f"{STEM}.mp4", video, fps=8)


def _flip_frame_bytes(path, index=5):
    """Inverts 16 bytes in the middle of the ``index``-th coded frame, in place (the MP4 stays decodable)."""
    with av.open(str(path)) as c:
        packets = [(p.pos, p.size) for p in c.demux(video=0) if p.size]
    pos, size = packets[index]
    data = bytearray(path.read_bytes())
    data[pos + size // 2 : pos + size // 2 + 16] = bytes(
        b ^ 0xFF for b in data[pos + size // 2 : pos + size // 2 + 16]
    )
    path.write_bytes(bytes(data))


def test_facts_hash_the_prompt_and_check_their_fields(facts):
    assert facts.prompt_sha256 == hashlib.sha256(PROMPT.encode()).hexdigest()
    assert PROMPT not in facts.to_json()
    assert facts.generator == "sora_jax" and facts.created.endswith("Z")
    assert pv.GenerationFacts.from_dict(json.loads(facts.to_json())) == facts
    fields = facts.to_dict()
    with pytest.raises(ValueError, match="lack.*steps"):
        pv.GenerationFacts(**fields | {"sampler": {k: v for k, v in facts.sampler.items() if k != "steps"}})
    with pytest.raises(ValueError, match="prompt text"):
        pv.GenerationFacts(**fields | {"sampler": facts.sampler | {"prompt": PROMPT}})
    with pytest.raises(ValueError, match="UTC"):
        pv.GenerationFacts(**fields | {"created": "2026-11-30T10:40:00+01:00"})
    with pytest.raises(ValueError, match="prompt_sha256"):
        pv.GenerationFacts(**fields | {"prompt_sha256": PROMPT})


def test_checkpoint_sha256_follows_the_bytes_not_the_location(tmp_path):
    for root in (tmp_path / "a", tmp_path / "b"):
        (root / "state").mkdir(parents=True)
        (root / "state" / "w.bin").write_bytes(b"weights")
        (root / "meta.json").write_text("{}")
    a, b = pv.checkpoint_sha256(tmp_path / "a"), pv.checkpoint_sha256(tmp_path / "b")
    assert (
        a == b
        and pv.GenerationFacts.from_prompt(
            "x", model="m", model_kind="t2v", checkpoint_sha256=a, sampler=dict.fromkeys(pv.SAMPLER_KEYS, 1)
        ).checkpoint_sha256
        == a
    )
    (tmp_path / "b" / "state" / "w.bin").write_bytes(b"weightz")
    assert pv.checkpoint_sha256(tmp_path / "b") != a
    assert pv.checkpoint_sha256(tmp_path / "a" / "meta.json") == hashlib.sha256(b"{}").hexdigest()
    with pytest.raises(pv.ProvenanceError, match="no checkpoint"):
        pv.checkpoint_sha256(tmp_path / "c")


@pytest.mark.parametrize("algorithm", [pv.SigningAlgorithm.ES256, pv.SigningAlgorithm.ED25519])
def test_signed_mp4_verifies_and_holds_no_prompt(tmp_path, mp4, facts, algorithm):
    creds = pv.make_test_credentials(tmp_path / "creds", algorithm)
    before = read_video(mp4)
    assert pv.verify(mp4).kind == "none" and not pv.verify(mp4).valid
    assert pv.record(mp4, facts, creds) == mp4
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["creds", mp4.name])  # no .tmp, no sidecar

    report = pv.verify(mp4)
    assert (report.kind, report.valid, report.trusted, report.problems) == ("c2pa", True, False, [])
    assert report.validation_state == "Valid" and "sora_jax test signer" in report.signer
    assert pv.GenerationFacts.from_dict(report.facts) == facts
    assert "untrusted signer" in report.summary()
    trusted = pv.verify(mp4, trust_anchors=creds.cert_chain.parent / pv.TEST_CA)
    assert (trusted.valid, trusted.trusted, trusted.validation_state) == (True, True, "Trusted")

    data = mp4.read_bytes()
    assert facts.prompt_sha256.encode() in data and b"trainedAlgorithmicMedia" in data
    for secret in (PROMPT, PROMPT.upper(), STEM, "red fox"):
        assert secret.encode() not in data
    np.testing.assert_array_equal(read_video(mp4), before)  # the frames survive signing bit for bit


def test_changed_frame_fails_c2pa(mp4, facts, creds, video):
    pv.sign_mp4(mp4, facts, creds)
    signed = read_video(mp4)
    _flip_frame_bytes(mp4)
    changed = np.abs(read_video(mp4).astype(int) - signed).reshape(len(signed), -1).max(1)
    assert (changed > 0).any()  # the tamper really changed the picture

    for anchors in (None, creds.cert_chain.parent / pv.TEST_CA):
        report = pv.verify(mp4, trust_anchors=anchors)
        assert (report.kind, report.valid, report.trusted) == ("c2pa", False, False)
        assert any(p.startswith("assertion.bmffHash.mismatch") for p in report.problems), report.problems
        assert report.validation_state == "Invalid" and "INVALID" in report.summary()

    # one frame changed and re-encoded: the manifest does not survive, so no record remains
    edited = signed.copy()
    edited[3] = 255 - edited[3]
    write_mp4(mp4, edited, fps=8)
    assert (pv.verify(mp4).kind, pv.verify(mp4).valid) == ("none", False)


def test_edited_facts_fail_c2pa(mp4, facts, creds):
    pv.sign_mp4(mp4, facts, creds)
    forged = "cd" * 32
    data = mp4.read_bytes()
    assert data.count(facts.prompt_sha256.encode()) == 1
    mp4.write_bytes(data.replace(facts.prompt_sha256.encode(), forged.encode()))
    report = pv.verify(mp4)
    assert not report.valid and any("mismatch" in p for p in report.problems), report.problems


def test_sidecar_round_trip_and_tamper(mp4, facts):
    side = pv.record(mp4, facts, None)
    assert side == pv.sidecar_path(mp4) and side.name == f"{STEM}.mp4.provenance.json"
    assert PROMPT not in side.read_text() and json.loads(side.read_text())["facts"] == facts.to_dict()
    report = pv.verify(mp4)
    assert (report.kind, report.valid, report.trusted, report.problems) == ("sidecar", True, False, [])
    assert pv.GenerationFacts.from_dict(report.facts) == facts

    _flip_frame_bytes(mp4)
    report = pv.verify(mp4)
    assert (report.kind, report.valid) == ("sidecar", False)
    assert report.problems == [f"video sha256 mismatch: the MP4 changed after {side.name} was written"]

    side.write_text("{not json")
    report = pv.verify(mp4)
    assert not report.valid and report.problems[0].startswith("unreadable sidecar")


def test_signing_config_errors_are_one_line(tmp_path, creds):
    other = pv.make_test_credentials(tmp_path / "other")
    cases = [
        (dict(private_key=tmp_path / "missing.pem"), "cannot read the signing private key"),
        (dict(cert_chain=tmp_path), "cannot read the signing certificate chain"),
        (dict(private_key=other.private_key), "does not belong to the first certificate"),
        (dict(algorithm="ed25519"), "cannot sign ED25519"),
        (dict(algorithm="rsa"), "unknown signing algorithm"),
    ]
    (tmp_path / "garbage.pem").write_text("not a certificate")
    cases.append((dict(cert_chain=tmp_path / "garbage.pem"), "holds no PEM certificate"))
    base = dict(cert_chain=creds.cert_chain, private_key=creds.private_key)
    for change, message in cases:
        with pytest.raises(pv.ProvenanceError, match=message) as err:
            pv.SigningConfig(**base | change)
        assert isinstance(err.value, UserError) and "\n" not in str(err.value)
    with pytest.raises(pv.ProvenanceError, match="no video file"):
        pv.sign_mp4(tmp_path / "missing.mp4", None, creds)


def test_refused_certificate_leaves_the_mp4_untouched(tmp_path, mp4, facts):
    """A self-signed certificate without key usages passes the file checks but c2pa refuses to sign with it."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, "self")])
    now = dt.datetime.now(dt.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(1)
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=1))
        .sign(key, hashes.SHA256())
    )
    pem = serialization.Encoding.PEM
    (tmp_path / "self.pem").write_bytes(cert.public_bytes(pem))
    (tmp_path / "self_key.pem").write_bytes(
        key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption())
    )
    signing = pv.SigningConfig(tmp_path / "self.pem", tmp_path / "self_key.pem")
    before = mp4.read_bytes()
    with pytest.raises(pv.ProvenanceError, match="cannot sign .* extended key usage"):
        pv.sign_mp4(mp4, facts, signing)
    assert mp4.read_bytes() == before
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted([mp4.name, "self.pem", "self_key.pem"])
