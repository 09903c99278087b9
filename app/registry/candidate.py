"""Shared by unlearning, feature and retrain jobs: load what a job works on, and turn a
candidate manifest into a version, a report and a decision (promote, review, or a
fallback retrain job of its own)."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import func, select, update
from sqlalchemy.orm import Session

from app.core.db import enqueue, session_scope
from app.core.storage import get_store
from app.datasets import service as datasets
from app.jobs import service as jobs
from app.ml.sisa import SisaManifest
from app.models import (
    Dataset,
    DeletionRequest,
    Job,
    Lineage,
    MLModel,
    ModelVersion,
    Record,
    RequestModel,
)
from app.registry import artifacts
from app.registry import service as registry
from app.requests.lifecycle import advance
from app.requests.service import TERMINAL, transition
from app.verification import service as verification
from app.verification.service import Check

WORKER = "worker"
log = logging.getLogger(__name__)


@dataclass
class JobContext:
    """A job's snapshot of its model: current lineage (record, shard, slice, split,
    active) sorted by record id, the production manifest, and its requests."""

    job_id: str
    model_id: str
    config: dict[str, Any]
    ds: Dataset
    base_version: int
    new_version: int
    manifest_rel: str
    request_ids: list[str]
    features: list[tuple[str, str]]  # (feature, request id) of feature requests
    ids: np.ndarray
    shard: np.ndarray
    slc: np.ndarray
    is_train: np.ndarray
    is_active: np.ndarray
    retrain_estimate: float | None
    attempt: int | None = None  # the execution's fencing token (Job.attempts)

    @property
    def retained_mask(self) -> np.ndarray:
        return np.asarray(self.is_train & self.is_active, dtype=bool)

    @property
    def forgotten(self) -> np.ndarray:
        return np.asarray(self.ids[self.is_train & ~self.is_active], dtype=np.int64)

    @property
    def test_ids(self) -> np.ndarray:
        return np.asarray(self.ids[~self.is_train & self.is_active], dtype=np.int64)


def next_version(session: Session, model_id: str) -> int:
    top = session.scalar(
        select(func.max(ModelVersion.version)).where(ModelVersion.model_id == model_id)
    )
    return int(top or 0) + 1


def load_context(session: Session, job: Job, stage: str) -> JobContext:
    """Mark the job's requests as `stage` (unlearning | retraining) and snapshot."""
    rms = session.scalars(select(RequestModel).where(RequestModel.job_id == job.id)).all()
    request_ids = sorted({rm.request_id for rm in rms})
    model = session.get(MLModel, job.model_id)
    assert model is not None
    if model.production_version is None:
        raise RuntimeError(f"model {model.name} has no production version to start from")
    base = registry.get_version(session, model, model.production_version)
    for rm in rms:
        rm.status = stage
        # "Before" is the version this job starts from (an earlier job may have moved
        # production on since the request was planned).
        rm.from_version = model.production_version
    features: list[tuple[str, str]] = []
    for req in session.scalars(select(DeletionRequest).where(DeletionRequest.id.in_(request_ids))):
        if req.kind == "feature" and req.feature:
            features.append((req.feature, req.id))
        if req.status not in TERMINAL and req.status != "erasing":
            if stage == "unlearning" and req.status == "planned":
                transition(session, req, "unlearning", WORKER, job_id=job.id)
            elif stage == "retraining":
                transition(session, req, "retraining", WORKER, job_id=job.id)
    lineage = session.execute(
        select(Lineage.record_id, Lineage.shard, Lineage.slice, Lineage.split, Record.status)
        .join(Record, Record.id == Lineage.record_id)
        .where(Lineage.model_id == model.id, Lineage.to_version.is_(None))
        .order_by(Lineage.record_id)
    ).all()
    ds = datasets.get(session, model.dataset_id)
    session.expunge(ds)
    train_job = session.scalars(
        select(Job).where(Job.model_id == model.id, Job.kind == "train", Job.status == "succeeded")
    ).first()
    return JobContext(
        job_id=job.id,
        model_id=model.id,
        config=model.config,
        ds=ds,
        base_version=model.production_version,
        new_version=next_version(session, model.id),
        manifest_rel=base.manifest_path,
        request_ids=request_ids,
        features=sorted(features),
        ids=np.asarray([r[0] for r in lineage], dtype=np.int64),
        shard=np.asarray([r[1] for r in lineage], dtype=np.int64),
        slc=np.asarray([r[2] for r in lineage], dtype=np.int64),
        is_train=np.asarray([r[3] == "train" for r in lineage], dtype=bool),
        is_active=np.asarray([r[4] == "active" for r in lineage], dtype=bool),
        retrain_estimate=float(train_job.cost.get("wall_seconds", 0.0)) if train_job else None,
        attempt=job.attempts,
    )


def enqueue_retrain(
    session: Session,
    model_id: str,
    actor: str,
    reason: str,
    mitigation: dict[str, Any] | None = None,
) -> Job:
    """A fallback retraining job of its own (kind and method `retrain`); with
    `mitigation` ({"flagged": [{column, group, ...}]}) the retrain upweights those groups."""
    result: dict[str, Any] = {"reason": reason}
    if mitigation is not None:
        result["mitigation"] = mitigation
    job = Job(kind="retrain", model_id=model_id, method="retrain", result=result)
    session.add(job)
    session.flush()
    enqueue(session, "palimpsest.run_retrain", job.id, queue="gpu")
    return job


