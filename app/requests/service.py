"""Deletion requests: intake, views, cancel, extend, and status transitions."""

from __future__ import annotations

import base64
from collections.abc import Sequence
from datetime import datetime, timedelta
from typing import Any

from sqlalchemy import select
from sqlalchemy.exc import IntegrityError
from sqlalchemy.orm import Session

from app.api.deps import Caller
from app.audit import service as audit
from app.core.db import enqueue
from app.core.errors import BadRequest, Conflict, Forbidden, NotFound, Unprocessable
from app.core.security import subject_key
from app.core.settings import Settings
from app.integrations import service as integrations
from app.jobs import routing
from app.models import (
    DeletionRequest,
    Job,
    MLModel,
    ModelVersion,
    Record,
    Report,
    RequestModel,
)
from app.models.base import new_id, utcnow
from app.requests import states, targets
from app.requests.lifecycle import advance
from app.requests.schemas import (
    DeletionRequestIn,
    DeletionRequestOut,
    RequestAccepted,
    RequestModelOut,
    RequestPage,
)
from app.requests.transitions import transition
from app.webhooks import service as webhooks

TERMINAL = states.TERMINAL
CANCELLABLE = {"received", "planned"}


def request_cost(costs: Sequence[dict[str, Any]]) -> dict[str, float | None]:
    """A request's jobs summed (batch-mates share a job, so they share its cost), and
    the compute saved against retraining every model from scratch."""

    def total(key: str) -> float | None:
        values = [float(c[key]) for c in costs if c.get(key) is not None]
        return round(sum(values), 3) if values else None

    device, retrain = total("device_seconds"), total("retrain_estimate_seconds")
    return {
        "wall_seconds": total("wall_seconds"),
        "device_seconds": device,
        "energy_joules": total("energy_joules"),
        "retrain_estimate_seconds": retrain,
        "saved_seconds": round(retrain - device, 3) if device is not None and retrain else None,
    }


def _fingerprint(req: DeletionRequest) -> tuple[object, ...]:
    """What a stored request asked, in the form `_body_fingerprint` gives a new body."""
    return (
        req.kind,
        req.subject_key,
        tuple(req.record_ids or ()),
        req.source,
        req.feature,
        req.model_name,
        req.dataset_id,
        req.reason,
        req.external_ref,
    )


def _body_fingerprint(body: DeletionRequestIn, settings: Settings) -> tuple[object, ...]:
    key = subject_key(body.subject_id, settings.pepper) if body.subject_id else None
    return (
        body.kind,
        key,
        tuple(sorted(set(body.record_ids))) if body.record_ids else (),
        body.source,
        body.feature,
        body.model,
        body.dataset_id,
        body.reason,
        body.external_ref,
    )


def _find_records(
    session: Session, body: DeletionRequestIn, settings: Settings
) -> tuple[str | None, int]:
    """The subject key and how many live records the target covers now. A target we do
    not hold is not refused: the answer must not reveal whose data exists (the request
    completes with nothing to erase, and its certificate says so)."""
    if body.kind == "subject":
        assert body.subject_id is not None
        key = subject_key(body.subject_id, settings.pepper)
        return key, targets.count(session, targets.Target("subject", subject_key=key))
    if body.kind == "records":
        # Not looked up here: a list of 100,000 ids is resolved by planning, in steps
        # (ids found in several datasets reject the request there).
        return None, 0
    if body.kind == "source":
        return None, targets.count(session, targets.Target("source", source=body.source))
    assert body.kind == "feature" and body.feature is not None and body.model is not None
    model = session.scalars(select(MLModel).where(MLModel.name == body.model)).first()
    if model is None:
        raise NotFound(f"no model named {body.model!r}", code="model_not_found")
    if body.feature not in model.config.get("feature_columns", []):
        raise Unprocessable(
            f"{body.feature!r} is not a feature column of model {body.model!r}",
            code="unknown_feature",
        )
    removed = {d["feature"] for d in model.config["resolved"].get("removed_features", [])}
    media = {
        e["column"]: e["kind"] for e in model.config["resolved"]["feature_spec"].get("media", [])
    }
    if body.tokens is not None and media.get(body.feature) != "text_bag":
        raise Unprocessable(
            f"'tokens' needs a text column; {body.feature!r} is not one of model {body.model!r}",
            code="not_a_text_column",
        )
    if body.feature in removed:
        raise Unprocessable(
            f"model {body.model!r} was already made blind to {body.feature!r}",
            code="feature_already_removed",
        )
    pending = session.scalars(
        select(DeletionRequest.id).where(
            DeletionRequest.kind == "feature",
            DeletionRequest.model_name == body.model,
            DeletionRequest.feature == body.feature,
            DeletionRequest.status.not_in(TERMINAL),
        )
    ).first()
    if pending is not None:
        raise Conflict(
            f"request {pending} already removes {body.feature!r} from {body.model!r}",
            code="feature_request_pending",
        )
    return None, 0


