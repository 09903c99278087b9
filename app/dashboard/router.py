"""`/admin`: the dashboard's routes. They parse and authorize, then call the view layer
(`views`, `ops_views`) or, for actions, the domain services through it; the request's
session dependency owns the transaction, as for the API."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Annotated, Any

from fastapi import APIRouter, Depends, FastAPI, Form, Query, Request
from fastapi.responses import FileResponse, JSONResponse, RedirectResponse, Response

from app.api.deps import SessionDep, SettingsDep
from app.core.errors import AppError, NotFound
from app.core.storage import get_store
from app.dashboard import actions, auth, ops_views, reports, views
from app.dashboard.auth import DashboardUser, SessionCodec
from app.dashboard.pages import (
    STATIC,
    DashboardRoute,
    LoginRequired,
    PageError,
    render,
    secure,
)
from app.dashboard.rows import JOB_STATUSES
from app.requests import states

router = APIRouter(prefix="/admin", route_class=DashboardRoute, include_in_schema=False)

FLASH = {
    "approve": "Approved: the candidate versions are promoted and erasure follows.",
    "reject": "Rejected: the models are retrained from scratch without the records.",
    "mitigate": (
        "Mitigation started: a mitigated retraining is on its way; its candidate is "
        "verified before it can serve."
    ),
    "extend": "The deadline is extended.",
    "cancel": "The request is cancelled and its quarantine released.",
}
STATIC_FILES = {
    "dashboard.js": "text/javascript",
    "dashboard.css": "text/css",
    "plotly.css": "text/css",
    "favicon.svg": "image/svg+xml",
}


def codec(settings: SettingsDep) -> SessionCodec:
    return SessionCodec(settings)


CodecDep = Annotated[SessionCodec, Depends(codec)]


def current_user(request: Request, session: SessionDep, sessions: CodecDep) -> DashboardUser:
    user = auth.user_from_cookie(session, sessions, request.cookies.get(auth.COOKIE))
    if user is None:
        raise LoginRequired
    request.scope["dashboard_user"] = user
    return user


UserDep = Annotated[DashboardUser, Depends(current_user)]
CsrfField = Annotated[str, Form(max_length=200)]


def admin_action(user: DashboardUser, sessions: SessionCodec, csrf_token: str) -> None:
    """Every POST: the session's CSRF token, then the role (auditors change nothing)."""
    if not sessions.csrf_ok(user, csrf_token):
        raise PageError(403, "The form's security token is missing or wrong. Reload the page.")
    if not user.is_admin:
        raise PageError(403, "Auditors can see everything and change nothing.")


def plotly_bundle() -> Path:
    import plotly

    return Path(plotly.__file__).parent / "package_data" / "plotly.min.js"


# -- static -----------------------------------------------------------------------------


@router.get("/static/plotly.min.js")
def plotly_js() -> Response:
    """Plotly's bundle from the installed package: no CDN, works offline."""
    return FileResponse(
        plotly_bundle(),
        media_type="text/javascript",
        headers={"Cache-Control": "public, max-age=86400"},
    )


@router.get("/static/{name}")
def static_file(name: str) -> Response:
    if name not in STATIC_FILES:
        raise NotFound(f"no static file {name!r}")
    return FileResponse(
        STATIC / name,
        media_type=STATIC_FILES[name],
        headers={"Cache-Control": "public, max-age=300"},
    )


# -- log-in -----------------------------------------------------------------------------


def _next_url(value: str | None) -> str:
    """Only a path inside the dashboard (no scheme, no host, no '//')."""
    if value and value.startswith("/admin") and "//" not in value and "\\" not in value:
        return value[:500]
    return "/admin"


@router.get("/login")
def login_form(
    request: Request, next: Annotated[str | None, Query(max_length=500)] = None
) -> Response:
    return render(request, "login.html", None, next=_next_url(next), error=None)


@router.post("/login")
def login(
    request: Request,
    session: SessionDep,
    sessions: CodecDep,
    key: Annotated[str, Form(max_length=1000)] = "",
    next: Annotated[str, Form(max_length=500)] = "",
) -> Response:
    # A log-in posted from another site (login CSRF) is refused where the browser says so.
    if request.headers.get("sec-fetch-site") == "cross-site":
        raise PageError(403, "Log-in forms from other sites are refused.")
    api_key = auth.key_for_login(session, key)
    if api_key is None:
        return render(
            request,
            "login.html",
            None,
            status_code=401,
            next=_next_url(next),
            error="That key is not a live admin or auditor key.",
        )
    auth.record_login(session, api_key)
    value, expires = sessions.encode(api_key.id, api_key.role)
    response = RedirectResponse(_next_url(next), status_code=303)
    response.set_cookie(
        auth.COOKIE,
        value,
        max_age=max(0, int(expires - time.time())),
        path=auth.COOKIE_PATH,
        httponly=True,
        samesite="strict",
        secure=request.url.scheme == "https" or sessions.dash.cookie_secure,
    )
    return secure(response)


