"""API key management (the CLI creates keys; only hashes are stored)."""

from __future__ import annotations

from sqlalchemy.orm import Session

from app.audit import service as audit
from app.core.security import ROLES, generate_api_key, hash_api_key
from app.models import ApiKey


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
