"""What workers do to a request: plan it, advance it as models finish, erase its data."""

from __future__ import annotations

import logging

from sqlalchemy import delete, select, update
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.certificates import service as certificates
from app.core.db import enqueue
from app.core.storage import ArtifactStore
from app.datasets import service as datasets
from app.models import (
    Dataset,
    DeletionRequest,
    Job,
    Lineage,
    MLModel,
    Record,
    RequestModel,
    Source,
    Subject,
)
from app.registry import references
from app.registry import service as registry
from app.registry.monolithic import method_of
from app.requests import batching
from app.requests.service import transition

log = logging.getLogger(__name__)
WORKER = "worker"


def target_record_ids(session: Session, req: DeletionRequest) -> list[int]:
    """Ids of the records a request covers that still exist."""
    live = Record.status.in_(("active", "quarantined"))
    if req.kind == "subject":
        q = (
            select(Record.id)
            .join(Subject, Subject.id == Record.subject_id)
            .where(Subject.subject_key == req.subject_key, live)
        )
    elif req.kind == "records":
        ids = req.record_ids or []
        out: list[int] = []
        for chunk in range(0, len(ids), 900):
            q = select(Record.id).where(Record.external_id.in_(ids[chunk : chunk + 900]), live)
            if req.dataset_id:
                q = q.where(Record.dataset_id == req.dataset_id)
            out.extend(session.scalars(q))
        return sorted(out)
    elif req.kind == "source":
        q = (
            select(Record.id)
            .join(Source, Source.id == Record.source_id)
            .where(Source.name == req.source, live)
        )
    else:
        return []
    return sorted(session.scalars(q))


def _in_chunks(ids: list[int], size: int = 900) -> list[list[int]]:
    return [ids[i : i + size] for i in range(0, len(ids), size)]


def plan(session: Session, request_id: str) -> None:
    """received -> planned: quarantine the records, find every model they reach, attach
    each model to an unlearning job (joining a pending one: that is batching, and the
    model's batching policy decides when the job is sent)."""
    req = session.get(DeletionRequest, request_id, with_for_update=True)
    if req is None or req.status != "received":
        return  # idempotent: already planned, cancelled or gone
    if req.kind == "feature":
        _plan_feature(session, req)
        return
    ids = target_record_ids(session, req)
    datasets_hit = set()
    for chunk in _in_chunks(ids):
        datasets_hit |= set(
            session.scalars(select(Record.dataset_id).where(Record.id.in_(chunk)).distinct())
        )
    # A model still training on these datasets read its data before the quarantine:
    # wait for it, so its first version is planned like any other.
    training = session.scalars(
        select(MLModel.id).where(MLModel.dataset_id.in_(datasets_hit), MLModel.status == "training")
    ).first()
    if training is not None:
        enqueue(session, "palimpsest.plan_request", req.id, countdown=2.0)
        return
    for chunk in _in_chunks(ids):
        session.execute(
            update(Record)
            .where(Record.id.in_(chunk), Record.status == "active")
            .values(status="quarantined", quarantined_by=req.id)
        )
    models: set[str] = set()
    for chunk in _in_chunks(ids):
        models |= set(
            session.scalars(
                select(Lineage.model_id)
                .where(
                    Lineage.record_id.in_(chunk),
                    Lineage.split == "train",
                    Lineage.to_version.is_(None),
                )
                .distinct()
            )
        )
    for model_id in sorted(models):
        model = session.get(MLModel, model_id)
        assert model is not None
        # Join the model's pending job (batching) or open the next one.
        job = batching.open_job(session, model)
        new = job is None
        if job is None:
            job = Job(kind="unlearn", model_id=model_id, method=method_of(model.config))
            session.add(job)
            session.flush()
        session.add(
            RequestModel(
                request_id=req.id,
                model_id=model_id,
                status="planned",
                job_id=job.id,
                from_version=model.production_version,
            )
        )
        session.flush()
        batching.schedule(session, job, model, new=new)
    req.n_records = len(ids)
    transition(session, req, "planned", WORKER, records=len(ids), models=len(models))
    if not models:
        transition(session, req, "erasing", WORKER)
        enqueue(session, "palimpsest.erase_request", req.id)


