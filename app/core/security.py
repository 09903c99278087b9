"""API keys (only hashes stored), roles, and subject pseudonymisation."""

from __future__ import annotations

import hashlib
import hmac
import secrets
from typing import Literal

Role = Literal["admin", "portal", "auditor"]
ROLES: tuple[Role, ...] = ("admin", "portal", "auditor")
KEY_PREFIX = "plm_"


def generate_api_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_api_key(key: str) -> str:
    # Keys carry 256 bits of entropy, so a fast hash is enough (no offline guessing).
    return hashlib.sha256(key.encode()).hexdigest()


def subject_key(subject_id: str, pepper: str) -> str:
    """Keyed HMAC of an external subject id: the only form in which we store it."""
    return hmac.new(pepper.encode(), subject_id.strip().encode(), hashlib.sha256).hexdigest()