def request_row(
    body: DeletionRequestIn,
    caller: Caller,
    settings: Settings,
    idempotency_key: str | None,
    key: str | None,
    n: int,
) -> dict[str, Any]:
    """A new request's columns (both intake paths store exactly these)."""
    now = utcnow()
    return {
        "id": new_id(),
        "kind": body.kind,
        "status": "received",
        "subject_key": key,
        "record_ids": sorted(set(body.record_ids)) if body.record_ids else None,
        "source": body.source,
        "feature": body.feature,
        "tokens": sorted({t.casefold() for t in body.tokens}) if body.tokens else None,
        "model_name": body.model,
        "dataset_id": body.dataset_id,
        "reason": body.reason,
        "external_ref": body.external_ref,
        "api_key_id": caller.key_id,
        "idempotency_key": idempotency_key,
        "received_at": now,
        "due_at": now + timedelta(days=settings.deadline_days),
        "n_records": n,
    }


def received_entry(
    request_id: str, caller: Caller, kind: str, n: int, due_at: datetime
) -> audit.Entry:
    """The `request.received` audit event."""
    return audit.Entry(
        actor=caller.actor,
        action="request.received",
        entity_type="deletion_request",
        entity_id=request_id,
        data={"kind": kind, "records": n, "due_at": due_at.isoformat()},
    )


def replay(prior: DeletionRequest, body: DeletionRequestIn, settings: Settings) -> RequestAccepted:
    """The answer to a retry with a used Idempotency-Key: the first request, if the body
    asks the same; else 409."""
    if _fingerprint(prior) != _body_fingerprint(body, settings):
        raise Conflict(
            "this Idempotency-Key was already used with a different request body",
            code="idempotency_key_reused",
        )
    return RequestAccepted(
        id=prior.id, status=prior.status, received_at=prior.received_at, due_at=prior.due_at
    )


def check_idempotency_key(idempotency_key: str | None) -> None:
    if idempotency_key is not None and not 1 <= len(idempotency_key) <= 200:
        raise BadRequest(
            "Idempotency-Key must be 1 to 200 characters", code="invalid_idempotency_key"
        )


def create(
    session: Session,
    body: DeletionRequestIn,
    caller: Caller,
    settings: Settings,
    idempotency_key: str | None,
) -> tuple[RequestAccepted, bool]:
    """Returns the accepted request and whether it was newly created."""
    check_idempotency_key(idempotency_key)
    if idempotency_key is not None:
        prior = session.scalars(
            select(DeletionRequest).where(
                DeletionRequest.api_key_id == caller.key_id,
                DeletionRequest.idempotency_key == idempotency_key,
            )
        ).first()
        if prior is not None:
            return replay(prior, body, settings), False
    if body.kind == "feature" and caller.role != "admin":
        raise Forbidden("feature requests are admin-only")
    if body.dataset_id is not None and body.kind != "records":
        raise Unprocessable("dataset_id only narrows 'records' requests", code="invalid")
    key, n = _find_records(session, body, settings)
    req = DeletionRequest(**request_row(body, caller, settings, idempotency_key, key, n))
    session.add(req)
    try:
        session.flush()
    except IntegrityError as exc:  # a concurrent retry with the same Idempotency-Key won
        raise Conflict(
            "a request with this Idempotency-Key is being created", code="idempotency_conflict"
        ) from exc
    audit.record_many(session, [received_entry(req.id, caller, req.kind, n, req.due_at)])
    webhooks.request_received(session, req)
    enqueue(session, "palimpsest.plan_request", req.id)
    return RequestAccepted(
        id=req.id, status=req.status, received_at=req.received_at, due_at=req.due_at
    ), True


