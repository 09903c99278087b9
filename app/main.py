"""The FastAPI application: routers, one error handler, health and metrics."""

from __future__ import annotations

import logging
import re
import time

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest
from sqlalchemy import text
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from app.core.db import get_engine
from app.core.errors import AppError
from app.core.logging import new_request_id, request_id_var
from app.ops.metrics import registry as metrics_registry

log = logging.getLogger(__name__)
access_log = logging.getLogger("palimpsest.access")
_SUBJECT_PATH = re.compile(r"^(/v1/subjects/)[^/]+")


def redact_path(path: str) -> str:
    """The path as logged: a raw subject id never reaches a log line."""
    return _SUBJECT_PATH.sub(r"\1[redacted]", path)


def _error(status: int, code: str, message: str) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message}}, status_code=status)


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


def create_app() -> FastAPI:
    from app.audit.router import router as audit_router
    from app.certificates.router import router as certificates_router
    from app.dashboard.router import mount as mount_dashboard
    from app.datasets.router import router as datasets_router
    from app.jobs.router import router as jobs_router
    from app.lineage.router import router as lineage_router
    from app.registry.router import router as registry_router
    from app.requests.router import router as requests_router
    from app.verification.router import router as reports_router
    from app.webhooks.router import router as webhooks_router
    from workers.celery_app import install_sender

    # Tasks enqueued by API calls are published after commit by the Celery sender.
    install_sender()
    app = FastAPI(title="Palimpsest", version="0.1.0", description=__doc__)

    app.add_middleware(RequestIdMiddleware)

    @app.exception_handler(AppError)
    async def app_error(_: Request, exc: AppError) -> JSONResponse:
        return _error(exc.status_code, exc.code, exc.message)

    @app.exception_handler(RequestValidationError)
    async def validation_error(_: Request, exc: RequestValidationError) -> JSONResponse:
        return _error(422, "invalid", _validation_message(exc))

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "http_error")
        return _error(exc.status_code, code, str(exc.detail))

    for r in (
        datasets_router,
        registry_router,
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
            return _error(503, "not_ready", f"database unreachable: {type(exc).__name__}")
        return JSONResponse({"status": "ready"})

    @app.get("/metrics", tags=["ops"])
    def metrics() -> Response:
        # The process's own metrics plus the service's, read from the database.
        body = generate_latest() + generate_latest(metrics_registry())
        return Response(body, media_type=CONTENT_TYPE_LATEST)

    return app
