"""Provenance of generated videos: a signed C2PA manifest in each MP4, or a sidecar JSON when signing is off.

Owns the facts recorded about a generation (``GenerationFacts``), the signing credentials
(``SigningConfig``), embedding and checking the record (``sign_mp4``, ``write_sidecar``, ``verify``) and a
self-signed test pair (``make_test_credentials``). The sampler, the config and ``sora-jax detect`` call it;
it never sees the model or the prompt text.

What a record states: the generator (``sora_jax`` and its version), the model (name and kind) and the
checkpoint's sha256, the sampler settings (sampler, steps, cfg scale, seed, frames x height x width, fps), the
creation time (ISO 8601, UTC) and the sha256 of the prompt's UTF-8 bytes. The prompt text itself is never
written (nor the file name, which ``sample.outputs`` derives from the prompt).

Signed (C2PA, via ``c2pa-python``): the manifest carries the standard ``c2pa.actions`` assertion
(``c2pa.created``, digitalSourceType ``trainedAlgorithmicMedia``) and the facts in a custom
``org.sora_jax.generation`` assertion; c2pa's BMFF hash binds it to every byte of the MP4 outside the
manifest box, so a changed frame fails verification (``assertion.bmffHash.mismatch``). A valid signature from
a certificate outside the trust anchors is reported as ``trusted=False``, separately from tampering
(``valid=False``).

Unsigned (sidecar ``<video>.mp4.provenance.json``): the same facts and the sha256 of the MP4 bytes. It
detects any change to the MP4 but proves nothing about who wrote it (anyone can rewrite the sidecar), so it
is never trusted.

Writes are atomic: ``<path>.tmp`` in the same folder, then ``os.replace``.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import enum
import hashlib
import json
import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any, Literal

from sora_jax import __version__
from sora_jax.errors import PATH_ERRORS, UserError
from sora_jax.sample.video_io import atomic_target

__all__ = [
    "GENERATION_LABEL",
    "SAMPLER_KEYS",
    "GenerationFacts",
    "ProvenanceError",
    "ProvenanceReport",
    "SigningAlgorithm",
    "SigningConfig",
    "checkpoint_sha256",
    "make_test_credentials",
    "record",
    "sidecar_path",
    "sign_mp4",
    "verify",
    "write_sidecar",
]

GENERATION_LABEL = "org.sora_jax.generation"  # the custom C2PA assertion holding the facts
SIDECAR_FORMAT = "org.sora_jax.provenance/1"
SIDECAR_SUFFIX = ".provenance.json"
TRAINED_ALGORITHMIC_MEDIA = "http://cv.iptc.org/newscodes/digitalsourcetype/trainedAlgorithmicMedia"
# sampler settings every record states; more keys may follow
SAMPLER_KEYS = ("sampler", "steps", "cfg_scale", "seed", "frames", "height", "width", "fps")
# keys that would carry prompt text: refused in the sampler settings
_PROMPT_KEYS = {"prompt", "prompts", "negative_prompt", "caption", "text"}
_UNTRUSTED = "signingCredential.untrusted"
_SHA256_HEX = re.compile(r"[0-9a-f]{64}")


class ProvenanceError(UserError):
    """Signing credentials or a video the user named cannot be used; one line saying what to do."""


def _utc_now() -> str:
    return dt.datetime.now(dt.UTC).replace(microsecond=0).isoformat().replace("+00:00", "Z")


def _check_sha256(value: str, name: str) -> None:
    if not isinstance(value, str) or not _SHA256_HEX.fullmatch(value):
        raise ValueError(f"{name} must be 64 lowercase hex digits (a sha256), got {value!r}")


@dataclasses.dataclass(frozen=True)
class GenerationFacts:
    """What a provenance record states about one generated video (never the prompt text).

    sampler: JSON-serialisable settings with at least ``SAMPLER_KEYS``; created: ISO 8601 in UTC
    (``2026-11-30T10:40:00Z``); checkpoint_sha256: ``checkpoint_sha256(path)`` or None for random weights.
    """

    model: str
    model_kind: str
    checkpoint_sha256: str | None
    sampler: Mapping[str, Any]
    created: str
    prompt_sha256: str
    generator: str = "sora_jax"
    generator_version: str = __version__

    def __post_init__(self):
        _check_sha256(self.prompt_sha256, "prompt_sha256")
        if self.checkpoint_sha256 is not None:
            _check_sha256(self.checkpoint_sha256, "checkpoint_sha256")
        missing = [k for k in SAMPLER_KEYS if k not in self.sampler]
        if missing:
            raise ValueError(
                f"sampler settings lack {missing}; a provenance record states all of {SAMPLER_KEYS}"
            )
        leaked = _PROMPT_KEYS & set(self.sampler)
        if leaked:
            raise ValueError(f"sampler settings must not carry prompt text: drop {sorted(leaked)}")
        json.dumps(dict(self.sampler))  # raises TypeError on a value JSON cannot hold
        when = dt.datetime.fromisoformat(self.created)
        if when.utcoffset() != dt.timedelta(0):
            raise ValueError(f"created must be in UTC (ending in Z or +00:00), got {self.created!r}")
        object.__setattr__(self, "sampler", dict(self.sampler))

    @classmethod
    def from_prompt(
        cls,
        prompt: str,
        *,
        model: str,
        model_kind: str,
        checkpoint_sha256: str | None,
        sampler: Mapping[str, Any],
        created: str | None = None,
    ) -> GenerationFacts:
        """The facts of a video made from ``prompt``: keeps the sha256 of its UTF-8 bytes, drops the text;
        ``created`` defaults to now (UTC, whole seconds)."""
        return cls(
            model=model,
            model_kind=model_kind,
            checkpoint_sha256=checkpoint_sha256,
            sampler=sampler,
            created=created or _utc_now(),
            prompt_sha256=hashlib.sha256(prompt.encode("utf-8")).hexdigest(),
        )

    @classmethod
    def from_dict(cls, data: Mapping[str, Any]) -> GenerationFacts:
        """Inverse of ``to_dict``; raises ValueError naming unknown or missing keys."""
        names = {f.name for f in dataclasses.fields(cls)}
        unknown = set(data) - names
        if unknown:
            raise ValueError(f"unknown generation fact keys {sorted(unknown)}")
        try:
            return cls(**data)
        except TypeError as e:  # a missing required field
            raise ValueError(f"invalid generation facts: {e}") from e

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self) | {"sampler": dict(self.sampler)}

    def to_json(self) -> str:
        """The facts as one JSON object with sorted keys (stable bytes for the same facts)."""
        return json.dumps(self.to_dict(), sort_keys=True)


def _sha256_file(path: Path, digest: Any = None) -> Any:
    """``digest`` (a new sha256 when None) updated with the bytes of ``path``."""
    digest = digest or hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 20), b""):
            digest.update(block)
    return digest


def checkpoint_sha256(path: str | os.PathLike) -> str:
    """sha256 of a checkpoint: of the file's bytes, or for a folder (orbax) of every file's relative path and
    bytes in sorted order, so the same checkpoint copied elsewhere hashes the same."""
    path = Path(path)
    if path.is_file():
        return _sha256_file(path).hexdigest()
    if not path.is_dir():
        raise ProvenanceError(f"no checkpoint at {path}; pass the checkpoint file or folder that was sampled")
    digest = hashlib.sha256()
    for f in sorted(p for p in path.rglob("*") if p.is_file()):
        digest.update(f.relative_to(path).as_posix().encode() + b"\0")
        _sha256_file(f, digest)
    return digest.hexdigest()


# ------------------------------------------------------------------------------------------------ signing


class SigningAlgorithm(enum.StrEnum):
    """C2PA signature algorithms; the private key's type must match (EC P-256/384/521, RSA, Ed25519)."""

    ES256 = "es256"
    ES384 = "es384"
    ES512 = "es512"
    PS256 = "ps256"
    PS384 = "ps384"
    PS512 = "ps512"
    ED25519 = "ed25519"


