"""Callback tokens at rest: AES-256-GCM under a key derived from the subject pepper.

The pepper is the one secret every Palimpsest deployment must already keep (subject keys
depend on it, so it never rotates); a database dump alone therefore yields no token.
"""

from __future__ import annotations

import base64
import os

from cryptography.hazmat.primitives import hashes
from cryptography.hazmat.primitives.ciphers.aead import AESGCM
from cryptography.hazmat.primitives.kdf.hkdf import HKDF

_INFO = b"palimpsest/integration-callback-token/v1"
_NONCE = 12


def _key(pepper: str) -> bytes:
    return HKDF(algorithm=hashes.SHA256(), length=32, salt=None, info=_INFO).derive(pepper.encode())


def seal(token: str, pepper: str, bound_to: str) -> str:
    """`bound_to` (the request id) is authenticated with the token, so a sealed token
    copied onto another request's row does not open."""
    nonce = os.urandom(_NONCE)
    ct = AESGCM(_key(pepper)).encrypt(nonce, token.encode(), bound_to.encode())
    return "v1:" + base64.urlsafe_b64encode(nonce + ct).decode()


def unseal(sealed: str, pepper: str, bound_to: str) -> str:
    version, _, body = sealed.partition(":")
    if version != "v1":
        raise ValueError("unknown sealed-token version")
    raw = base64.urlsafe_b64decode(body.encode())
    return AESGCM(_key(pepper)).decrypt(raw[:_NONCE], raw[_NONCE:], bound_to.encode()).decode()
