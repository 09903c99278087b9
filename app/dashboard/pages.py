"""Rendering: the Jinja2 environment (autoescaping on), security headers, and the route
class that turns the dashboard's errors into pages (a redirect to the log-in form, a 404
page) instead of the API's JSON."""

from __future__ import annotations

import json
import math
from collections.abc import Callable, Coroutine
from datetime import UTC, datetime
from functools import lru_cache
from pathlib import Path
from typing import Any

import jinja2
from fastapi import Request, Response
from fastapi.exceptions import RequestValidationError
from fastapi.responses import HTMLResponse, RedirectResponse
from fastapi.routing import APIRoute
from starlette.exceptions import HTTPException as StarletteHTTPException

from app.core.errors import AppError
from app.dashboard.auth import DashboardUser

HERE = Path(__file__).parent
STATIC = HERE / "static"
LOGIN_URL = "/admin/login"
# Only this origin: no inline script or style, no external font, image or connection.
CSP = (
    "default-src 'self'; script-src 'self'; style-src 'self'; img-src 'self'; "
    "font-src 'self'; connect-src 'self'; object-src 'none'; base-uri 'none'; "
    "form-action 'self'; frame-ancestors 'none'"
)
SECURITY_HEADERS = {
    "Content-Security-Policy": CSP,
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}
NAV = (
    ("/admin", "Overview"),
    ("/admin/requests", "Requests"),
    ("/admin/review", "Needs review"),
    ("/admin/jobs", "Jobs"),
    ("/admin/datasets", "Datasets"),
    ("/admin/models", "Models"),
    ("/admin/audit", "Audit"),
    ("/admin/webhooks", "Webhooks"),
)


class LoginRequired(Exception):
    """No valid session: the browser goes to the log-in form."""


class PageError(Exception):
    """A refusal shown as a page with this status (CSRF, role)."""

    def __init__(self, status_code: int, message: str) -> None:
        super().__init__(message)
        self.status_code = status_code
        self.message = message


NONE = "\u2013"  # an en dash: no value


def _duration(seconds: Any) -> str:
    """3d 4h, 2h 5m, 4m 10s, 0.8s, <0.1s."""
    if not isinstance(seconds, int | float) or not math.isfinite(seconds):
        return NONE
    s = abs(float(seconds))
    if 0 < s < 0.05:
        out = "<0.1s"  # not "0.0s", which reads as "nothing"
    elif s < 10:
        out = f"{s:.1f}s"
    elif s < 3600:
        out = f"{int(s // 60)}m {int(s % 60)}s" if s >= 60 else f"{int(s)}s"
    elif s < 86400:
        out = f"{int(s // 3600)}h {int(s % 3600 // 60)}m"
    else:
        out = f"{int(s // 86400)}d {int(s % 86400 // 3600)}h"
    return f"-{out}" if seconds < 0 else out


def _when(value: Any) -> str:
    if not isinstance(value, datetime):
        return NONE
    return value.astimezone(UTC).strftime("%Y-%m-%d %H:%M UTC")


def _iso(value: Any) -> str:
    return value.astimezone(UTC).isoformat() if isinstance(value, datetime) else ""


def _num(value: Any, digits: int = 3) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return NONE if value is None else str(value)
    if isinstance(value, int):
        return f"{value:,}"
    return f"{value:,.{digits}f}" if math.isfinite(value) else NONE


def _pct(value: Any) -> str:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return NONE
    return f"{100 * value:.1f}%"


def _size(value: Any) -> str:
    """Bytes in binary units: 512 B, 3.4 KiB, 12.0 MiB, 1.50 GiB."""
    if isinstance(value, bool) or not isinstance(value, int | float) or value < 0:
        return NONE
    if value < 1024:
        return f"{int(value)} B"
    for unit, scale in (("KiB", 1024), ("MiB", 1024**2), ("GiB", 1024**3)):
        if value < scale * 1024 or unit == "GiB":
            n = value / scale
            return f"{n:.2f} {unit}" if unit == "GiB" else f"{n:.1f} {unit}"
    return NONE  # unreachable: GiB takes every larger value


def _short(value: Any, n: int = 8) -> str:
    return str(value)[:n] if value else NONE


def _data_line(value: Any, n: int = 50) -> str:
    """An event's data on one line, for a table cell: `key=value, ...` (strings bare, the
    rest as compact JSON), cut at `n` characters with an ellipsis."""
    if value in (None, {}, []):
        return NONE

    def one(v: Any) -> str:
        return v if isinstance(v, str) else json.dumps(v, ensure_ascii=False, default=str)

    if isinstance(value, dict):
        line = ", ".join(f"{k}={one(v)}" for k, v in value.items())
    else:
        line = one(value)
    return line if len(line) <= n else line[: n - 1].rstrip(" ,") + "\u2026"


def _json_pretty(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, indent=2, default=str)


@lru_cache
def environment() -> jinja2.Environment:
    env = jinja2.Environment(
        loader=jinja2.FileSystemLoader(HERE / "templates"),
        autoescape=True,
        undefined=jinja2.StrictUndefined,
        trim_blocks=True,
        lstrip_blocks=True,
    )
    env.filters |= {
        "duration": _duration,
        "when": _when,
        "iso": _iso,
        "num": _num,
        "pct": _pct,
        "short": _short,
        "size": _size,
        "data_line": _data_line,
        "json_pretty": _json_pretty,
    }
    env.globals["nav"] = NAV
    return env


def secure(response: Response) -> Response:
    for k, v in SECURITY_HEADERS.items():
        response.headers.setdefault(k, v)
    return response


def render(
    request: Request,
    template: str,
    user: DashboardUser | None,
    status_code: int = 200,
    **context: Any,
) -> HTMLResponse:
    context.setdefault("flash", None)
    context.setdefault("flash_error", None)
    context.setdefault("charts", {})
    html = (
        environment()
        .get_template(f"dashboard/{template}")
        .render(request_path=request.url.path, user=user, **context)
    )
    return secure(HTMLResponse(html, status_code=status_code))  # type: ignore[return-value]


def error_page(request: Request, status_code: int, message: str) -> Response:
    user = request.scope.get("dashboard_user")
    return render(
        request,
        "error.html",
        user if isinstance(user, DashboardUser) else None,
        status_code=status_code,
        status=status_code,
        message=message,
    )


def login_redirect(request: Request) -> Response:
    response = RedirectResponse(LOGIN_URL, status_code=303)
    return secure(response)


class DashboardRoute(APIRoute):
    """Dashboard routes answer with pages: no session redirects to the log-in form,
    refusals and bad input are 4xx pages, and every response carries the CSP."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def route(request: Request) -> Response:
            try:
                response = await handler(request)
            except LoginRequired:
                return login_redirect(request)
            except PageError as exc:
                return error_page(request, exc.status_code, exc.message)
            except AppError as exc:
                return error_page(request, exc.status_code, exc.message)
            except RequestValidationError as exc:
                fields = ", ".join(
                    ".".join(str(p) for p in e.get("loc", ())[1:]) for e in exc.errors()[:5]
                )
                return error_page(request, 400, f"invalid input: {fields or 'the request'}")
            except StarletteHTTPException as exc:
                return error_page(request, exc.status_code, str(exc.detail))
            return secure(response)

        return route