@dataclass
class Candidate:
    manifest: SisaManifest
    rel: str
    checks: dict[str, Check]
    metrics: dict[str, Any]
    result: dict[str, Any]  # engine outcome: "method", "approximate", ...
    forgotten: np.ndarray  # records this version no longer reaches (lineage closes)
    removed_features: list[dict[str, str]]
    allow_retrain: bool
    device: str
    compute_seconds: float
    wall_seconds: float


def begin_verification(ctx: JobContext) -> None:
    """The candidate exists: its requests are `verifying` while the checks run."""
    with session_scope() as s:
        jobs.claim(s, ctx.job_id, ctx.attempt)
        for rm in s.scalars(select(RequestModel).where(RequestModel.job_id == ctx.job_id)):
            rm.status = "verifying"
        for req in s.scalars(
            select(DeletionRequest).where(DeletionRequest.id.in_(ctx.request_ids))
        ):
            if req.status in ("planned", "unlearning", "retraining"):
                transition(s, req, "verifying", WORKER, job_id=ctx.job_id)


def conclude(ctx: JobContext, cand: Candidate) -> None:
    """Persist the candidate, report and decide; update requests; unlock; advance."""
    method = str(cand.result.get("method", "sisa"))
    approximate = bool(cand.result.get("approximate", False))
    with session_scope() as s:
        # Fenced: if this execution was taken over, it concludes nothing (LeaseLost), so
        # a job promotes at most one version however often it ran.
        job = jobs.claim(s, ctx.job_id, ctx.attempt)
        model = s.get(MLModel, ctx.model_id)
        assert model is not None
        mv = ModelVersion(
            model_id=ctx.model_id,
            version=ctx.new_version,
            status="candidate",
            created_by_job=ctx.job_id,
            metrics=cand.metrics | {"unlearning": cand.result},
            manifest=artifacts.summary(cand.manifest, cand.rel),
            manifest_path=cand.rel,
            schema={
                "features": cand.manifest.feature_spec.to_dict(),
                "label_classes": ctx.config["resolved"]["label_classes"],
                "removed_features": cand.removed_features,
            },
        )
        s.add(mv)
        # An approximate version's weights still derive from the forgotten records: it
        # stays in their lineage, so erasure purges it unless it serves.
        closes_at = ctx.new_version if approximate else ctx.base_version
        forgotten = [int(x) for x in cand.forgotten]
        for i in range(0, len(forgotten), 900):
            s.execute(
                update(Lineage)
                .where(
                    Lineage.model_id == ctx.model_id,
                    Lineage.record_id.in_(forgotten[i : i + 900]),
                    Lineage.to_version.is_(None),
                )
                .values(to_version=closes_at)
            )
        s.flush()
        report = verification.save_report(
            s,
            model,
            ctx.job_id,
            ctx.new_version,
            ctx.base_version,
            cand.checks,
            approximate=approximate,
            allow_retrain=cand.allow_retrain,
        )
        rms = s.scalars(select(RequestModel).where(RequestModel.job_id == ctx.job_id)).all()
        retrain_job: Job | None = None
        if report.decision == "promote":
            registry.promote(s, model, mv, WORKER, reason=f"{job.kind} job {ctx.job_id}")
        elif report.decision == "retrain":
            mv.status = "rejected"
            retrain_job = enqueue_retrain(
                s, ctx.model_id, WORKER, f"verification of version {ctx.new_version} failed"
            )
        for rm in rms:
            rm.to_version = ctx.new_version
            rm.method = method
            rm.report_id = report.id
            if retrain_job is not None:
                rm.status, rm.job_id = "retraining", retrain_job.id
            else:
                rm.status = "promoted" if report.decision == "promote" else "needs_review"
        job.report_id = report.id
        job.result = {
            **job.result,
            "version": ctx.new_version,
            "decision": report.decision,
            "method": method,
            "unlearning": cand.result,
            "forgotten_records": len(forgotten),
            "unlearn_seconds": cand.compute_seconds,
            **({"retrain_job": retrain_job.id} if retrain_job else {}),
        }
        jobs.finish(
            s,
            job,
            ok=True,
            wall_seconds=cand.wall_seconds,
            device=cand.device,
            device_seconds=cand.compute_seconds,
            retrain_estimate_seconds=ctx.retrain_estimate,
            energy_joules=cand.result.get("energy_joules"),
        )
        jobs.unlock(s, ctx.model_id, ctx.job_id)
        if retrain_job is not None:
            for req in s.scalars(
                select(DeletionRequest).where(DeletionRequest.id.in_(ctx.request_ids))
            ):
                if req.status not in TERMINAL:
                    transition(s, req, "retraining", WORKER, job_id=retrain_job.id)
        else:
            advance(s, ctx.request_ids)
    try:
        artifacts.drop_other_manifests(get_store(), ctx.model_id, ctx.new_version, cand.rel)
    except Exception:  # tidying only: the version is committed
        log.warning("could not remove stale manifests of %s", ctx.model_id, exc_info=True)