_CURVES = {
    SigningAlgorithm.ES256: "secp256r1",
    SigningAlgorithm.ES384: "secp384r1",
    SigningAlgorithm.ES512: "secp521r1",
}


def _key_matches(key, algorithm: SigningAlgorithm) -> bool:
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519, rsa

    if algorithm in _CURVES:
        return isinstance(key, ec.EllipticCurvePrivateKey) and key.curve.name == _CURVES[algorithm]
    if algorithm is SigningAlgorithm.ED25519:
        return isinstance(key, ed25519.Ed25519PrivateKey)
    return isinstance(key, rsa.RSAPrivateKey)


_SIGNING_FIX = "set it to a readable PEM file, or turn signing off to write sidecar JSON"


def _read_pem(path: Path, what: str, fix: str = _SIGNING_FIX) -> bytes:
    try:
        return path.read_bytes()
    except PATH_ERRORS as e:
        raise ProvenanceError(f"cannot read the {what} {path} ({e.strerror or e}); {fix}") from e


@dataclasses.dataclass(frozen=True)
class SigningConfig:
    """Credentials for C2PA signing, checked when made (one-line ``ProvenanceError``).

    cert_chain: PEM certificates, the signing (leaf) certificate first, then intermediates; the leaf needs
    the digitalSignature key usage and an extended key usage C2PA accepts (emailProtection, documentSigning,
    ...). private_key: the leaf's unencrypted PEM (PKCS#8) key. tsa_url: an RFC 3161 timestamp authority,
    None (default) for no timestamp, since sampling hosts are often offline.
    """

    cert_chain: Path
    private_key: Path
    algorithm: SigningAlgorithm = SigningAlgorithm.ES256
    tsa_url: str | None = None

    def __post_init__(self):
        from cryptography import x509
        from cryptography.hazmat.primitives import serialization

        object.__setattr__(self, "cert_chain", Path(self.cert_chain))
        object.__setattr__(self, "private_key", Path(self.private_key))
        try:
            object.__setattr__(self, "algorithm", SigningAlgorithm(str(self.algorithm).lower()))
        except ValueError:
            names = ", ".join(a.name for a in SigningAlgorithm)
            raise ProvenanceError(
                f"unknown signing algorithm {self.algorithm!r}; use one of {names}"
            ) from None
        try:
            certs = x509.load_pem_x509_certificates(_read_pem(self.cert_chain, "signing certificate chain"))
        except ValueError as e:
            raise ProvenanceError(
                f"{self.cert_chain} holds no PEM certificate ({e}); give the PEM chain"
            ) from e
        try:
            key = serialization.load_pem_private_key(
                _read_pem(self.private_key, "signing private key"), password=None
            )
        except (ValueError, TypeError) as e:  # TypeError: the key is encrypted
            raise ProvenanceError(
                f"{self.private_key} is not an unencrypted PEM private key ({e}); give the key without a password"
            ) from e
        if not _key_matches(key, self.algorithm):
            raise ProvenanceError(
                f"{self.private_key} is a {type(key).__name__.lstrip('_')}, which cannot sign "
                f"{self.algorithm.name}; set the algorithm that matches the key"
            )
        if certs[0].public_key() != key.public_key():
            raise ProvenanceError(
                f"{self.private_key} does not belong to the first certificate of {self.cert_chain}; "
                "put the signing certificate first"
            )
        now = dt.datetime.now(dt.UTC)
        if not certs[0].not_valid_before_utc <= now <= certs[0].not_valid_after_utc:
            raise ProvenanceError(
                f"the signing certificate in {self.cert_chain} is valid only from "
                f"{certs[0].not_valid_before_utc:%Y-%m-%d} to {certs[0].not_valid_after_utc:%Y-%m-%d}; renew it"
            )