def get(session: Session, request_id: str, caller: Caller) -> DeletionRequest:
    req = session.get(DeletionRequest, request_id)
    # Portals see only their own requests; others' look like they do not exist.
    if req is None or (caller.role == "portal" and req.api_key_id != caller.key_id):
        raise NotFound(f"no deletion request {request_id!r}", code="request_not_found")
    return req


def to_out(
    session: Session, req: DeletionRequest, caller: Caller | None = None
) -> DeletionRequestOut:
    """The request's view. A portal does not see how many records its target covered
    (that would tell it whether the service holds the person); admins and auditors do."""
    rows = session.execute(
        select(RequestModel, MLModel.name)
        .join(MLModel, MLModel.id == RequestModel.model_id)
        .where(RequestModel.request_id == req.id)
        .order_by(RequestModel.id)
    ).all()
    job_ids = {rm.job_id for rm, _ in rows if rm.job_id}
    costs = session.scalars(select(Job.cost).where(Job.id.in_(job_ids))).all() if job_ids else []
    return DeletionRequestOut(
        id=req.id,
        kind=req.kind,
        status=req.status,
        received_at=req.received_at,
        due_at=req.due_at,
        completed_at=req.completed_at,
        models=[
            RequestModelOut(
                model=name,
                status=rm.status,
                job_id=rm.job_id,
                from_version=rm.from_version,
                to_version=rm.to_version,
                method=rm.method,
                report_id=rm.report_id,
            )
            for rm, name in rows
        ],
        n_records=None if caller is not None and caller.role == "portal" else req.n_records,
        data_held=(
            None
            if (caller is not None and caller.role == "portal") or req.status == "received"
            else req.n_records > 0
        ),
        source=req.source,
        feature=req.feature,
        tokens=req.tokens,
        model=req.model_name,
        external_ref=req.external_ref,
        extended=req.extended_at is not None,
        overdue=req.status not in TERMINAL and req.due_at <= utcnow(),
        cost=request_cost(costs),
        error=req.error,
        callback=integrations.view(session, req),
    )


def _cursor(req: DeletionRequest) -> str:
    return base64.urlsafe_b64encode(f"{req.received_at.isoformat()}|{req.id}".encode()).decode()


def list_page(
    session: Session, caller: Caller, status: str | None, limit: int, cursor: str | None
) -> RequestPage:
    q = select(DeletionRequest).order_by(
        DeletionRequest.received_at.desc(), DeletionRequest.id.desc()
    )
    if caller.role == "portal":
        q = q.where(DeletionRequest.api_key_id == caller.key_id)
    if status:
        q = q.where(DeletionRequest.status == status)
    if cursor:
        try:
            at_s, rid = base64.urlsafe_b64decode(cursor.encode()).decode().split("|", 1)
            at = datetime.fromisoformat(at_s)
            if at.tzinfo is None:
                raise ValueError("naive timestamp")
        except ValueError as exc:
            raise BadRequest("invalid cursor", code="invalid_cursor") from exc
        q = q.where(
            (DeletionRequest.received_at < at)
            | ((DeletionRequest.received_at == at) & (DeletionRequest.id < rid))
        )
    rows = session.scalars(q.limit(limit + 1)).all()
    items = [to_out(session, r, caller) for r in rows[:limit]]
    return RequestPage(
        items=items, next_cursor=_cursor(rows[limit - 1]) if len(rows) > limit else None
    )


