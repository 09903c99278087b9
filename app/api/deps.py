"""Request-scoped dependencies: the session (the transaction's owner) and the caller."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.db import session_factory
from app.core.errors import Forbidden, Unauthorized
from app.core.security import Role, hash_api_key
from app.core.settings import Settings, get_settings
from app.models import ApiKey


def get_session() -> Iterator[Session]:
    """Commits when the endpoint returns normally, rolls back on any exception."""
    session = session_factory()()
    try:
        yield session
        session.commit()
    except BaseException:
        session.rollback()
        raise
    finally:
        session.close()


# scope="function": commit when the endpoint returns, before the response goes out, so a
# client that got a 2xx can rely on the change being visible to its next call.
SessionDep = Annotated[Session, Depends(get_session, scope="function")]
SettingsDep = Annotated[Settings, Depends(get_settings)]


@dataclass(frozen=True)
class Caller:
    key_id: str
    name: str
    role: Role

    @property
    def actor(self) -> str:
        return f"key:{self.name}"


# Declared as a security scheme in the OpenAPI document; the refusal is ours (401 in the
# error shape), not FastAPI's.
bearer = HTTPBearer(auto_error=False, description="an API key: `Authorization: Bearer plm_...`")


def get_caller(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Caller:
    token = credentials.credentials.strip() if credentials is not None else ""
    if not token:
        raise Unauthorized("missing bearer API key (Authorization: Bearer <key>)")
    key = session.scalars(select(ApiKey).where(ApiKey.key_hash == hash_api_key(token))).first()
    if key is None or key.revoked_at is not None:
        raise Unauthorized("unknown or revoked API key")
    return Caller(key.id, key.name, key.role)  # type: ignore[arg-type]


CallerDep = Annotated[Caller, Depends(get_caller)]


def role_checker(*roles: Role) -> Callable[[Caller], Caller]:
    """A dependency admitting only the given roles (admin is always admitted)."""
    allowed = {"admin", *roles}

    def check(caller: CallerDep) -> Caller:
        if caller.role not in allowed:
            raise Forbidden(
                f"role {caller.role!r} may not do this; it needs one of {sorted(allowed)}"
            )
        return caller

    return check


AdminDep = Annotated[Caller, Depends(role_checker("admin"))]
# Portals create and read their own requests; auditors read everything.
PortalDep = Annotated[Caller, Depends(role_checker("portal"))]
ReaderDep = Annotated[Caller, Depends(role_checker("auditor"))]
AnyRoleDep = Annotated[Caller, Depends(role_checker("portal", "auditor"))]
