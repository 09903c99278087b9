"""The dashboard's service layer: every query the pages need, returned as plain view
models (dataclasses) that templates render. Actions go through the domain services
(`app.requests.service`, see `actions`), so their state checks, audit events and webhooks
apply."""

from __future__ import annotations

from dataclasses import dataclass, field
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import func, or_, select
from sqlalchemy.orm import Session

from app.api.deps import Caller
from app.certificates import service as certificates
from app.core import signing
from app.core.errors import BadRequest, NotFound
from app.core.settings import Settings
from app.dashboard import charts
from app.dashboard.reports import CandidateRow, ReportView, candidate_rows, report_view
from app.dashboard.rows import ACTIVE_JOB, JobRow, RequestRow, as_float, job_rows, request_row
from app.integrations.schemas import CallbackOut
from app.models import (
    AuditEvent,
    Certificate,
    DeletionRequest,
    Job,
    Report,
    RequestModel,
)
from app.models.base import utcnow
from app.requests import service as requests
from app.requests import states

KINDS = ("subject", "records", "source", "feature")
DUE_SOON_DAYS = 7
PAGE_SIZE = 50
MAX_PAGE = 10_000

# -- overview ---------------------------------------------------------------------------


@dataclass
class ComputeSaved:
    """Unlearning and retraining jobs against the full retrains they replaced."""

    jobs: int
    device_seconds: float
    retrain_estimate_seconds: float

    @property
    def saved_seconds(self) -> float:
        return self.retrain_estimate_seconds - self.device_seconds

    @property
    def saved_share(self) -> float | None:
        if self.retrain_estimate_seconds <= 0:
            return None
        return self.saved_seconds / self.retrain_estimate_seconds


@dataclass
class Overview:
    counts: dict[str, int]
    due_soon: list[RequestRow]
    overdue: list[RequestRow]
    running_jobs: list[JobRow]
    completions: list[tuple[str, int]]
    compute: ComputeSaved
    charts: dict[str, charts.Figure]

    @property
    def total(self) -> int:
        return sum(self.counts.values())

    @property
    def open(self) -> int:
        return sum(n for s, n in self.counts.items() if s not in states.TERMINAL)


def status_counts(session: Session) -> dict[str, int]:
    """Requests per status; every status of the lifecycle is present, zeros included."""
    counts = dict.fromkeys(states.STATUSES, 0)
    rows = session.execute(
        select(DeletionRequest.status, func.count()).group_by(DeletionRequest.status)
    ).tuples()
    for status, n in rows:
        counts[status] = counts.get(status, 0) + int(n)
    return counts


def deadlines(
    session: Session, now: datetime, days: float = DUE_SOON_DAYS, limit: int = 100
) -> tuple[list[RequestRow], list[RequestRow]]:
    """Open requests due within `days` (not yet overdue) and those past their deadline,
    soonest first."""
    rows = session.scalars(
        select(DeletionRequest)
        .where(
            DeletionRequest.status.not_in(states.TERMINAL),
            DeletionRequest.due_at <= now + timedelta(days=days),
        )
        .order_by(DeletionRequest.due_at, DeletionRequest.id)
        .limit(2 * limit)
    ).all()
    views = [request_row(r, now) for r in rows]
    return [v for v in views if not v.overdue][:limit], [v for v in views if v.overdue][:limit]


def completions_per_day(session: Session, now: datetime, days: int = 30) -> list[tuple[str, int]]:
    """Completed requests per UTC day over the last `days` days, oldest first, zeros
    included (counted here rather than in SQL: date functions differ per database)."""
    start = (now - timedelta(days=days - 1)).replace(hour=0, minute=0, second=0, microsecond=0)
    per_day = {(start + timedelta(days=i)).date().isoformat(): 0 for i in range(days)}
    for at in session.scalars(
        select(DeletionRequest.completed_at).where(
            DeletionRequest.status == "completed", DeletionRequest.completed_at >= start
        )
    ):
        if at is not None:
            day = at.date().isoformat()
            if day in per_day:
                per_day[day] += 1
    return list(per_day.items())


def compute_saved(session: Session) -> ComputeSaved:
    """Every finished unlearning or retraining job that recorded both its device time and
    the estimate of retraining from scratch: what was spent against what was avoided."""
    n, device, retrain = 0, 0.0, 0.0
    for cost in session.scalars(
        select(Job.cost).where(Job.kind != "train", Job.status == "succeeded")
    ):
        d = as_float((cost or {}).get("device_seconds"))
        r = as_float((cost or {}).get("retrain_estimate_seconds"))
        if d is None or r is None:
            continue
        n, device, retrain = n + 1, device + d, retrain + r
    return ComputeSaved(n, round(device, 3), round(retrain, 3))


def active_jobs(session: Session, limit: int = 50) -> list[JobRow]:
    jobs = session.scalars(
        select(Job)
        .where(Job.status.in_(ACTIVE_JOB))
        .order_by(Job.status.desc(), Job.created_at, Job.id)
        .limit(limit)
    ).all()
    return job_rows(session, jobs)


