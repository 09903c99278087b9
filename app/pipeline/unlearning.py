"""An unlearning job on records: exact SISA (in this task for one shard, fanned out as a
chord for several) or an approximate method on a monolithic model, then verification."""

from __future__ import annotations

import time

from sqlalchemy.orm import Session

from app.core.db import session_scope
from app.jobs import service as jobs
from app.jobs.energy import EnergyMeter
from app.ml.sisa import unlearn_sisa
from app.models import Job
from app.pipeline import fanout, methods
from app.pipeline.conclude import fall_back_to_retrain, nothing_to_forget
from app.pipeline.features import run_feature
from app.pipeline.inputs import JobInputs, build
from app.pipeline.outcome import RequestEvents
from app.pipeline.start import begin, device, is_held
from app.pipeline.verify import verify_unlearning
from app.registry import artifacts, references


def start(session: Session, job_id: str, events: RequestEvents) -> JobInputs | None:
    job = begin(session, job_id, "unlearn")
    return None if job is None else build(session, job, "unlearning", events)


def run_unlearning(job_id: str, events: RequestEvents) -> None:
    with session_scope() as s:
        if is_held(s, job_id):
            return  # held by its model's batching policy: the beat sends it when due
        peek = s.get(Job, job_id)
        method = peek.method if peek is not None else None
    if method == "feature":
        # Feature jobs have a task of their own; a message sent to this task before
        # they did (or by an older sender) still lands in the right place.
        run_feature(job_id, events)
        return
    t0 = time.perf_counter()
    with session_scope() as s:
        inputs = start(s, job_id, events)
    if inputs is None:
        return
    forgotten = inputs.forgotten
    if len(forgotten) == 0:
        nothing_to_forget(inputs, events)
        return
    manifest = inputs.manifest
    u = inputs.spec.unlearning
    affected = inputs.affected_shards()
    if u.is_sisa and len(affected) > 1:
        # Several shards: one task each, shared by the GPU workers (a Celery chord).
        fanout.dispatch(inputs, purpose="unlearn", spec=manifest.feature_spec, shards=affected)
        return
    dev = device()
    ckpt = artifacts.checkpoint_store(inputs.store, inputs.model_id)
    n_retained = int(inputs.retained_mask.sum())
    progress = jobs.ProgressReporter(job_id).sub(0.0, 0.8)
    meter = EnergyMeter(dev)
    t_compute = time.perf_counter()
    if not u.is_sisa:
        auto = u.strategy_name == "auto"
        try:
            retained = inputs.retained()
            new_manifest, result = methods.approximate_unlearn(
                manifest,
                retained,
                inputs.forget(),
                u=u,
                job_id=job_id,
                store=ckpt,
                device=dev,
                progress=progress,
                test=inputs.test() if auto else None,
                refs=references.load(inputs.store, inputs.model_id, dev) if auto else None,
                retrain_seconds=inputs.retrain_estimate,
            )
        except Exception as exc:
            fall_back_to_retrain(inputs, events, u.method, exc)
            return
    else:
        # Only the affected shard's rows are converted: the others are not retrained.
        retained, mask = inputs.retained_in(affected)
        new_manifest, stats = unlearn_sisa(
            manifest,
            retained,
            inputs.shard[mask],
            inputs.slc[mask],
            forgotten,
            store=ckpt,
            device=dev,
            progress=progress,
            sample_weight=artifacts.sample_weights(manifest, retained),
        )
        result = {
            "method": "sisa",
            "approximate": False,
            "weighted": manifest.weighting is not None,
            **stats.to_dict(),
        }
    inputs.phases.add("compute", time.perf_counter() - t_compute)
    # Approximate methods do not apply a mitigation's weights, but later exact trainings
    # of this model (a fallback retrain) still must: the table stays with the model.
    new_manifest.weighting = manifest.weighting
    new_manifest.thresholds = manifest.thresholds
    result["energy_joules"] = meter.joules()
    verify_unlearning(inputs, new_manifest, result, events, n_retained, time.perf_counter() - t0)