def _manifest(facts: GenerationFacts) -> dict[str, Any]:
    agent = {"name": facts.generator, "version": facts.generator_version}
    created = {
        "action": "c2pa.created",
        "when": facts.created,
        "softwareAgent": agent,
        "digitalSourceType": TRAINED_ALGORITHMIC_MEDIA,
    }
    return {
        "claim_generator_info": [agent],
        "title": "sora_jax generated video",  # not the file name: sample.outputs names files after the prompt
        "format": "video/mp4",
        "assertions": [
            {"label": "c2pa.actions", "data": {"actions": [created]}},
            {"label": GENERATION_LABEL, "data": facts.to_dict()},
        ],
    }


def _existing_mp4(path: str | os.PathLike) -> Path:
    path = Path(path)
    if not path.is_file():
        raise ProvenanceError(f"no video file at {path}")
    if path.suffix.lower() != ".mp4":
        raise ProvenanceError(f"{path} is not an .mp4; provenance is recorded for MP4 videos only")
    return path


def sign_mp4(path: str | os.PathLike, facts: GenerationFacts, signing: SigningConfig) -> Path:
    """Embeds a C2PA manifest with ``facts`` into the MP4 at ``path``, signed with ``signing``; atomic.

    Raises ProvenanceError when c2pa refuses the credentials (e.g. a certificate without a usable extended key
    usage); the MP4 is then left untouched.
    """
    import c2pa

    path = _existing_mp4(path)
    alg = c2pa.C2paSigningAlg[signing.algorithm.name]
    info = c2pa.C2paSignerInfo(
        alg, signing.cert_chain.read_bytes(), signing.private_key.read_bytes(), signing.tsa_url
    )
    try:
        with (
            c2pa.Signer.from_info(info) as signer,
            c2pa.Builder(_manifest(facts)) as builder,
            atomic_target(path) as tmp,
            open(path, "rb") as src,
            open(tmp, "w+b") as dst,
        ):
            builder.sign(signer, "video/mp4", src, dst)
    except c2pa.C2paError as e:
        raise ProvenanceError(
            f"cannot sign {path} with {signing.cert_chain}: {e}; C2PA needs a CA-issued signing certificate "
            "with the digitalSignature key usage and an extended key usage such as emailProtection"
        ) from e
    return path


