"""Ed25519 signatures over a canonical JSON encoding, and the signing key's file.

A signed document is `{"certificate": doc, "signature": {"algorithm": "Ed25519",
"key_id", "value"}}`; the signature covers `canonical_json(doc)` only, so anyone holding
the public key can check it offline with nothing but this encoding rule: sorted keys,
`(",", ":")` separators, UTF-8 without escaping, no NaN or infinities.
"""

from __future__ import annotations

import base64
import binascii
import contextlib
import hashlib
import json
import os
import uuid
from pathlib import Path
from typing import Any

from cryptography.exceptions import InvalidSignature
from cryptography.hazmat.primitives import serialization
from cryptography.hazmat.primitives.asymmetric.ed25519 import Ed25519PrivateKey, Ed25519PublicKey

ALGORITHM = "Ed25519"


def canonical_json(obj: Any) -> bytes:
    """The exact bytes a signature covers. NaN/Infinity have no JSON form: refused."""
    return json.dumps(
        obj, sort_keys=True, separators=(",", ":"), ensure_ascii=False, allow_nan=False
    ).encode("utf-8")


def _private_pem(key: Ed25519PrivateKey) -> bytes:
    return key.private_bytes(
        serialization.Encoding.PEM,
        serialization.PrivateFormat.PKCS8,
        serialization.NoEncryption(),
    )


def _read_private(path: Path) -> Ed25519PrivateKey:
    key = serialization.load_pem_private_key(path.read_bytes(), password=None)
    if not isinstance(key, Ed25519PrivateKey):
        raise ValueError(f"{path} does not hold an Ed25519 private key")
    return key


def load_or_create_key(path: str | Path) -> Ed25519PrivateKey:
    """The signing key at `path`, generated on first use (PKCS8 PEM, mode 0600).

    Two processes starting at once (API and worker) must end up with the same key: each
    writes a complete private temp file and hard-links it into place, which fails if the
    name exists; the loser discards its own key and loads the winner's.
    """
    path = Path(path)
    if path.exists():
        return _read_private(path)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex}.tmp")
    fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    try:
        with os.fdopen(fd, "wb") as fh:
            fh.write(_private_pem(Ed25519PrivateKey.generate()))
            fh.flush()
            os.fsync(fh.fileno())
        # Another process may have won the race: then its key is the one.
        with contextlib.suppress(FileExistsError):
            os.link(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
    return _read_private(path)


def load_public_key(path: str | Path) -> Ed25519PublicKey:
    """An Ed25519 public key from a PEM file holding the public or the private key."""
    blob = Path(path).read_bytes()
    try:
        pub = serialization.load_pem_public_key(blob)
    except ValueError:
        priv = serialization.load_pem_private_key(blob, password=None)
        if not isinstance(priv, Ed25519PrivateKey):
            raise ValueError(f"{path} does not hold an Ed25519 key") from None
        return priv.public_key()
    if not isinstance(pub, Ed25519PublicKey):
        raise ValueError(f"{path} does not hold an Ed25519 public key")
    return pub


def _public(key: Ed25519PrivateKey | Ed25519PublicKey) -> Ed25519PublicKey:
    return key.public_key() if isinstance(key, Ed25519PrivateKey) else key


def key_id(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    """First 16 hex digits of the SHA-256 of the raw 32-byte public key."""
    raw = _public(key).public_bytes(serialization.Encoding.Raw, serialization.PublicFormat.Raw)
    return hashlib.sha256(raw).hexdigest()[:16]


def public_pem(key: Ed25519PrivateKey | Ed25519PublicKey) -> str:
    return (
        _public(key)
        .public_bytes(serialization.Encoding.PEM, serialization.PublicFormat.SubjectPublicKeyInfo)
        .decode("ascii")
    )


def sign(doc: dict[str, Any], key: Ed25519PrivateKey) -> dict[str, Any]:
    """`doc` with a detached Ed25519 signature over its canonical encoding."""
    value = key.sign(canonical_json(doc))
    return {
        "certificate": doc,
        "signature": {
            "algorithm": ALGORITHM,
            "key_id": key_id(key),
            "value": base64.b64encode(value).decode("ascii"),
        },
    }


def check(signed: Any, public_key: Ed25519PublicKey) -> str | None:
    """None when `signed` verifies under `public_key`, else the reason it does not."""
    if not isinstance(signed, dict) or set(signed) != {"certificate", "signature"}:
        return "not a signed certificate (expected exactly 'certificate' and 'signature')"
    doc, sig = signed["certificate"], signed["signature"]
    if not isinstance(doc, dict) or not isinstance(sig, dict):
        return "not a signed certificate ('certificate' and 'signature' must be objects)"
    if sig.get("algorithm") != ALGORITHM:
        return f"unsupported signature algorithm {sig.get('algorithm')!r}"
    expected = key_id(public_key)
    if sig.get("key_id") != expected:
        return f"signed by key {sig.get('key_id')!r}, not by this key ({expected})"
    issuer = doc.get("issuer")
    if isinstance(issuer, dict) and issuer.get("key_id") not in (None, expected):
        return f"the certificate names issuer key {issuer.get('key_id')!r}, not {expected}"
    value = sig.get("value")
    if not isinstance(value, str):
        return "the signature value is missing"
    try:
        raw = base64.b64decode(value, validate=True)
        payload = canonical_json(doc)
    except (binascii.Error, ValueError) as exc:
        return f"malformed certificate or signature: {exc}"
    try:
        public_key.verify(raw, payload)
    except InvalidSignature:
        return "the signature does not match the certificate's content"
    return None


def verify(signed: Any, public_key: Ed25519PublicKey) -> bool:
    return check(signed, public_key) is None
