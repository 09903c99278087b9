"""The FastAPI application: routers, one error handler, health and metrics."""

from __future__ import annotations

import logging
import os
import re
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from sqlalchemy.exc import DBAPIError, OperationalError
from sqlalchemy.exc import TimeoutError as PoolTimeoutError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.api.openapi import install as install_openapi
from app.core.db import get_engine
from app.core.errors import AppError
from app.core.logging import new_request_id, request_id_var
from app.ops.metrics import registry as metrics_registry
from app.requests.fast_path import FastIntake

log = logging.getLogger(__name__)
access_log = logging.getLogger("palimpsest.access")
_SUBJECT_PATH = re.compile(r"^(/v1/subjects/)[^/]+")


def redact_path(path: str) -> str:
    """The path as logged: a raw subject id never reaches a log line."""
    return _SUBJECT_PATH.sub(r"\1[redacted]", path)


def _error(
    status: int, code: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"code": code, "message": message}}, status_code=status, headers=headers
    )


# How long a client should wait before retrying when the database is busy.
BUSY_RETRY_AFTER_SECONDS = 5


def _busy(message: str) -> JSONResponse:
    return _error(503, "busy", message, headers={"Retry-After": str(BUSY_RETRY_AFTER_SECONDS)})


def _validation_message(exc: RequestValidationError) -> str:
    parts = []
    for err in exc.errors()[:5]:
        loc = ".".join(str(x) for x in err.get("loc", ()) if x not in ("body",))
        parts.append(f"{loc}: {err.get('msg', 'invalid')}" if loc else str(err.get("msg")))
    return "; ".join(parts) or "invalid request"


class RequestIdMiddleware:
    """The request's id (the client's `X-Request-ID` when sane, else a fresh one) for its
    logs and the tasks it enqueues, returned in the response; and our access log (uvicorn's
    is off), with paths that name a subject redacted, because logs never hold personal
    data. Plain ASGI: Starlette's BaseHTTPMiddleware runs every request through an extra
    task and stream, a large share of intake's CPU."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        incoming = next((v for k, v in scope["headers"] if k == b"x-request-id"), None)
        rid = new_request_id(incoming.decode("latin-1") if incoming is not None else None)
        token = request_id_var.set(rid)
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message["headers"] = [*message.get("headers", []), (b"x-request-id", rid.encode())]
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            access_log.info(
                "%s %s %s",
                scope["method"],
                redact_path(scope["path"]),
                status,
                extra={"duration_ms": round((time.perf_counter() - started) * 1000, 1)},
            )
            request_id_var.reset(token)


def _allowed_methods(app: FastAPI, path: str) -> list[str]:
    """The methods the OpenAPI document lists for the template `path` matches."""
    methods: set[str] = set()
    for template, item in app.openapi().get("paths", {}).items():
        pattern = "^" + re.sub(r"\\\{[^/]+?\\\}", "[^/]+", re.escape(template)) + "$"
        if re.match(pattern, path):
            methods |= {m.upper() for m in item if m in _HTTP_METHODS}
    return sorted(methods)


_HTTP_METHODS = {"get", "put", "post", "delete", "patch", "head", "options", "trace"}


def _telemetry() -> dict[str, Any]:
    """FastAPI's OpenTelemetry hooks (FastAPI releases that have them) when a provider
    is configured at start-up or FastAPI is told to configure one, else off:
    unconfigured, they only ask on every request whether one has appeared since, a
    measurable share of intake's CPU (bench B9)."""
    try:
        import fastapi.telemetry  # noqa: F401
        from opentelemetry import _logs, metrics, trace
    except ImportError:
        return {}
    if os.getenv("FASTAPI_OTEL_AUTO_CONFIGURE", "").lower() == "true":
        return {}
    providers = (trace.get_tracer_provider(), metrics.get_meter_provider())
    if any("Proxy" not in type(p).__name__ for p in (*providers, _logs.get_logger_provider())):
        return {}
    return {"telemetry": {"tracing": False, "metrics": False, "logs": False}}