def retry(session: Session, req: DeletionRequest, caller: Caller) -> None:
    """An admin retries a failed request: every model whose job failed retrains from
    scratch (the exact method, which no setting can block), or a request that failed
    before reaching any model is planned again. Its records stayed quarantined."""
    if req.status != "failed":
        raise Conflict(
            f"only a failed request can be retried (it is {req.status!r})", code="not_failed"
        )
    rms = session.scalars(select(RequestModel).where(RequestModel.request_id == req.id)).all()
    failed = [rm for rm in rms if rm.status == "failed"]
    jobs: dict[str, str] = {}
    for rm in failed:
        model = session.get(MLModel, rm.model_id, with_for_update=True)
        assert model is not None
        if model.production_version is None:
            raise Conflict(f"model {model.name!r} has no production version", code="not_ready")
        if rm.model_id not in jobs:
            jobs[rm.model_id] = routing.create_retrain(
                session, rm.model_id, f"retry of failed request {req.id}"
            ).id
        rm.status, rm.job_id = "retraining", jobs[rm.model_id]
    audit.record(
        session,
        actor=caller.actor,
        action="request.retried",
        entity_type="deletion_request",
        entity_id=req.id,
        data={"error": req.error, "retrain_jobs": sorted(jobs.values())},
    )
    req.error = None
    if failed:
        transition(session, req, "retraining", caller.actor, reopen=True, retry=True)
    elif not rms:
        transition(session, req, "received", caller.actor, reopen=True, retry=True)
        enqueue(session, "palimpsest.plan_request", req.id)
    else:
        raise Conflict("no model of this request failed; nothing to retry", code="not_failed")


def cancel(session: Session, req: DeletionRequest, caller: Caller) -> None:
    # Locked first: planning quarantines in steps, each holding this row, so the release
    # below sees every step that committed and no later step starts (it re-checks).
    session.refresh(req, with_for_update=True)
    if req.status not in CANCELLABLE:
        raise Conflict(
            f"a request in status {req.status!r} can no longer be cancelled", code="not_cancellable"
        )
    # Release the quarantine this request placed.
    for rec in session.scalars(select(Record).where(Record.quarantined_by == req.id)):
        rec.status = "active"
        rec.quarantined_by = None
    for rm in session.scalars(select(RequestModel).where(RequestModel.request_id == req.id)):
        session.delete(rm)
    transition(session, req, "cancelled", caller.actor)


def extend(
    session: Session,
    req: DeletionRequest,
    caller: Caller,
    reason: str,
    days: int | None,
    settings: Settings,
) -> None:
    if req.extended_at is not None:
        raise Conflict("the deadline was already extended once", code="already_extended")
    if req.status in TERMINAL:
        raise Conflict(f"the request is {req.status}", code="request_closed")
    add = days or settings.max_extension_days
    if add > settings.max_extension_days:
        raise Unprocessable(
            f"an extension is at most {settings.max_extension_days} days", code="invalid"
        )
    old = req.due_at
    req.due_at = req.due_at + timedelta(days=add)
    req.extended_at = utcnow()
    req.extension_reason = reason
    audit.record(
        session,
        actor=caller.actor,
        action="request.extended",
        entity_type="deletion_request",
        entity_id=req.id,
        data={"from": old.isoformat(), "to": req.due_at.isoformat(), "reason": reason},
    )


MITIGATIONS = {
    "reweight": "retrain upweighting the groups the fairness check flagged",
    "group_dro": "group-robust retrain: every group weighted by its loss (group DRO, frozen)",
    "thresholds": "retrain, then per-group decision thresholds fitted on retained rows "
    "(post-processing)",
}