def overview(session: Session, now: datetime | None = None) -> Overview:
    now = now or utcnow()
    due_soon, overdue = deadlines(session, now)
    completions = completions_per_day(session, now)
    return Overview(
        counts=status_counts(session),
        due_soon=due_soon,
        overdue=overdue,
        running_jobs=active_jobs(session),
        completions=completions,
        compute=compute_saved(session),
        charts={"chart-completions": charts.completions_per_day(completions)},
    )


# -- requests ---------------------------------------------------------------------------


@dataclass
class RequestFilters:
    status: str | None = None
    kind: str | None = None
    q: str | None = None
    page: int = 1

    def query(self, page: int | None = None) -> dict[str, str]:
        out = {k: v for k, v in (("status", self.status), ("kind", self.kind), ("q", self.q)) if v}
        if (page or self.page) > 1:
            out["page"] = str(page or self.page)
        return out


def parse_filters(
    status: str | None, kind: str | None, q: str | None, page: str | None
) -> RequestFilters:
    """Empty values mean "any"; unknown statuses or kinds and bad page numbers are a 400."""
    status, kind, q = (
        (status or "").strip() or None,
        (kind or "").strip() or None,
        (q or "").strip(),
    )
    if status is not None and status not in states.STATUSES:
        raise BadRequest(f"unknown status {status!r}", code="invalid_filter")
    if kind is not None and kind not in KINDS:
        raise BadRequest(f"unknown kind {kind!r}", code="invalid_filter")
    if len(q) > 200:
        raise BadRequest("the search text is at most 200 characters", code="invalid_filter")
    try:
        n = int(page) if page else 1
    except ValueError as exc:
        raise BadRequest("page must be a number", code="invalid_filter") from exc
    if not 1 <= n <= MAX_PAGE:
        raise BadRequest(f"page must be between 1 and {MAX_PAGE}", code="invalid_filter")
    return RequestFilters(status, kind, q or None, n)


@dataclass
class RequestList:
    rows: list[RequestRow]
    filters: RequestFilters
    has_next: bool
    total: int


