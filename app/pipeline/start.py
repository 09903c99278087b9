"""Starting a job: claim it (idempotently), take its model's lock, set up the device."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from sqlalchemy import select
from sqlalchemy.orm import Session

from app.core.db import session_scope
from app.core.settings import get_settings
from app.datasets import service as datasets
from app.jobs import lease
from app.jobs import service as jobs
from app.ml.device import derive_seed, set_up
from app.models import Dataset, Job, MLModel, Record

log = logging.getLogger(__name__)
WORKER = "worker"


class ModelBusy(Exception):
    """Another job holds the model's lock; the task retries later."""


def device() -> torch.device:
    """This worker's device, set up for deterministic work (settings decide which)."""
    settings = get_settings()
    return set_up(settings.device, settings.torch_threads)


def begin(session: Session, job_id: str, kind: str) -> Job | None:
    """Mark the job running under this execution, or None when there is nothing to do
    (done already, or running on a live worker: a duplicate delivery). ModelBusy while
    another job holds the model."""
    # Row lock: a request joining this job (batching) either lands before the job reads
    # its requests or sees it running and opens the next job.
    job = session.get(Job, job_id, with_for_update=True)
    if job is None or job.kind != kind or job.status in ("succeeded", "failed"):
        return None  # idempotent: a redelivered task finds its work done
    if job.status == "running":
        # A redelivered or re-sent message. The job runs on a live worker: leave it. Its
        # lease expired, or this very process ran it before (that execution is over, as a
        # process holds a job once): take it over without waiting for the sweep.
        ended = lease.ended_here(job)
        if not ended and not lease.is_stale(job):
            log.info("job %s runs on %s; this delivery is a duplicate", job_id, job.worker)
            return None
        why = "its execution in this process ended" if ended else "its lease expired"
        jobs.take_over(session, job, WORKER, f"a new delivery found {why}")
    # An ingest job works on a dataset no model uses yet: no lock to take.
    if job.model_id is not None and not jobs.try_lock(session, job.model_id, job.id):
        raise ModelBusy(job.model_id)
    jobs.start(session, job)
    return job


def is_held(session: Session, job_id: str) -> bool:
    """Held by its model's batching policy: the beat sends it when due."""
    job = session.get(Job, job_id)
    return job is not None and job.status == "pending" and job.not_before is not None


def test_split(record_ids: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    """Which records are held out for testing: a stable function of (seed, record id)."""
    cut = int(fraction * 1_000_000)
    return np.fromiter(
        (derive_seed(seed, "test-split", int(r)) % 1_000_000 < cut for r in record_ids),
        dtype=bool,
        count=len(record_ids),
    )


@dataclass
class FirstVersionJob:
    """A job that makes a model's first version (training it, or importing it): its
    fencing token, the model, its dataset (detached) and the dataset's active records."""

    token: int | None
    model_id: str
    model_name: str
    config: dict[str, Any]
    ds: Dataset
    active: np.ndarray


def begin_first_version(job_id: str) -> FirstVersionJob | None:
    """Claim a train-kind job (None: not this worker's to run) and read what it needs."""
    with session_scope() as s:
        job = begin(s, job_id, "train")
        if job is None:
            return None
        model = s.get(MLModel, job.model_id)
        assert model is not None
        ds = datasets.get(s, model.dataset_id)
        active = np.asarray(
            sorted(
                s.scalars(
                    select(Record.id).where(Record.dataset_id == ds.id, Record.status == "active")
                )
            ),
            dtype=np.int64,
        )
        s.expunge(ds)
        return FirstVersionJob(job.attempts, model.id, model.name, model.config, ds, active)
