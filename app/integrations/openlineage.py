"""OpenLineage run events from training and unlearning jobs (openlineage-python).

Off by default. `PALIMPSEST_OPENLINEAGE_TRANSPORT=http` posts each event to
`PALIMPSEST_OPENLINEAGE_URL` (the receiver's base URL; events go to `/api/v1/lineage`, as
Marquez and most receivers expect); `console` logs them. Each train, unlearn and retrain
job emits START when it begins and COMPLETE (or FAIL, with the error) when it ends, as a
run of the job `<model>.<kind>` in namespace PALIMPSEST_OPENLINEAGE_NAMESPACE. The input
is the dataset, `datasets/<name>`, with its version (`<dataset id>:<active records>`: it
changes with every erasure); a COMPLETE event's output is the model, `models/<name>`,
with the version the job wrote.

Events are collected in the job's transaction and emitted after it commits (nothing is
told of a run that rolled back); emitting is best effort: a receiver that is down costs
a short timeout and a log line, never a job.
"""

from __future__ import annotations

import functools
import logging
import uuid
from datetime import UTC, datetime
from typing import Any

from sqlalchemy import event, func, select
from sqlalchemy.orm import Session

from app.core.settings import get_settings
from app.models import Dataset, Job, MLModel, Record

log = logging.getLogger(__name__)
PRODUCER = "https://github.com/palimpsest/palimpsest"
KINDS = frozenset({"train", "unlearn", "retrain"})
_KEY = "openlineage_events"


def enabled() -> bool:
    return bool(get_settings().openlineage_transport)


@functools.cache
def _client(transport: str, url: str) -> Any:
    from openlineage.client import OpenLineageClient
    from openlineage.client.transport.console import ConsoleConfig, ConsoleTransport
    from openlineage.client.transport.http import HttpConfig, HttpTransport

    if transport == "http":
        if not url:
            raise ValueError(
                "PALIMPSEST_OPENLINEAGE_TRANSPORT=http needs PALIMPSEST_OPENLINEAGE_URL"
            )
        # Best effort: one quick retry, a short timeout.
        cfg = HttpConfig(url=url, timeout=5.0, retry={"total": 1, "backoff_factor": 0.2})
        return OpenLineageClient(transport=HttpTransport(cfg))
    return OpenLineageClient(transport=ConsoleTransport(ConsoleConfig()))


def _run_id(job_id: str) -> str:
    try:
        return str(uuid.UUID(hex=job_id))
    except ValueError:
        return str(uuid.uuid5(uuid.NAMESPACE_URL, f"palimpsest:job:{job_id}"))


def _build(session: Session, job: Job, state: str) -> dict[str, Any] | None:
    if job.kind not in KINDS or job.model_id is None:
        return None
    model = session.get(MLModel, job.model_id)
    if model is None:
        return None
    ds = session.get(Dataset, model.dataset_id)
    active = session.scalar(
        select(func.count())
        .select_from(Record)
        .where(Record.dataset_id == model.dataset_id, Record.status == "active")
    )
    result = dict(job.result or {})
    out: dict[str, Any] = {
        "state": state,
        "time": datetime.now(UTC).isoformat(),
        "run_id": _run_id(job.id),
        "job": f"{model.name}.{job.kind}",
        "dataset": f"datasets/{ds.name if ds else model.dataset_id}",
        "dataset_version": f"{model.dataset_id}:{int(active or 0)}",
        "model": f"models/{model.name}",
        "model_version": str(result["version"]) if "version" in result else None,
        "method": job.method,
        "error": job.error,
        "kind": job.kind,
    }
    return out


def _queue(session: Session, job: Job, state: str) -> None:
    if not enabled():
        return
    try:
        built = _build(session, job, state)
    except Exception:  # lineage must never break a job
        log.exception("openlineage: could not describe job %s", job.id)
        return
    if built is not None:
        session.info.setdefault(_KEY, []).append(built)


def job_started(session: Session, job: Job) -> None:
    _queue(session, job, "START")


def job_finished(session: Session, job: Job) -> None:
    _queue(session, job, "COMPLETE" if job.status == "succeeded" else "FAIL")


def to_event(d: dict[str, Any]) -> Any:
    from openlineage.client.event_v2 import (
        InputDataset,
        OutputDataset,
        Run,
        RunEvent,
        RunState,
    )
    from openlineage.client.event_v2 import Job as OLJob
    from openlineage.client.facet_v2 import (
        dataset_version_dataset,
        error_message_run,
        job_type_job,
    )

    ns = get_settings().openlineage_namespace
    run_facets: dict[str, Any] = {}
    if d["state"] == "FAIL" and d.get("error"):
        run_facets["errorMessage"] = error_message_run.ErrorMessageRunFacet(
            message=str(d["error"])[:2000], programmingLanguage="python"
        )
    inputs = [
        InputDataset(
            namespace=ns,
            name=d["dataset"],
            facets={
                "version": dataset_version_dataset.DatasetVersionDatasetFacet(
                    datasetVersion=d["dataset_version"]
                )
            },
        )
    ]
    outputs = []
    if d["state"] == "COMPLETE" and d.get("model_version"):
        outputs.append(
            OutputDataset(
                namespace=ns,
                name=d["model"],
                facets={
                    "version": dataset_version_dataset.DatasetVersionDatasetFacet(
                        datasetVersion=d["model_version"]
                    )
                },
            )
        )
    return RunEvent(
        eventType=RunState(d["state"]),
        eventTime=d["time"],
        producer=PRODUCER,
        run=Run(runId=d["run_id"], facets=run_facets),
        job=OLJob(
            namespace=ns,
            name=d["job"],
            facets={
                "jobType": job_type_job.JobTypeJobFacet(
                    processingType="BATCH", integration="PALIMPSEST", jobType=d["kind"].upper()
                )
            },
        ),
        inputs=inputs,
        outputs=outputs,
    )


def emit(d: dict[str, Any]) -> None:
    s = get_settings()
    try:
        _client(s.openlineage_transport, s.openlineage_url).emit(to_event(d))
    except Exception as exc:  # best effort: the job's outcome does not depend on it
        log.warning("openlineage: %s event for %s not sent: %s", d["state"], d["job"], exc)


@event.listens_for(Session, "after_commit")
def _emit_after_commit(session: Session) -> None:
    pending: list[dict[str, Any]] = session.info.pop(_KEY, [])
    for d in pending:
        emit(d)


@event.listens_for(Session, "after_rollback")
def _drop_on_rollback(session: Session) -> None:
    session.info.pop(_KEY, None)