@router.post("/logout")
def logout(user: UserDep, sessions: CodecDep, csrf_token: CsrfField = "") -> Response:
    if not sessions.csrf_ok(user, csrf_token):
        raise PageError(403, "The form's security token is missing or wrong. Reload the page.")
    response = RedirectResponse("/admin/login", status_code=303)
    response.delete_cookie(auth.COOKIE, path=auth.COOKIE_PATH, httponly=True, samesite="strict")
    return secure(response)


# -- overview and requests --------------------------------------------------------------


@router.get("")
def overview(request: Request, user: UserDep, session: SessionDep) -> Response:
    data = views.overview(session)
    return render(
        request, "overview.html", user, ov=data, charts=data.charts, statuses=states.STATUSES
    )


@router.get("/requests")
def request_list(
    request: Request,
    user: UserDep,
    session: SessionDep,
    status: Annotated[str | None, Query(max_length=40)] = None,
    kind: Annotated[str | None, Query(max_length=40)] = None,
    q: Annotated[str | None, Query(max_length=400)] = None,
    page: Annotated[str | None, Query(max_length=10)] = None,
) -> Response:
    filters = views.parse_filters(status, kind, q, page)
    return render(
        request,
        "requests.html",
        user,
        page=views.request_list(session, filters),
        statuses=states.STATUSES,
        kinds=views.KINDS,
    )


def _detail(
    request: Request,
    user: DashboardUser,
    session: SessionDep,
    settings: SettingsDep,
    request_id: str,
    status_code: int = 200,
    flash: str | None = None,
    flash_error: str | None = None,
) -> Response:
    detail = views.request_detail(session, request_id, user.caller, settings)
    return render(
        request,
        "request_detail.html",
        user,
        status_code=status_code,
        d=detail,
        charts=detail.charts,
        flash=flash,
        flash_error=flash_error,
    )


@router.get("/requests/{request_id}")
def request_detail(
    request: Request,
    request_id: str,
    user: UserDep,
    session: SessionDep,
    settings: SettingsDep,
    done: Annotated[str | None, Query(max_length=20)] = None,
) -> Response:
    return _detail(request, user, session, settings, request_id, flash=FLASH.get(done or ""))


@router.get("/requests/{request_id}/certificate")
def certificate(request_id: str, user: UserDep, session: SessionDep) -> Response:
    doc = views.certificate_document(session, request_id, user.caller)
    return JSONResponse(
        doc,
        headers={
            "Content-Disposition": f'attachment; filename="certificate-{request_id}.json"',
            "Cache-Control": "no-store",
        },
    )


def _act(
    request: Request,
    user: DashboardUser,
    session: SessionDep,
    settings: SettingsDep,
    request_id: str,
    done: str,
    action: Any,
) -> Response:
    """Run an action; on success back to the detail page with a flash (303), on a refusal
    by the service the detail page again, with the service's reason and status."""
    try:
        action()
    except AppError as exc:
        if exc.status_code == 404:
            raise
        return _detail(
            request,
            user,
            session,
            settings,
            request_id,
            status_code=exc.status_code,
            flash_error=exc.message,
        )
    return secure(RedirectResponse(f"/admin/requests/{request_id}?done={done}", status_code=303))


@router.post("/requests/{request_id}/review")
def review(
    request: Request,
    request_id: str,
    user: UserDep,
    session: SessionDep,
    settings: SettingsDep,
    sessions: CodecDep,
    csrf_token: CsrfField = "",
    action: Annotated[str, Form(max_length=20)] = "",
    note: Annotated[str, Form(max_length=4000)] = "",
    mitigation: Annotated[str, Form(max_length=20)] = "",
) -> Response:
    admin_action(user, sessions, csrf_token)
    return _act(
        request,
        user,
        session,
        settings,
        request_id,
        action if action in FLASH else "approve",
        lambda: actions.review(
            session,
            request_id,
            user.caller,
            action,
            note.strip() or None,
            mitigation=mitigation or None,
        ),
    )


@router.post("/requests/{request_id}/extend")
def extend(
    request: Request,
    request_id: str,
    user: UserDep,
    session: SessionDep,
    settings: SettingsDep,
    sessions: CodecDep,
    csrf_token: CsrfField = "",
    reason: Annotated[str, Form(max_length=4000)] = "",
    days: Annotated[str, Form(max_length=10)] = "",
) -> Response:
    admin_action(user, sessions, csrf_token)

    def run() -> None:
        n = actions.parse_days(days)
        actions.extend(session, request_id, user.caller, reason, n, settings)

    return _act(request, user, session, settings, request_id, "extend", run)