def sidecar_path(path: str | os.PathLike) -> Path:
    """``<video>.mp4.provenance.json`` beside the video."""
    path = Path(path)
    return path.with_name(path.name + SIDECAR_SUFFIX)


def write_sidecar(path: str | os.PathLike, facts: GenerationFacts) -> Path:
    """Writes ``<path>.provenance.json``: the facts and the sha256 of the MP4's bytes; returns its path."""
    path = _existing_mp4(path)
    payload = {
        "format": SIDECAR_FORMAT,
        "video_sha256": _sha256_file(path).hexdigest(),
        "facts": facts.to_dict(),
    }
    out = sidecar_path(path)
    with atomic_target(out) as tmp:
        tmp.write_text(json.dumps(payload, indent=2, sort_keys=True) + "\n")
    return out


def record(path: str | os.PathLike, facts: GenerationFacts, signing: SigningConfig | None) -> Path:
    """The sampler's one call: signs the MP4 when ``signing`` is set, else writes the sidecar.
    Returns the file that now holds the record (the MP4 or the sidecar)."""
    return sign_mp4(path, facts, signing) if signing is not None else write_sidecar(path, facts)


# ------------------------------------------------------------------------------------------------ verifying


@dataclasses.dataclass(frozen=True)
class ProvenanceReport:
    """What ``verify`` found.

    kind: where the record was ("c2pa" manifest, "sidecar" JSON, or "none"). valid: the record is intact and
    matches the video bytes (False when tampered, unreadable or absent). trusted: the C2PA signer chains to a
    trust anchor (a valid signature from an unknown signer is valid but untrusted; a sidecar never is).
    facts: the recorded ``GenerationFacts.to_dict()``, or None. problems: why it is not valid (C2PA status
    codes with their explanation). signer: the signing certificate's common name and issuer.
    """

    kind: Literal["c2pa", "sidecar", "none"]
    valid: bool
    trusted: bool
    facts: dict[str, Any] | None
    problems: list[str]
    signer: str | None = None
    validation_state: str | None = None  # c2pa's: "Invalid", "Valid" or "Trusted"

    def summary(self) -> str:
        """One line for ``sora-jax detect``."""
        if self.kind == "none":
            return "no provenance: " + "; ".join(self.problems)
        if not self.valid:
            return f"{self.kind}: INVALID (tampered or corrupt): " + "; ".join(self.problems)
        if self.kind == "sidecar":
            return "sidecar: valid (unsigned: matches the video bytes, proves no author)"
        trust = "trusted signer" if self.trusted else "untrusted signer (not in the trust anchors)"
        return f"c2pa: valid, {trust} {self.signer}"


