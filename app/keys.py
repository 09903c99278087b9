"""API key management: create, list, revoke (only hashes are stored)."""

from __future__ import annotations

from sqlalchemy import select
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.core.errors import Conflict, NotFound, Unprocessable
from app.core.security import ROLES, generate_api_key, hash_api_key
from app.models import ApiKey
from app.models.base import utcnow


def create_key(session: Session, role: str, name: str, actor: str = "cli") -> tuple[ApiKey, str]:
    if role not in ROLES:
        raise ValueError(f"role must be one of {', '.join(ROLES)}")
    if not name.strip():
        raise ValueError("name must not be blank")
    raw = generate_api_key()
    key = ApiKey(name=name.strip(), role=role, prefix=raw[:10], key_hash=hash_api_key(raw))
    session.add(key)
    session.flush()
    audit.record(
        session,
        actor=actor,
        action="api_key.created",
        entity_type="api_key",
        entity_id=key.id,
        data={"name": key.name, "role": role, "prefix": key.prefix},
    )
    return key, raw


def list_keys(session: Session, include_revoked: bool = True) -> list[ApiKey]:
    q = select(ApiKey).order_by(ApiKey.created_at, ApiKey.id)
    if not include_revoked:
        q = q.where(ApiKey.revoked_at.is_(None))
    return list(session.scalars(q))


def find_key(session: Session, id_or_name: str) -> ApiKey:
    """The key with this id, else the one live key with this name. Names are not unique:
    several live keys of one name are refused (name the id), never all revoked at once."""
    key = session.get(ApiKey, id_or_name)
    if key is not None:
        return key
    named = list(
        session.scalars(
            select(ApiKey).where(ApiKey.name == id_or_name.strip()).order_by(ApiKey.created_at)
        )
    )
    live = [k for k in named if k.revoked_at is None]
    if len(live) > 1:
        ids = ", ".join(k.id for k in live)
        raise Unprocessable(
            f"{len(live)} live keys are named {id_or_name!r}; give one of their ids: {ids}",
            code="ambiguous_key",
        )
    if live or named:
        return (live or named)[-1]
    raise NotFound(f"no API key with id or name {id_or_name!r}", code="key_not_found")


def revoke_key(session: Session, key: ApiKey, actor: str = "cli") -> ApiKey:
    """Revoke at once: every API call and dashboard page re-reads the key."""
    if key.revoked_at is not None:
        raise Conflict(f"key {key.id} was revoked at {key.revoked_at}", code="key_revoked")
    key.revoked_at = utcnow()
    audit.record(
        session,
        actor=actor,
        action="api_key.revoked",
        entity_type="api_key",
        entity_id=key.id,
        data={"name": key.name, "role": key.role, "prefix": key.prefix},
    )
    session.flush()
    return key
