"""SISA shards of one job, fanned out: one Celery task per shard, joined by a chord whose
callback verifies and concludes the job. Used by exact feature removal (every shard
retrains without the column) and by unlearning jobs that reach several shards. Several
GPU workers then share the shards; with one worker they simply run one after another.

The parent job snapshots its inputs (lineage, layout, versions) into the artifact store
before dispatching, so every shard trains on the same retained set even if new requests
quarantine more records while the shards run. A shard task reads only its own rows.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from sqlalchemy import update

from app.core import outbox
from app.core.db import session_scope
from app.core.outbox import PendingTask
from app.core.storage import ArtifactStore, get_store
from app.jobs import lease, routing
from app.jobs import service as jobs
from app.ml.config import FeatureSpec
from app.ml.device import runtime_fingerprint
from app.ml.sisa import ShardEntry, SisaManifest, train_shard
from app.models import Job
from app.models.base import utcnow
from app.pipeline.inputs import JobInputs
from app.pipeline.outcome import RequestEvents
from app.pipeline.start import device
from app.pipeline.tokens import tokens_of
from app.pipeline.verify import verify_feature, verify_unlearning
from app.registry import artifacts


def _snapshot_path(job_id: str, attempt: int | None) -> str:
    # One per attempt: a chord left over from a taken-over attempt reads its own.
    return (
        f"jobs/{job_id}/context.json"
        if attempt is None
        else f"jobs/{job_id}/context-{attempt}.json"
    )


@dataclass
class Snapshot:
    inputs: JobInputs
    purpose: str  # "feature" | "unlearn"
    spec: FeatureSpec  # what the shards train with
    shards: list[int]  # the shards the chord trains


def save_snapshot(
    store: ArtifactStore, inputs: JobInputs, *, purpose: str, spec: FeatureSpec, shards: list[int]
) -> None:
    body = inputs.snapshot() | {"purpose": purpose, "spec": spec.to_dict(), "shards": shards}
    store.write_bytes(_snapshot_path(inputs.job_id, inputs.attempt), json.dumps(body).encode())


def load_snapshot(store: ArtifactStore, job_id: str, attempt: int | None = None) -> Snapshot:
    body = json.loads(store.read_bytes(_snapshot_path(job_id, attempt)))
    return Snapshot(
        JobInputs.from_snapshot(body),
        str(body["purpose"]),
        FeatureSpec.from_dict(body["spec"]),
        [int(x) for x in body["shards"]],
    )


def dispatch(inputs: JobInputs, *, purpose: str, spec: FeatureSpec, shards: list[int]) -> None:
    """Send the chord: one task per shard, then `sisa_finish` with their results. The
    job keeps its model lock; the callback concludes it and releases the lock.

    Every task carries the attempt that sent it: shards heartbeat the job under it, and
    once the job is taken over (attempts moved on) a left-over chord does nothing. The
    job is marked as waiting for its shards first, so the sweep gives it the shard lease
    (the shards may queue behind other work)."""
    save_snapshot(get_store(), inputs, purpose=purpose, spec=spec, shards=shards)
    with session_scope() as s:
        job = jobs.claim(s, inputs.job_id, inputs.attempt)
        job.result = {
            **job.result,
            "fanout": {"attempt": inputs.attempt, "shards": shards, "at": utcnow().isoformat()},
        }
        job.heartbeat_at = utcnow()
    header = [
        PendingTask(routing.SHARD_TASK, (inputs.job_id, s, inputs.attempt), routing.GPU)
        for s in shards
    ]
    callback = PendingTask(routing.CHORD_CALLBACK, (inputs.job_id, inputs.attempt), routing.GPU)
    outbox.sender().chord(header, callback)


def train_one_shard(job_id: str, shard: int, attempt: int | None = None) -> dict[str, Any]:
    """One shard on its retained rows under the snapshot's feature spec. Idempotent:
    checkpoints are content-addressed, so a redelivered task reuses what the first
    attempt wrote, and an unlearning shard reuses the slices before its first change.
    LeaseLost when the job's attempt `attempt` no longer owns it."""
    with session_scope() as s:
        jobs.claim(s, job_id, attempt)
    store = get_store()
    snap = load_snapshot(store, job_id, attempt)
    inputs = snap.inputs
    manifest = inputs.manifest
    data, slices = inputs.shard_rows(shard)
    res = train_shard(
        data,
        slices,
        shard=shard,
        feature_spec=snap.spec,
        arch=manifest.arch,
        training=manifest.training,
        sisa=manifest.sisa,
        n_classes=manifest.n_classes,
        model_key=manifest.model_key,
        store=artifacts.checkpoint_store(store, inputs.model_id),
        device=device(),
        progress=jobs.ProgressReporter(job_id, write=False),
        sample_weight=artifacts.sample_weights(manifest, data),
    )
    step = 0.8 / max(1, len(snap.shards))
    stmt = update(Job).where(Job.id == job_id, Job.status == "running")
    if attempt is not None:
        stmt = stmt.where(Job.attempts == attempt)
    with session_scope() as s:
        s.execute(stmt.values(progress=Job.progress + step))
    return {
        "entry": ShardEntry.from_result(res).to_dict(),
        "seconds": res.seconds,
        "slices_trained": res.slices_trained,
        "load_seconds": inputs.phases.seconds.get("load", 0.0),
        "worker": lease.worker_id(),
    }


