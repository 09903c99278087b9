"""`/v1/keys` (admin): API keys, listed without secrets, created, revoked."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated

from fastapi import APIRouter, Query
from pydantic import BaseModel, ConfigDict, Field

from app.api.deps import AdminDep, SessionDep
from app.core.errors import NotFound, Unprocessable
from app.core.security import Role
from app.keys import create_key, list_keys, revoke_key
from app.models import ApiKey

router = APIRouter(prefix="/v1/keys", tags=["keys"])


class KeyIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    role: Role
    name: str = Field(min_length=1, max_length=200, pattern=r"\S")


class KeyOut(BaseModel):
    id: str
    name: str
    role: str
    prefix: str
    created_at: datetime
    revoked_at: datetime | None


class KeyCreated(KeyOut):
    key: str = Field(description="the key itself; shown only in this answer")


class KeyList(BaseModel):
    items: list[KeyOut]


def _out(key: ApiKey) -> KeyOut:
    return KeyOut(
        id=key.id,
        name=key.name,
        role=key.role,
        prefix=key.prefix,
        created_at=key.created_at,
        revoked_at=key.revoked_at,
    )


@router.get("")
def get_keys(
    _: AdminDep, session: SessionDep, include_revoked: Annotated[bool, Query()] = True
) -> KeyList:
    return KeyList(items=[_out(k) for k in list_keys(session, include_revoked)])


@router.post("", status_code=201)
def post_key(body: KeyIn, caller: AdminDep, session: SessionDep) -> KeyCreated:
    try:
        key, raw = create_key(session, body.role, body.name, actor=caller.actor)
    except ValueError as exc:
        raise Unprocessable(str(exc)) from exc
    return KeyCreated(**_out(key).model_dump(), key=raw)


@router.post("/{key_id}/revoke")
def post_revoke(key_id: str, caller: AdminDep, session: SessionDep) -> KeyOut:
    """Revoked at once: the key's next API call is a 401 and its dashboard sessions end."""
    key = session.get(ApiKey, key_id)
    if key is None:
        raise NotFound(f"no API key {key_id!r}", code="key_not_found")
    return _out(revoke_key(session, key, actor=caller.actor))
