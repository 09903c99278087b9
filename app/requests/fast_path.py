"""`POST /v1/deletion-requests` without the framework's per-request machinery.

Intake is the one call portals send by the thousand. Under load, routing through a dozen
routers, solving the endpoint's dependencies, FastAPI's telemetry checks and the
request/response wrappers cost more CPU than storing the request does (bench B9). This
ASGI middleware answers the ordinary case itself, with the same parts the endpoint
uses: the body validated by `DeletionRequestIn`, the caller from the key cache
`intake_caller` keeps, `intake.accept`, and the app's own exception handlers for its
errors, so the answer is the one the endpoint would give (status, body, headers).

Everything else goes on to FastAPI untouched, its body replayed: any other path or
method, a body that is not a valid JSON request, a missing, malformed or not yet cached
key, a wrong role, a callback (`Reply-To`), a repeated header, or an app with
dependency overrides. Those answers (401, 403, 422, ...) therefore stay FastAPI's.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI
from pydantic import ValidationError
from starlette.requests import Request
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api import deps
from app.core.security import hash_api_key
from app.core.settings import get_settings
from app.requests import intake
from app.requests.schemas import DeletionRequestIn

PATH = "/v1/deletion-requests"
# Headers the fast path reads; a request repeating one of them goes to FastAPI.
_READ = {b"authorization", b"idempotency-key", b"content-type"}
# Headers that make a request one the fast path leaves alone.
_LEAVE = {b"reply-to", b"reply-to-token"}
_JSON = b"application/json"


def _json_type(value: bytes) -> bool:
    main = value.split(b";", 1)[0].strip().lower()
    return main == _JSON


class FastIntake:
    def __init__(self, app: ASGIApp, fastapi: FastAPI) -> None:
        self.app = app
        self.fastapi = fastapi

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if (
            scope["type"] != "http"
            or scope["method"] != "POST"
            or scope["path"] != PATH
            or self.fastapi.dependency_overrides
        ):
            await self.app(scope, receive, send)
            return
        headers = _headers(scope)
        body = await _read_body(receive)
        if body is None:  # the client went away before sending its body
            return
        parsed = None if headers is None else _parse(headers, body)
        if parsed is None:
            await self.app(scope, _replay(body, receive), send)
            return
        request, caller, key = parsed
        try:
            accepted, created = await intake.accept(
                request, caller, get_settings(), key, None, None
            )
        except Exception as exc:
            handler = self._handler(exc)
            if handler is None:
                raise  # as from the endpoint: ServerErrorMiddleware answers 500
            response = await handler(Request(scope, _replay(body, receive)), exc)
            await response(scope, receive, send)
            return
        payload = accepted.model_dump_json().encode()
        out = [
            (b"content-length", str(len(payload)).encode()),
            (b"content-type", _JSON),
        ]
        if not created:
            out.append((b"idempotent-replayed", b"true"))
        await send({"type": "http.response.start", "status": 202, "headers": out})
        await send({"type": "http.response.body", "body": payload})

    def _handler(self, exc: Exception) -> Any:
        """The handler ExceptionMiddleware would pick (500s are ServerErrorMiddleware's)."""
        handlers: Mapping[Any, Any] = self.fastapi.exception_handlers
        for cls in type(exc).__mro__:
            if cls is Exception:
                return None
            if cls in handlers:
                return handlers[cls]
        return None


def _headers(scope: Scope) -> dict[bytes, bytes] | None:
    """The headers the fast path reads, or None when it should leave the request."""
    out: dict[bytes, bytes] = {}
    for name, value in scope["headers"]:
        if name in _LEAVE:
            return None
        if name in _READ:
            if name in out:
                return None
            out[name] = value
    return out


async def _read_body(receive: Receive) -> bytes | None:
    """The whole body (the app's body limit is enforced outside); None on a disconnect."""
    chunks: list[bytes] = []
    while True:
        message = await receive()
        if message["type"] != "http.request":
            return None
        chunks.append(message.get("body", b""))
        if not message.get("more_body", False):
            return b"".join(chunks)


def _replay(body: bytes, receive: Receive) -> Receive:
    """A receive that gives the body already read, then whatever the client sends."""
    sent = False

    async def again() -> Message:
        nonlocal sent
        if not sent:
            sent = True
            return {"type": "http.request", "body": body, "more_body": False}
        return await receive()

    return again


def _parse(
    headers: dict[bytes, bytes], body: bytes
) -> tuple[DeletionRequestIn, deps.Caller, str | None] | None:
    """The request, its caller and Idempotency-Key; None sends it on to FastAPI."""
    if not _json_type(headers.get(b"content-type", b"")):
        return None
    scheme, _, token = headers.get(b"authorization", b"").decode("latin-1").partition(" ")
    token = token.strip()
    if scheme.lower() != "bearer" or not token:
        return None
    caller = deps.known_caller(hash_api_key(token))
    if caller is None or caller.role not in deps.INTAKE_ROLES:
        return None
    try:
        request = DeletionRequestIn.model_validate(json.loads(body))
    except (ValueError, ValidationError, RecursionError):
        return None
    key = headers.get(b"idempotency-key")
    return request, caller, None if key is None else key.decode("latin-1")