def assemble(
    job_id: str, results: list[dict[str, Any]], attempt: int | None = None
) -> tuple[Snapshot, SisaManifest, dict[str, Any]]:
    """The candidate manifest: the chord's shards from their results, every other shard
    as it was."""
    store = get_store()
    snap = load_snapshot(store, job_id, attempt)
    base = snap.inputs.manifest
    results = [r for r in results if "entry" in r]  # not those of a taken-over attempt
    trained = {e.shard: e for e in (ShardEntry.from_dict(r["entry"]) for r in results)}
    if sorted(trained) != sorted(snap.shards):
        # A chord counted a duplicate delivery, or lost one: never a partial candidate.
        raise RuntimeError(f"job {job_id}: shards {sorted(trained)} of {sorted(snap.shards)}")
    new = SisaManifest(
        model_key=base.model_key,
        arch=base.arch,
        training=base.training,
        sisa=base.sisa,
        feature_spec=snap.spec,
        n_classes=base.n_classes,
        entries=[trained.get(e.shard, e) for e in base.entries],
        runtime=runtime_fingerprint(device()),
        weighting=base.weighting,
        thresholds=base.thresholds,
    )
    by_shard = {int(r["entry"]["shard"]): r for r in results}
    shard_seconds = [float(by_shard[s]["seconds"]) for s in sorted(by_shard)]
    snap.inputs.phases.add("compute", sum(shard_seconds))
    snap.inputs.phases.add("shard_load", sum(float(r.get("load_seconds", 0.0)) for r in results))
    snap.inputs.phases.parquet_reads += len(results)
    result: dict[str, Any] = {
        "approximate": False,
        "parallelism": "celery_chord",
        "weighted": base.weighting is not None,
        "shard_seconds": shard_seconds,
        "shard_workers": {str(s): by_shard[s].get("worker") for s in sorted(by_shard)},
        "device_seconds": sum(shard_seconds),
    }
    if snap.purpose == "feature":
        result |= {"method": "feature_retrain", "shards": len(trained)}
    else:
        earliest: dict[str, int] = {}
        for s, e in trained.items():
            old = base.entry(s).checkpoint_keys
            pairs = zip(old, e.checkpoint_keys, strict=False)
            changed = [i for i, (a, b) in enumerate(pairs) if a != b]
            earliest[str(s)] = changed[0] if changed else base.sisa.slices
        result |= {
            "method": "sisa",
            "affected_shards": sorted(trained),
            "total_shards": base.sisa.shards,
            "slices_retrained": {str(s): int(by_shard[s]["slices_trained"]) for s in by_shard},
            "earliest_affected_slice": earliest,
            "forgotten_found": len(snap.inputs.forgotten),
            "seconds": sum(shard_seconds),
        }
    return snap, new, result


def finish_chord(
    job_id: str, results: list[dict[str, Any]], events: RequestEvents, attempt: int | None = None
) -> None:
    """The chord's callback: its shards are trained; verify and conclude the job."""
    with session_scope() as s:
        job = s.get(Job, job_id)
        if job is None or job.status != "running":
            return  # idempotent: concluded (or failed) already
        if attempt is not None and job.attempts != attempt:
            return  # the chord of an attempt that was taken over
    snap, new_manifest, result = assemble(job_id, results, attempt)
    inputs, compute = snap.inputs, float(result["device_seconds"])
    n_retained = sum(e.n_records for e in new_manifest.entries)
    if snap.purpose == "feature":
        result["feature"] = inputs.features[0][0]
        words = tokens_of(inputs.request_ids)
        if words:
            result["tokens"] = words
        verify_feature(inputs, new_manifest, result, events, n_retained, compute)
    else:
        verify_unlearning(inputs, new_manifest, result, events, n_retained, compute)
