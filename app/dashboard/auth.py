"""Dashboard sessions: an admin or auditor API key, exchanged once for a signed cookie.

The cookie holds the key's id, its role, a random session id and an expiry, signed with
HMAC-SHA256; it never holds the key itself. Every page re-reads the key, so a revoked key
(or one whose role changed) stops working at once. CSRF tokens are an HMAC of the session
id under a separate label, so a token is only good for the session it was issued to.
"""

from __future__ import annotations

import base64
import binascii
import hashlib
import hmac
import json
import secrets
import time
from dataclasses import dataclass
from functools import lru_cache
from typing import Any

from pydantic_settings import BaseSettings, SettingsConfigDict
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.api.deps import Caller
from app.audit import service as audit
from app.core.security import Role, hash_api_key
from app.core.settings import Settings
from app.models import ApiKey

COOKIE = "palimpsest_admin"
COOKIE_PATH = "/admin"
DASHBOARD_ROLES: frozenset[str] = frozenset({"admin", "auditor"})
MAX_KEY_LENGTH = 200


class DashboardSettings(BaseSettings):
    """`PALIMPSEST_DASHBOARD_*`. Without a session secret the install's own random one is
    used (`Settings.session_secret`; production refuses to start without one)."""

    model_config = SettingsConfigDict(env_prefix="PALIMPSEST_DASHBOARD_", extra="ignore")

    session_secret: str | None = None
    # Mark the cookie Secure even when the request arrived as plain http (TLS ends at a
    # proxy that does not forward the scheme).
    cookie_secure: bool = False
    session_hours: float = 8.0


@lru_cache
def get_dashboard_settings() -> DashboardSettings:
    return DashboardSettings()


def _secret(settings: Settings, dash: DashboardSettings) -> bytes:
    # Never derived from anything public: configured, or random per install.
    return (dash.session_secret or settings.session_secret).encode()


def _b64(raw: bytes) -> str:
    return base64.urlsafe_b64encode(raw).decode().rstrip("=")


def _unb64(text: str) -> bytes:
    return base64.urlsafe_b64decode(text + "=" * (-len(text) % 4))


@dataclass(frozen=True)
class DashboardUser:
    """A logged-in browser: who (the API key), in which role, and its session."""

    key_id: str
    name: str
    role: Role
    sid: str
    expires_at: int
    csrf_token: str

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def caller(self) -> Caller:
        """The same identity the API's services take, so audit events name the key."""
        return Caller(self.key_id, self.name, self.role)


class SessionCodec:
    """Signs and reads session cookies, and derives/checks CSRF tokens."""

    def __init__(self, settings: Settings, dash: DashboardSettings | None = None) -> None:
        self.dash = dash or get_dashboard_settings()
        self._key = _secret(settings, self.dash)

    def _mac(self, label: str, body: bytes) -> bytes:
        return hmac.new(self._key, label.encode() + b"|" + body, hashlib.sha256).digest()

    def encode(self, key_id: str, role: str, now: float | None = None) -> tuple[str, int]:
        """A new session for `key_id`: the cookie value and its expiry (epoch seconds)."""
        exp = int((now or time.time()) + self.dash.session_hours * 3600)
        body = json.dumps(
            {"kid": key_id, "role": role, "sid": secrets.token_urlsafe(16), "exp": exp},
            separators=(",", ":"),
        ).encode()
        return f"{_b64(body)}.{_b64(self._mac('session', body))}", exp

    def decode(self, value: str | None, now: float | None = None) -> dict[str, Any] | None:
        """The payload of a well-signed, unexpired cookie; None for anything else."""
        if not value or len(value) > 1000 or value.count(".") != 1:
            return None
        body_b64, mac_b64 = value.split(".")
        try:
            body, mac = _unb64(body_b64), _unb64(mac_b64)
        except (binascii.Error, ValueError):
            return None
        if not hmac.compare_digest(mac, self._mac("session", body)):
            return None
        try:
            payload = json.loads(body)
        except ValueError:
            return None
        if not isinstance(payload, dict):
            return None
        exp, kid, sid = payload.get("exp"), payload.get("kid"), payload.get("sid")
        if not isinstance(exp, int) or not isinstance(kid, str) or not isinstance(sid, str):
            return None
        if exp <= (now or time.time()):
            return None
        return payload

    def csrf_token(self, sid: str) -> str:
        return _b64(self._mac("csrf", sid.encode()))

    def csrf_ok(self, user: DashboardUser, token: str | None) -> bool:
        return bool(token) and hmac.compare_digest(
            str(token).encode(), self.csrf_token(user.sid).encode()
        )


def key_for_login(session: Session, raw_key: str) -> ApiKey | None:
    """The live admin/auditor key behind `raw_key`; None for unknown, revoked or other
    roles (a portal key does not open the dashboard)."""
    raw_key = raw_key.strip()
    if not raw_key or len(raw_key) > MAX_KEY_LENGTH:
        return None
    key = session.scalars(select(ApiKey).where(ApiKey.key_hash == hash_api_key(raw_key))).first()
    if key is None or key.revoked_at is not None or key.role not in DASHBOARD_ROLES:
        return None
    return key


def record_login(session: Session, key: ApiKey) -> None:
    audit.record(
        session,
        actor=f"key:{key.name}",
        action="dashboard.login",
        entity_type="api_key",
        entity_id=key.id,
        data={"role": key.role},
    )


def user_from_cookie(
    session: Session, codec: SessionCodec, cookie: str | None
) -> DashboardUser | None:
    """The session's user, re-checked against the key table on every request."""
    payload = codec.decode(cookie)
    if payload is None:
        return None
    key = session.get(ApiKey, payload["kid"])
    if key is None or key.revoked_at is not None or key.role not in DASHBOARD_ROLES:
        return None
    sid = str(payload["sid"])
    return DashboardUser(
        key_id=key.id,
        name=key.name,
        role=key.role,  # type: ignore[arg-type]
        sid=sid,
        expires_at=int(payload["exp"]),
        csrf_token=codec.csrf_token(sid),
    )
