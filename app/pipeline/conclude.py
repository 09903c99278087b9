"""Concluding a job: the candidate becomes a version with a report and a decision
(promote, review, or a fallback retrain job of its own), the job finishes, its model
unlocks, and the requests are told the outcome (`RequestEvents`)."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

import numpy as np
from sqlalchemy import update

from app.audit import service as audit
from app.core.chunks import in_chunks
from app.core.db import session_scope
from app.jobs import lease, routing
from app.jobs import service as jobs
from app.ml.sisa import SisaManifest
from app.models import Job, Lineage, MLModel, ModelVersion
from app.pipeline import ingest
from app.pipeline.inputs import JobInputs
from app.pipeline.outcome import Outcome, RequestEvents
from app.pipeline.start import WORKER
from app.registry import artifacts
from app.registry import service as registry
from app.verification import service as verification
from app.verification.service import Check
from app.webhooks import service as webhooks

log = logging.getLogger(__name__)


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


def conclude(inputs: JobInputs, cand: Candidate, events: RequestEvents) -> str:
    """Persist the candidate, report and decide; finish and unlock; tell the requests.
    Returns the report's decision."""
    t0 = time.perf_counter()
    method = str(cand.result.get("method", "sisa"))
    approximate = bool(cand.result.get("approximate", False))
    with session_scope() as s:
        # Fenced: if this execution was taken over, it concludes nothing (LeaseLost), so
        # a job promotes at most one version however often it ran.
        job = jobs.claim(s, inputs.job_id, inputs.attempt)
        model = s.get(MLModel, inputs.model_id)
        assert model is not None
        mv = ModelVersion(
            model_id=inputs.model_id,
            version=inputs.new_version,
            status="candidate",
            created_by_job=inputs.job_id,
            metrics=cand.metrics | {"unlearning": cand.result},
            manifest=artifacts.summary(cand.manifest, cand.rel),
            manifest_path=cand.rel,
            schema={
                "features": cand.manifest.feature_spec.to_dict(),
                "label_classes": list(inputs.spec.label_classes),
                "removed_features": cand.removed_features,
            },
        )
        s.add(mv)
        # An approximate version's weights still derive from the forgotten records: it
        # stays in their lineage, so erasure purges it unless it serves.
        closes_at = inputs.new_version if approximate else inputs.base_version
        forgotten = [int(x) for x in cand.forgotten]
        for chunk in in_chunks(forgotten):
            s.execute(
                update(Lineage)
                .where(
                    Lineage.model_id == inputs.model_id,
                    Lineage.record_id.in_(chunk),
                    Lineage.to_version.is_(None),
                )
                .values(to_version=closes_at)
            )
        s.flush()
        report = verification.save_report(
            s,
            model,
            inputs.job_id,
            inputs.new_version,
            inputs.base_version,
            cand.checks,
            approximate=approximate,
            allow_retrain=cand.allow_retrain,
        )
        retrain_job: Job | None = None
        decision = str(report.decision)
        if report.decision == "promote":
            registry.promote(s, model, mv, WORKER, reason=f"{job.kind} job {inputs.job_id}")
        elif report.decision == "retrain":
            mv.status = "rejected"
            retrain_job = routing.create_retrain(
                s, inputs.model_id, f"verification of version {inputs.new_version} failed"
            )
        job.report_id = report.id
        inputs.phases.add("conclude", time.perf_counter() - t0)
        job.result = {
            **job.result,
            "version": inputs.new_version,
            "decision": report.decision,
            "method": method,
            "unlearning": cand.result,
            "forgotten_records": len(forgotten),
            "unlearn_seconds": cand.compute_seconds,
            "phases": inputs.phases.to_dict(),
            **({"retrain_job": retrain_job.id} if retrain_job else {}),
        }
        jobs.finish(
            s,
            job,
            ok=True,
            wall_seconds=max(0.0, time.time() - inputs.started),
            device=cand.device,
            device_seconds=cand.compute_seconds,
            retrain_estimate_seconds=inputs.retrain_estimate,
            energy_joules=cand.result.get("energy_joules"),
        )
        jobs.unlock(s, inputs.model_id, inputs.job_id)
        events.concluded(
            s,
            Outcome(
                job_id=inputs.job_id,
                model_id=inputs.model_id,
                request_ids=inputs.request_ids,
                decision="retrain" if retrain_job is not None else _decision(report.decision),
                version=inputs.new_version,
                method=method,
                report_id=report.id,
                retrain_job_id=retrain_job.id if retrain_job else None,
            ),
        )
    try:
        artifacts.drop_other_manifests(inputs.store, inputs.model_id, inputs.new_version, cand.rel)
    except Exception:  # tidying only: the version is committed
        log.warning("could not remove stale manifests of %s", inputs.model_id, exc_info=True)
    return decision


