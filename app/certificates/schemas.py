"""Certificate views."""

from __future__ import annotations

from typing import Any, Literal

from pydantic import BaseModel


class SigningKeyOut(BaseModel):
    algorithm: Literal["Ed25519"]
    key_id: str
    public_key_pem: str


class SignatureOut(BaseModel):
    algorithm: Literal["Ed25519"]
    key_id: str
    value: str


class SignedCertificate(BaseModel):
    """`signature` covers the canonical JSON encoding of `certificate` (sorted keys,
    `(",", ":")` separators, UTF-8)."""

    certificate: dict[str, Any]
    signature: SignatureOut