def _c2pa_context(trust_anchors: str | os.PathLike | None):
    import c2pa

    if trust_anchors is None:
        return None
    pem = _read_pem(Path(trust_anchors), "trust anchors", "give a PEM file of trusted root certificates")
    return c2pa.Context(c2pa.Settings.from_dict({"trust": {"trust_anchors": pem.decode()}}))


def _verify_c2pa(path: Path, trust_anchors) -> ProvenanceReport | None:
    """The report on the MP4's embedded manifest, or None when it has none."""
    import c2pa

    context = _c2pa_context(trust_anchors)
    try:
        with open(path, "rb") as f:
            reader = c2pa.Reader.try_create("video/mp4", f, context=context)
            if reader is None:
                return None
            with reader:
                state = reader.get_validation_state()
                results = reader.get_validation_results() or {}
                manifest = reader.get_active_manifest() or {}
    except c2pa.C2paError as e:
        return ProvenanceReport("c2pa", False, False, None, [f"unreadable C2PA data: {e}"])
    failures = (results.get("activeManifest") or {}).get("failure", [])
    problems = [f"{f['code']}: {f.get('explanation', '')}" for f in failures if f["code"] != _UNTRUSTED]
    valid = state in ("Valid", "Trusted") and not problems
    if not valid and not problems:
        problems = [f"validation state {state}"]
    facts = next(
        (a["data"] for a in manifest.get("assertions", []) if a.get("label") == GENERATION_LABEL), None
    )
    try:
        facts = GenerationFacts.from_dict(facts).to_dict() if facts is not None else None
    except (ValueError, TypeError) as e:
        problems.append(f"malformed {GENERATION_LABEL} assertion: {e}")
        facts, valid = None, False
    if facts is None and valid:
        problems.append(f"no {GENERATION_LABEL} assertion: not a sora_jax record")
        valid = False
    info = manifest.get("signature_info") or {}
    signer = f"{info.get('common_name', '?')!r} (issuer {info.get('issuer', '?')!r})" if info else None
    return ProvenanceReport("c2pa", valid, valid and state == "Trusted", facts, problems, signer, state)


def _verify_sidecar(path: Path, side: Path) -> ProvenanceReport:
    try:
        data = json.loads(side.read_text())
        if not isinstance(data, dict) or data.get("format") != SIDECAR_FORMAT:
            raise ValueError(f"not a {SIDECAR_FORMAT} record")
        facts = GenerationFacts.from_dict(data["facts"]).to_dict()
        expected = data["video_sha256"]
    except (ValueError, KeyError) as e:  # JSONDecodeError is a ValueError; from_dict raises ValueError
        return ProvenanceReport("sidecar", False, False, None, [f"unreadable sidecar {side.name}: {e!r}"])
    actual = _sha256_file(path).hexdigest()
    if actual != expected:
        problem = f"video sha256 mismatch: the MP4 changed after {side.name} was written"
        return ProvenanceReport("sidecar", False, False, facts, [problem])
    return ProvenanceReport("sidecar", True, False, facts, [])


def verify(path: str | os.PathLike, *, trust_anchors: str | os.PathLike | None = None) -> ProvenanceReport:
    """Checks the provenance of the MP4 at ``path``: its C2PA manifest, else its sidecar JSON.

    trust_anchors: a PEM file of root certificates whose signers count as trusted (for the test pair,
    ``<folder>/test_ca.pem`` from ``make_test_credentials``); None trusts no one, so every signer is reported
    untrusted while tampering is still detected.
    """
    path = _existing_mp4(path)
    report = _verify_c2pa(path, trust_anchors)
    if report is not None:
        return report
    side = sidecar_path(path)
    if side.is_file():
        return _verify_sidecar(path, side)
    return ProvenanceReport(
        "none", False, False, None, [f"no C2PA manifest in {path.name} and no {side.name}"]
    )


# ------------------------------------------------------------------------------------------------ test pair