def _plan_feature(session: Session, req: DeletionRequest) -> None:
    """A feature request quarantines no records: one job of its own on the named model."""
    model = session.scalars(select(MLModel).where(MLModel.name == req.model_name)).first()
    if model is None or model.status == "failed" or model.production_version is None:
        if model is not None and model.status == "training":
            enqueue(session, "palimpsest.plan_request", req.id, countdown=2.0)
            return
        req.error = f"model {req.model_name!r} has no production version"
        transition(session, req, "rejected", WORKER, reason=req.error)
        return
    job = Job(kind="unlearn", model_id=model.id, method="feature")
    session.add(job)
    session.flush()
    enqueue(session, "palimpsest.run_unlearning", job.id, queue="gpu")
    session.add(
        RequestModel(
            request_id=req.id,
            model_id=model.id,
            status="planned",
            job_id=job.id,
            from_version=model.production_version,
        )
    )
    transition(session, req, "planned", WORKER, feature=req.feature, models=1)


def advance(session: Session, request_ids: list[str]) -> None:
    """After a job: a request whose every model holds a promoted version moves to
    `erasing`; one with a model in review moves to `needs_review`."""
    for rid in request_ids:
        req = session.get(DeletionRequest, rid)
        if req is None or req.status in ("completed", "cancelled", "failed", "rejected", "erasing"):
            continue
        statuses = set(
            session.scalars(select(RequestModel.status).where(RequestModel.request_id == rid))
        )
        if statuses <= {"promoted"}:
            transition(session, req, "erasing", WORKER)
            enqueue(session, "palimpsest.erase_request", rid)
        elif "failed" in statuses:
            transition(session, req, "failed", WORKER)
        elif "needs_review" in statuses:
            transition(session, req, "needs_review", WORKER)


def erase(session: Session, store: ArtifactStore, request_id: str) -> None:
    """erasing -> completed: rows and Parquet bytes physically removed, and the artifacts
    of every version trained on them purged (no rollback can bring them back)."""
    req = session.get(DeletionRequest, request_id, with_for_update=True)
    if req is None or req.status != "erasing":
        return
    ids = target_record_ids(session, req)
    by_dataset: dict[str, dict[int, list[int]]] = {}
    for chunk in _in_chunks(ids):
        for rid, ds_id, part in session.execute(
            select(Record.id, Record.dataset_id, Record.partition).where(Record.id.in_(chunk))
        ):
            by_dataset.setdefault(ds_id, {}).setdefault(part, []).append(rid)
    # Versions that were trained on these records: purge their artifacts.
    reached: dict[str, set[int]] = {}
    for chunk in _in_chunks(ids):
        for model_id, lo, hi in session.execute(
            select(Lineage.model_id, Lineage.from_version, Lineage.to_version).where(
                Lineage.record_id.in_(chunk), Lineage.split == "train"
            )
        ):
            model = session.get(MLModel, model_id)
            top = hi if hi is not None else (model.production_version if model else lo) or lo
            reached.setdefault(model_id, set()).update(range(lo, top + 1))
    for model_id, versions in reached.items():
        registry.purge_versions(session, store, model_id, versions, WORKER)
        # Reference models (forgetting-check shadows) trained on these records go too.
        references.drop_trained_on(store, model_id, ids)
    erased = 0
    for ds_id, parts in by_dataset.items():
        ds = session.get(Dataset, ds_id, with_for_update=True)  # serialise rewrites of a dataset
        assert ds is not None
        all_ids = sorted(i for v in parts.values() for i in v)
        erased += datasets.erase_from_partitions(store, ds, all_ids, set(parts))
        for chunk in _in_chunks(all_ids):
            session.execute(delete(Lineage).where(Lineage.record_id.in_(chunk)))
            session.execute(delete(Record).where(Record.id.in_(chunk)))
    if req.kind == "subject" and req.subject_key:
        session.execute(delete(Subject).where(Subject.subject_key == req.subject_key))
    if req.kind == "source" and req.source:
        session.execute(update(Source).where(Source.name == req.source).values(status="withdrawn"))
    erasure = {
        "records": len(ids),
        "parquet_rows": erased,
        "versions_purged": {k: sorted(v) for k, v in reached.items()},
    }
    audit.record(
        session,
        actor=WORKER,
        action="request.erased",
        entity_type="deletion_request",
        entity_id=req.id,
        data=erasure,
    )
    transition(session, req, "completed", WORKER)
    # Same transaction as the completion: no completed request without its certificate.
    # Issued after the transition so the certificate carries the exact `completed_at`.
    certificates.issue(session, store, req, erasure)