def create_app() -> FastAPI:
    from app.audit.router import router as audit_router
    from app.certificates.router import router as certificates_router
    from app.dashboard.router import mount as mount_dashboard
    from app.datasets.router import router as datasets_router
    from app.jobs.router import router as jobs_router
    from app.keys.router import router as keys_router
    from app.lineage.router import router as lineage_router
    from app.registry.router import imports_router
    from app.registry.router import router as registry_router
    from app.requests.router import router as requests_router
    from app.verification.router import router as reports_router
    from app.webhooks.router import router as webhooks_router
    from workers.celery_app import install_sender

    # Tasks enqueued by API calls are published after commit by the Celery sender.
    install_sender()
    app = FastAPI(title="Palimpsest", version="0.1.0", description=__doc__, **_telemetry())

    # Outermost last: the request id and access log wrap intake's fast path too.
    app.add_middleware(FastIntake, fastapi=app)
    app.add_middleware(RequestIdMiddleware)

    @app.exception_handler(AppError)
    async def app_error(_: Request, exc: AppError) -> JSONResponse:
        return _error(exc.status_code, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, "invalid", _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        headers = dict(exc.headers) if exc.headers else None
        if exc.status_code == 405:
            # Every method the path serves, not only those of the route that matched
            # (FastAPI makes one route per method).
            headers = {"Allow": ", ".join(_allowed_methods(app, request.url.path))}
        return _error(exc.status_code, code, str(exc.detail), headers=headers)

    # A busy database is not the caller's fault and not a bug: a JSON 503 with
    # Retry-After, so that clients (and their idempotency keys) simply try again.
    # SQLite: another writer held the lock past the busy timeout ("database is
    # locked"); any database: no pooled connection came free in time, or the server
    # was unreachable or dropped the connection.
    @app.exception_handler(PoolTimeoutError)
    async def pool_timeout(_: Request, exc: PoolTimeoutError) -> JSONResponse:
        log.warning("database connection pool exhausted: %s", exc)
        return _busy("the service is busy (no database connection free); retry shortly")

    @app.exception_handler(OperationalError)
    async def operational_error(_: Request, exc: OperationalError) -> JSONResponse:
        log.warning("database unavailable: %s", str(exc.orig or exc).splitlines()[0][:200])
        return _busy("the database is busy or unavailable; retry shortly")

    @app.exception_handler(DBAPIError)
    async def dbapi_error(request: Request, exc: DBAPIError) -> JSONResponse:
        if exc.connection_invalidated:
            return _busy("the database connection was lost; retry shortly")
        return await internal_error(request, exc)

    @app.exception_handler(RecursionError)
    async def too_deep(_: Request, exc: RecursionError) -> JSONResponse:
        # Only input nests this deeply (a JSON body or spec of thousands of levels).
        return _error(422, "invalid", "the input is nested too deeply")

    @app.exception_handler(Exception)
    async def internal_error(_: Request, exc: Exception) -> JSONResponse:
        # A bug, but still the contract's error shape (the traceback goes to the log).
        log.error("unhandled error", exc_info=exc)
        return _error(500, "internal_error", "internal error; it has been logged")

    for r in (
        keys_router,
        datasets_router,
        registry_router,
        imports_router,
        requests_router,
        jobs_router,
        reports_router,
        lineage_router,
        audit_router,
        certificates_router,
        webhooks_router,
    ):
        app.include_router(r)
    mount_dashboard(app)

    @app.get("/healthz", tags=["ops"])
    def healthz() -> dict[str, str]:
        return {"status": "ok"}

    @app.get("/readyz", tags=["ops"])
    def readyz() -> JSONResponse:
        try:
            with get_engine().connect() as conn:
                conn.execute(text("SELECT 1"))
        except Exception as exc:  # readiness reports the dependency, it does not crash
            return _error(
                503,
                "not_ready",
                f"database unreachable: {type(exc).__name__}",
                headers={"Retry-After": str(BUSY_RETRY_AFTER_SECONDS)},
            )
        return JSONResponse({"status": "ready"})

    @app.get(
        "/metrics",
        tags=["ops"],
        response_class=Response,
        responses={
            200: {
                "description": "Prometheus text exposition format",
                "content": {"text/plain": {"schema": {"type": "string"}}},
            }
        },
    )
    def metrics() -> Response:
        # The process's own metrics plus the service's, read from the database.
        body = generate_latest() + generate_latest(metrics_registry())
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    install_openapi(app)
    return app
