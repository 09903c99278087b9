"""Request-scoped dependencies: the session (the transaction's owner) and the caller."""

from __future__ import annotations

from collections.abc import Callable, Collection, Iterator
from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from sqlalchemy import select
from sqlalchemy.orm import Session
from starlette.concurrency import run_in_threadpool

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


def _token(credentials: HTTPAuthorizationCredentials | None) -> str:
    token = credentials.credentials.strip() if credentials is not None else ""
    if not token:
        raise Unauthorized("missing bearer API key (Authorization: Bearer <key>)")
    return token


def _key_caller(session: Session, digest: str) -> Caller:
    key = session.scalars(select(ApiKey).where(ApiKey.key_hash == digest)).first()
    if key is None or key.revoked_at is not None:
        raise Unauthorized("unknown or revoked API key")
    return Caller(key.id, key.name, key.role)  # type: ignore[arg-type]


def get_caller(
    session: SessionDep,
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Caller:
    return _key_caller(session, hash_api_key(_token(credentials)))


CallerDep = Annotated[Caller, Depends(get_caller)]


def _admit(caller: Caller, allowed: Collection[str]) -> Caller:
    if caller.role not in allowed:
        raise Forbidden(f"role {caller.role!r} may not do this; it needs one of {sorted(allowed)}")
    return caller


def role_checker(*roles: Role) -> Callable[[Caller], Caller]:
    """A dependency admitting only the given roles (admin is always admitted)."""
    allowed = {"admin", *roles}

    def check(caller: CallerDep) -> Caller:
        return _admit(caller, allowed)

    return check


# Keys this process has seen live, by hash: a key's id, name and role never change, so
# intake need not read them per request. Whether the key is still live is not taken
# from here: the transaction that stores the request checks it (app.requests.intake).
_known: dict[str, Caller] = {}
KNOWN_MAX = 10_000


def _look_up(digest: str) -> Caller:
    with session_factory()() as session:
        caller = _key_caller(session, digest)
    if len(_known) >= KNOWN_MAX:
        _known.clear()
    _known[digest] = caller
    return caller


# The roles that may create deletion requests.
INTAKE_ROLES = frozenset({"admin", "portal"})


def known_caller(digest: str) -> Caller | None:
    """The caller whose key hashes to `digest`, if this process has seen it live."""
    return _known.get(digest)


async def intake_caller(
    credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
) -> Caller:
    """A portal or admin caller for intake, without a session: the key as this process
    knows it (else looked up, on the thread pool). Its revocation is checked by the
    transaction that stores the request."""
    digest = hash_api_key(_token(credentials))
    caller = _known.get(digest)
    if caller is None:
        caller = await run_in_threadpool(_look_up, digest)
    return _admit(caller, INTAKE_ROLES)


async def current_settings() -> Settings:
    """The settings, for async endpoints (a plain function would cost a thread hop)."""
    return get_settings()


IntakeCallerDep = Annotated[Caller, Depends(intake_caller)]
AsyncSettingsDep = Annotated[Settings, Depends(current_settings)]
AdminDep = Annotated[Caller, Depends(role_checker("admin"))]
# Portals create and read their own requests; auditors read everything.
PortalDep = Annotated[Caller, Depends(role_checker("portal"))]
ReaderDep = Annotated[Caller, Depends(role_checker("auditor"))]
AnyRoleDep = Annotated[Caller, Depends(role_checker("portal", "auditor"))]