def _mitigation_candidates(
    session: Session, model_id: str, req: DeletionRequest
) -> list[tuple[str, ModelVersion]]:
    """(kind, version) of every verified candidate a mitigation made for this request's
    model since the request arrived (each has a report: it was verified like any other),
    newest first."""
    jobs = session.scalars(
        select(Job)
        .where(
            Job.model_id == model_id,
            Job.kind == "retrain",
            Job.status == "succeeded",
            Job.created_at >= req.received_at,
            Job.report_id.is_not(None),
        )
        .order_by(Job.created_at.desc())
    ).all()
    out: list[tuple[str, ModelVersion]] = []
    for job in jobs:
        result = job.result or {}
        mit = (result.get("unlearning") or {}).get("mitigation") or {}
        if mit and result.get("version") is not None:
            mv = session.scalars(
                select(ModelVersion).where(
                    ModelVersion.model_id == model_id,
                    ModelVersion.version == int(result["version"]),
                )
            ).first()
            if mv is not None and mv.status == "candidate":
                out.append((str(mit.get("kind") or "reweight"), mv))
    return out


def review(
    session: Session,
    req: DeletionRequest,
    caller: Caller,
    action: str,
    note: str | None,
    *,
    mitigation: str | None = None,
) -> None:
    """An admin settles a request in `needs_review`: approve promotes each candidate as
    it is; reject retrains from scratch instead; mitigate, for now, also retrains (group
    reweighting arrives with the fairness checks)."""
    from app.registry import service as registry

    if action == "reject":
        mitigation = None  # a plain retrain: a named mitigation has no meaning here
    if req.status != "needs_review":
        raise Conflict(
            f"only a request in 'needs_review' can be reviewed (it is {req.status!r})",
            code="not_in_review",
        )
    rms = session.scalars(
        select(RequestModel).where(
            RequestModel.request_id == req.id, RequestModel.status == "needs_review"
        )
    ).all()
    audit.record(
        session,
        actor=caller.actor,
        action="request.reviewed",
        entity_type="deletion_request",
        entity_id=req.id,
        data={
            "action": action,
            "note": note,
            "models": [rm.model_id for rm in rms],
            **(
                {
                    "mitigation": MITIGATIONS[mitigation or "reweight"],
                    "mitigation_kind": mitigation or "reweight",
                }
                if action == "mitigate"
                else {}
            ),
        },
    )
    for rm in rms:
        model = session.get(MLModel, rm.model_id, with_for_update=True)
        assert model is not None
        if model.locked_by_job is not None:
            raise Conflict(
                f"a job is running on model {model.name!r}; try again when it finishes",
                code="model_busy",
            )
        if action == "approve":
            made = _mitigation_candidates(session, model.id, req)
            version = rm.to_version
            if mitigation is not None:
                chosen = [mv.version for kind, mv in made if kind == mitigation]
                if not chosen:
                    raise Conflict(
                        f"no verified {mitigation!r} candidate for this request",
                        code="no_candidate",
                    )
                version = chosen[0]
            if version is None:
                raise Conflict("the model has no candidate version", code="no_candidate")
            mv = registry.get_version(session, model, version)
            registry.promote(session, model, mv, caller.actor, reason=f"review of {req.id}")
            rm.status, rm.to_version = "promoted", version
            if mitigation is not None:
                job = session.get(Job, mv.created_by_job) if mv.created_by_job else None
                rm.report_id = job.report_id if job is not None else rm.report_id
            # The other mitigation candidates made for this request will not serve.
            for _, other in made:
                if other.version != version:
                    other.status = "rejected"
        else:
            if rm.to_version is not None and action != "mitigate":
                # A mitigation keeps the candidate under review: the admin may still
                # choose it over the mitigated one (side by side on the review page).
                mv = registry.get_version(session, model, rm.to_version)
                if mv.status == "candidate":
                    mv.status = "rejected"
            plan: dict[str, Any] = {}
            if action == "mitigate":
                report = session.get(Report, rm.report_id) if rm.report_id else None
                fair = (report.checks.get("fairness", {}) if report else {}).get("metrics", {})
                plan = {"flagged": list(fair.get("flagged", [])), "kind": mitigation or "reweight"}
            job = routing.create_retrain(
                session,
                model.id,
                f"review {action} of {req.id}",
                plan if action == "mitigate" else None,
            )
            rm.status, rm.job_id = "retraining", job.id
    if action == "approve":
        advance(session, [req.id])
    else:
        transition(session, req, "retraining", caller.actor, action=action)