@router.post("/requests/{request_id}/cancel")
def cancel(
    request: Request,
    request_id: str,
    user: UserDep,
    session: SessionDep,
    settings: SettingsDep,
    sessions: CodecDep,
    csrf_token: CsrfField = "",
) -> Response:
    admin_action(user, sessions, csrf_token)
    return _act(
        request,
        user,
        session,
        settings,
        request_id,
        "cancel",
        lambda: actions.cancel(session, request_id, user.caller),
    )


@router.get("/review")
def review_queue(request: Request, user: UserDep, session: SessionDep) -> Response:
    items = views.review_queue(session)
    charts: dict[str, Any] = {}
    for item in items:
        for rep in item.reports:
            charts |= rep.charts
    return render(request, "review.html", user, items=items, charts=charts)


@router.get("/reports/{report_id}")
def report(request: Request, report_id: str, user: UserDep, session: SessionDep) -> Response:
    rep = reports.report_view(session, report_id)
    return render(request, "report.html", user, r=rep, charts=rep.charts)


# -- jobs -------------------------------------------------------------------------------


@router.get("/jobs.json")
def jobs_json(
    user: UserDep,
    session: SessionDep,
    ids: Annotated[str | None, Query(max_length=4000)] = None,
) -> Response:
    rows = (
        ops_views.jobs_by_id(session, ids.split(","))
        if ids
        else ops_views.job_list(session, limit=100)
    )
    return JSONResponse(
        {"jobs": [j.to_json() for j in rows]}, headers={"Cache-Control": "no-store"}
    )


@router.get("/jobs/{job_id}.json")
def job_json(job_id: str, user: UserDep, session: SessionDep) -> Response:
    detail = ops_views.job_detail(session, job_id)
    return JSONResponse(detail.job.to_json(), headers={"Cache-Control": "no-store"})


@router.get("/jobs")
def jobs(
    request: Request,
    user: UserDep,
    session: SessionDep,
    status: Annotated[str | None, Query(max_length=20)] = None,
) -> Response:
    rows = ops_views.job_list(session, status)
    return render(request, "jobs.html", user, jobs=rows, status=status or "", statuses=JOB_STATUSES)


@router.get("/jobs/{job_id}")
def job(request: Request, job_id: str, user: UserDep, session: SessionDep) -> Response:
    detail = ops_views.job_detail(session, job_id)
    return render(
        request,
        "job_detail.html",
        user,
        d=detail,
        result_json=json.dumps(detail.job.result, indent=2, sort_keys=True, default=str),
    )


# -- datasets, models, audit, webhooks --------------------------------------------------


@router.get("/datasets")
def datasets(request: Request, user: UserDep, session: SessionDep) -> Response:
    return render(request, "datasets.html", user, datasets=ops_views.dataset_list(session))


@router.get("/datasets/{dataset_id}")
def dataset(
    request: Request, dataset_id: str, user: UserDep, session: SessionDep, settings: SettingsDep
) -> Response:
    detail = ops_views.dataset_detail(session, get_store(settings), dataset_id)
    return render(request, "dataset_detail.html", user, d=detail)


@router.get("/models")
def models(request: Request, user: UserDep, session: SessionDep) -> Response:
    return render(request, "models.html", user, models=ops_views.model_list(session))


@router.get("/models/{name}")
def model(request: Request, name: str, user: UserDep, session: SessionDep) -> Response:
    return render(request, "model_detail.html", user, d=ops_views.model_detail(session, name))


@router.get("/audit")
def audit_log(
    request: Request,
    user: UserDep,
    session: SessionDep,
    cursor: Annotated[str | None, Query(max_length=40)] = None,
    action: Annotated[str | None, Query(max_length=100)] = None,
) -> Response:
    page = ops_views.audit_page(session, ops_views.parse_cursor(cursor), action)
    return render(request, "audit.html", user, page=page)


@router.get("/webhooks")
def webhooks(
    request: Request,
    user: UserDep,
    session: SessionDep,
    failed: Annotated[str | None, Query(max_length=5)] = None,
) -> Response:
    page = ops_views.webhooks_page(session, failed_only=failed in ("1", "true", "yes"))
    return render(request, "webhooks.html", user, page=page)


@router.get("/{path:path}")
def not_found(request: Request, path: str, user: UserDep) -> Response:
    if path == "":
        return secure(RedirectResponse("/admin", status_code=303))
    raise NotFound("There is no such page in the dashboard.")


def mount(app: FastAPI) -> None:
    """Serve the dashboard at `/admin`."""
    app.include_router(router)
