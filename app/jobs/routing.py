"""The one place that maps a job to the Celery task that runs it, and its queue.

Everything that sends a job (creation, batching release, the resume sweep, a takeover)
asks here, so a new kind or method of job is wired in one line.
"""

from __future__ import annotations

from typing import Any

from sqlalchemy.orm import Session

from app.core.db import enqueue
from app.models import Job

GPU = "gpu"
# (kind, method) first, then kind alone: a feature-removal job is an `unlearn` job of
# its own task; every other unlearning method shares one task.
_BY_KIND_METHOD = {("unlearn", "feature"): "palimpsest.run_feature"}
_BY_KIND = {
    "train": "palimpsest.train_model",
    "unlearn": "palimpsest.run_unlearning",
    "retrain": "palimpsest.run_retrain",
    "ingest": "palimpsest.ingest_dataset",
}
# Parsing an upload is CPU and I/O work: it never waits behind (or holds up) the
# accelerator's queue.
_QUEUE_BY_KIND = {"ingest": "default"}
SHARD_TASK = "palimpsest.sisa_shard"
CHORD_CALLBACK = "palimpsest.sisa_finish"


def task_for(kind: str, method: str | None) -> tuple[str, str]:
    """The task name and queue of a job of this kind and method."""
    name = _BY_KIND_METHOD.get((kind, method or "")) or _BY_KIND.get(kind)
    if name is None:
        raise ValueError(f"no task runs jobs of kind {kind!r}")
    return name, _QUEUE_BY_KIND.get(kind, GPU)


def send(session: Session, job: Job, countdown: float | None = None) -> None:
    """Send `job` to its task once the session commits."""
    name, queue = task_for(job.kind, job.method)
    enqueue(session, name, job.id, queue=queue, countdown=countdown)


def create(
    session: Session,
    *,
    kind: str,
    method: str | None,
    model_id: str | None = None,
    dataset_id: str | None = None,
    result: dict[str, Any] | None = None,
    send_now: bool = True,
) -> Job:
    """A new pending job (flushed, so it has an id), sent after commit unless the caller
    holds it (batching). A job works on a model, or (ingest) on a dataset."""
    job = Job(
        kind=kind, model_id=model_id, dataset_id=dataset_id, method=method, result=result or {}
    )
    session.add(job)
    session.flush()
    if send_now:
        send(session, job)
    return job


def create_retrain(
    session: Session, model_id: str, reason: str, mitigation: dict[str, Any] | None = None
) -> Job:
    """The one way a retraining job is made: from scratch on the retained records; with
    `mitigation` ({"flagged": [{column, group, ...}]}) the retrain reweights those groups."""
    result: dict[str, Any] = {"reason": reason}
    if mitigation is not None:
        result["mitigation"] = mitigation
    return create(session, kind="retrain", model_id=model_id, method="retrain", result=result)