def _decision(decision: str) -> Any:
    return "promote" if decision == "promote" else "needs_review"


def nothing_to_forget(inputs: JobInputs, events: RequestEvents) -> None:
    """The job's records are already out of the production version (a batch-mate's job
    removed them): the current version stands, nothing is retrained."""
    with session_scope() as s:
        job = jobs.claim(s, inputs.job_id, lease.token(inputs.job_id))
        job.result = {
            **job.result,
            "version": inputs.base_version,
            "decision": "nothing_to_forget",
            "phases": inputs.phases.to_dict(),
        }
        jobs.finish(
            s,
            job,
            ok=True,
            wall_seconds=max(0.0, time.time() - inputs.started),
            device="cpu",
            device_seconds=0.0,
        )
        jobs.unlock(s, inputs.model_id, inputs.job_id)
        events.concluded(
            s,
            Outcome(
                job_id=inputs.job_id,
                model_id=inputs.model_id,
                request_ids=inputs.request_ids,
                decision="nothing_to_forget",
                version=inputs.base_version,
                method="none",
            ),
        )


def fail_job(job_id: str, error: str, events: RequestEvents, token: int | None = None) -> None:
    """Final failure after retries: the job fails, its model unlocks, its requests are
    told. With `token`, only while that execution still owns the job (not after a
    takeover)."""
    with session_scope() as s:
        job = s.get(Job, job_id, with_for_update=True)
        if job is None or job.status in ("succeeded", "failed"):
            return
        if token is not None and not lease.owned(job, token):
            return
        jobs.finish(s, job, ok=False, error=error[:2000])
        if job.model_id is not None:
            jobs.unlock(s, job.model_id, job_id)
        model = s.get(MLModel, job.model_id) if job.model_id is not None else None
        if job.kind == "train" and model is not None:
            model.status = "failed"
        if job.kind == "ingest":
            ingest.fail_dataset(s, job, error)
        request_ids = jobs.request_ids(s, job_id)
        events.failed(s, job_id, error)
        audit.record(
            s,
            actor=WORKER,
            action="job.failed",
            entity_type="job",
            entity_id=job_id,
            data={"kind": job.kind, "error": error[:500]},
        )
        webhooks.job_failed(s, job, request_ids)


def fall_back_to_retrain(
    inputs: JobInputs, events: RequestEvents, method: str, error: BaseException
) -> None:
    """A fast method failed on this model (a bad setting, a numerical fault): erasure is
    a legal duty, so no setting may block it. The job concludes by handing its requests to
    an exact retraining job of their own, and the failure is on record."""
    if isinstance(error, lease.LeaseLost):
        raise error
    reason = f"{method} failed: {type(error).__name__}: {error}"[:500]
    log.warning("job %s: %s; falling back to exact retraining", inputs.job_id, reason)
    with session_scope() as s:
        job = jobs.claim(s, inputs.job_id, inputs.attempt)
        retrain = routing.create_retrain(s, inputs.model_id, reason)
        job.result = {
            **job.result,
            "version": inputs.base_version,
            "decision": "retrain",
            "method": method,
            "method_error": reason,
            "retrain_job": retrain.id,
            "phases": inputs.phases.to_dict(),
        }
        jobs.finish(
            s,
            job,
            ok=True,
            wall_seconds=max(0.0, time.time() - inputs.started),
            device="cpu",
            device_seconds=0.0,
            retrain_estimate_seconds=inputs.retrain_estimate,
        )
        jobs.unlock(s, inputs.model_id, inputs.job_id)
        audit.record(
            s,
            actor=WORKER,
            action="job.fell_back",
            entity_type="job",
            entity_id=inputs.job_id,
            data={"method": method, "error": reason, "retrain_job": retrain.id},
        )
        events.concluded(
            s,
            Outcome(
                job_id=inputs.job_id,
                model_id=inputs.model_id,
                request_ids=inputs.request_ids,
                decision="retrain",
                version=inputs.base_version,
                method=method,
                retrain_job_id=retrain.id,
            ),
        )