TEST_CA, TEST_CHAIN, TEST_KEY = "test_ca.pem", "test_chain.pem", "test_key.pem"


def make_test_credentials(
    folder: str | os.PathLike, algorithm: SigningAlgorithm = SigningAlgorithm.ES256
) -> SigningConfig:
    """Creates a self-made test CA and a leaf signing certificate in ``folder``; returns their SigningConfig.

    Writes ``test_ca.pem`` (the root: pass it to ``verify(..., trust_anchors=...)`` to see the signer
    trusted), ``test_chain.pem`` (the leaf, CA-issued, digitalSignature and emailProtection EKU, one year) and
    ``test_key.pem`` (its unencrypted key, mode 0600). ES256 (P-256) or ED25519. For trying provenance out
    and for tests only: real deployments sign with a certificate from a CA on the C2PA trust list, whose
    signatures other C2PA readers accept as trusted; these are untrusted everywhere else.
    """
    from cryptography import x509
    from cryptography.hazmat.primitives import hashes, serialization
    from cryptography.hazmat.primitives.asymmetric import ec, ed25519
    from cryptography.x509.oid import ExtendedKeyUsageOID, NameOID

    algorithm = SigningAlgorithm(algorithm)
    if algorithm is SigningAlgorithm.ES256:
        new_key, digest = (lambda: ec.generate_private_key(ec.SECP256R1())), hashes.SHA256()
    elif algorithm is SigningAlgorithm.ED25519:
        new_key, digest = ed25519.Ed25519PrivateKey.generate, None
    else:
        raise ValueError(f"test credentials are ES256 or ED25519, not {algorithm.name}")

    def usage(**on: bool) -> x509.KeyUsage:
        names = ["digital_signature", "content_commitment", "key_encipherment", "data_encipherment"]
        names += ["key_agreement", "key_cert_sign", "crl_sign", "encipher_only", "decipher_only"]
        return x509.KeyUsage(**{n: on.get(n, False) for n in names})

    def name(cn: str) -> x509.Name:
        return x509.Name(
            [
                x509.NameAttribute(NameOID.COMMON_NAME, cn),
                x509.NameAttribute(NameOID.ORGANIZATION_NAME, "sora_jax test"),
            ]
        )

    now = dt.datetime.now(dt.UTC)
    ca_key, key = new_key(), new_key()
    ca = (
        x509.CertificateBuilder()
        .subject_name(name("sora_jax test CA"))
        .issuer_name(name("sora_jax test CA"))
        .public_key(ca_key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=3650))
        .add_extension(x509.BasicConstraints(ca=True, path_length=0), critical=True)
        .add_extension(usage(key_cert_sign=True, crl_sign=True), critical=True)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(ca_key.public_key()), critical=False)
        .sign(ca_key, digest)
    )
    leaf = (
        x509.CertificateBuilder()
        .subject_name(name("sora_jax test signer"))
        .issuer_name(ca.subject)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - dt.timedelta(days=1))
        .not_valid_after(now + dt.timedelta(days=365))
        .add_extension(x509.BasicConstraints(ca=False, path_length=None), critical=True)
        .add_extension(usage(digital_signature=True), critical=True)
        .add_extension(x509.ExtendedKeyUsage([ExtendedKeyUsageOID.EMAIL_PROTECTION]), critical=False)
        .add_extension(x509.SubjectKeyIdentifier.from_public_key(key.public_key()), critical=False)
        .add_extension(
            x509.AuthorityKeyIdentifier.from_issuer_public_key(ca_key.public_key()), critical=False
        )
        .sign(ca_key, digest)
    )
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    pem = serialization.Encoding.PEM
    (folder / TEST_CA).write_bytes(ca.public_bytes(pem))
    (folder / TEST_CHAIN).write_bytes(leaf.public_bytes(pem))  # the root stays out of the chain (C2PA)
    key_path = folder / TEST_KEY
    fd = os.open(key_path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "wb") as f:
        f.write(key.private_bytes(pem, serialization.PrivateFormat.PKCS8, serialization.NoEncryption()))
    return SigningConfig(folder / TEST_CHAIN, key_path, algorithm)