def _escape_like(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


def request_list(
    session: Session, filters: RequestFilters, now: datetime | None = None, size: int = PAGE_SIZE
) -> RequestList:
    now = now or utcnow()
    q = select(DeletionRequest)
    if filters.status:
        q = q.where(DeletionRequest.status == filters.status)
    if filters.kind:
        q = q.where(DeletionRequest.kind == filters.kind)
    if filters.q:
        like = f"%{_escape_like(filters.q)}%"
        q = q.where(
            or_(
                DeletionRequest.id.like(like, escape="\\"),
                DeletionRequest.external_ref.like(like, escape="\\"),
                DeletionRequest.source.like(like, escape="\\"),
                DeletionRequest.feature.like(like, escape="\\"),
                DeletionRequest.model_name.like(like, escape="\\"),
                DeletionRequest.reason.like(like, escape="\\"),
            )
        )
    total = int(session.scalar(select(func.count()).select_from(q.subquery())) or 0)
    rows = session.scalars(
        q.order_by(DeletionRequest.received_at.desc(), DeletionRequest.id.desc())
        .offset((filters.page - 1) * size)
        .limit(size + 1)
    ).all()
    return RequestList(
        rows=[request_row(r, now) for r in rows[:size]],
        filters=filters,
        has_next=len(rows) > size,
        total=total,
    )


@dataclass
class TimelineEvent:
    at: datetime
    actor: str
    action: str
    from_status: str | None
    to_status: str | None
    detail: str


def _event_detail(ev: AuditEvent) -> str:
    d = ev.data or {}
    if ev.action == "request.extended":
        return f"deadline moved to {d.get('to', '?')}: {d.get('reason', '')}"
    if ev.action == "request.reviewed":
        note = f" ({d['note']})" if d.get("note") else ""
        return f"review: {d.get('action', '?')}{note}"
    if ev.action == "request.received":
        return f"{d.get('records', '?')} record(s), due {d.get('due_at', '?')}"
    extra = {k: v for k, v in d.items() if k not in ("from", "to")}
    return ", ".join(f"{k}: {v}" for k, v in sorted(extra.items()))[:300]


def timeline(session: Session, request_id: str) -> list[TimelineEvent]:
    events = session.scalars(
        select(AuditEvent)
        .where(AuditEvent.entity_type == "deletion_request", AuditEvent.entity_id == request_id)
        .order_by(AuditEvent.id)
    ).all()
    return [
        TimelineEvent(
            at=ev.at,
            actor=ev.actor,
            action=ev.action,
            from_status=str(ev.data["from"]) if ev.action.endswith("status_changed") else None,
            to_status=str(ev.data["to"]) if ev.action.endswith("status_changed") else None,
            detail=_event_detail(ev),
        )
        for ev in events
    ]


@dataclass
class CertificateStatus:
    state: str  # verified | invalid | none
    key_id: str | None = None
    reason: str | None = None
    issued_at: datetime | None = None


def certificate_status(session: Session, request_id: str, settings: Settings) -> CertificateStatus:
    """Checks the stored certificate's signature with the service's own public key."""
    cert = session.get(Certificate, request_id)
    if cert is None:
        return CertificateStatus("none")
    public = certificates.signing_key(settings).public_key()
    reason = signing.check(cert.body, public)
    return CertificateStatus(
        "verified" if reason is None else "invalid", cert.key_id, reason, cert.created_at
    )


@dataclass
class ModelProgress:
    model: str
    status: str
    job_id: str | None
    from_version: int | None
    to_version: int | None
    method: str | None
    report_id: str | None
    report_passed: bool | None = None
    report_decision: str | None = None


@dataclass
class RequestDetail:
    request: RequestRow
    reason: str | None
    external_ref: str | None
    extension_reason: str | None
    error: str | None
    cost: dict[str, float | None]
    models: list[ModelProgress]
    timeline: list[TimelineEvent]
    certificate: CertificateStatus
    reviews: list[ReportView]
    # Every candidate made for the request's models, side by side (review page).
    candidates: list[CandidateRow] = field(default_factory=list)
    # A privacy platform's callback (Fides), when the request came with one.
    callback: CallbackOut | None = None

    @property
    def can_review(self) -> bool:
        return self.request.status == "needs_review"

    @property
    def can_cancel(self) -> bool:
        return self.request.status in requests.CANCELLABLE

    @property
    def can_extend(self) -> bool:
        return self.request.open and not self.request.extended

    @property
    def charts(self) -> dict[str, charts.Figure]:
        out: dict[str, charts.Figure] = {}
        for r in self.reviews:
            out |= r.charts
        return out


def get_request(session: Session, request_id: str, caller: Caller) -> DeletionRequest:
    if len(request_id) > 64:
        raise NotFound("no such deletion request", code="request_not_found")
    return requests.get(session, request_id, caller)


def request_detail(
    session: Session,
    request_id: str,
    caller: Caller,
    settings: Settings,
    now: datetime | None = None,
) -> RequestDetail:
    now = now or utcnow()
    req = get_request(session, request_id, caller)
    out = requests.to_out(session, req)
    report_ids = {m.report_id for m in out.models if m.report_id}
    reports = (
        {r.id: r for r in session.scalars(select(Report).where(Report.id.in_(report_ids)))}
        if report_ids
        else {}
    )
    models = []
    for m in out.models:
        rep = reports.get(m.report_id or "")
        models.append(
            ModelProgress(
                model=m.model,
                status=m.status,
                job_id=m.job_id,
                from_version=m.from_version,
                to_version=m.to_version,
                method=m.method,
                report_id=m.report_id,
                report_passed=rep.passed if rep else None,
                report_decision=rep.decision if rep else None,
            )
        )
    reviews: list[ReportView] = []
    candidates: list[CandidateRow] = []
    if req.status == "needs_review":
        for mid in dict.fromkeys(
            rm.model_id
            for rm in session.scalars(
                select(RequestModel).where(
                    RequestModel.request_id == req.id, RequestModel.status == "needs_review"
                )
            )
        ):
            candidates += candidate_rows(session, mid, req.received_at)
        under_review = [
            m.report_id for m in out.models if m.status == "needs_review" and m.report_id
        ]
        for i, rid in enumerate(dict.fromkeys(under_review)):
            # The first report's charts take the report page's element ids.
            reviews.append(report_view(session, rid, suffix="" if i == 0 else f"-{rid}"))
    return RequestDetail(
        request=request_row(req, now),
        reason=req.reason,
        external_ref=req.external_ref,
        extension_reason=req.extension_reason,
        error=req.error,
        cost=out.cost,
        models=models,
        timeline=timeline(session, req.id),
        certificate=certificate_status(session, req.id, settings),
        reviews=reviews,
        candidates=candidates,
        callback=out.callback,
    )


def certificate_document(session: Session, request_id: str, caller: Caller) -> dict[str, Any]:
    return certificates.get_signed(session, get_request(session, request_id, caller))


# -- review -----------------------------------------------------------------------------


@dataclass
class ReviewItem:
    request: RequestRow
    reports: list[ReportView]


def review_queue(
    session: Session, now: datetime | None = None, limit: int = 50
) -> list[ReviewItem]:
    now = now or utcnow()
    reqs = session.scalars(
        select(DeletionRequest)
        .where(DeletionRequest.status == "needs_review")
        .order_by(DeletionRequest.due_at, DeletionRequest.id)
        .limit(limit)
    ).all()
    items = []
    for req in reqs:
        report_ids = session.scalars(
            select(RequestModel.report_id)
            .where(
                RequestModel.request_id == req.id,
                RequestModel.status == "needs_review",
                RequestModel.report_id.is_not(None),
            )
            .order_by(RequestModel.id)
        ).all()
        items.append(
            ReviewItem(
                request_row(req, now),
                [
                    report_view(session, rid, suffix=f"-{req.id}-{rid}")
                    for rid in dict.fromkeys(report_ids)
                    if rid
                ],
            )
        )
    return items
