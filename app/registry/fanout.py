"""SISA shards of one job, fanned out: one Celery task per shard, joined by a chord whose
callback verifies and concludes the job. Used by exact feature removal (every shard
retrains without the column) and by unlearning jobs that reach several shards. Several
GPU workers then share the shards; with one worker they simply run one after another.

The parent job snapshots its context (lineage, layout, versions) into the artifact store
before dispatching, so every shard trains on the same retained set even if new requests
quarantine more records while the shards run.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

import numpy as np
from celery import chord
from sqlalchemy import update

from app.core.db import session_scope
from app.core.storage import ArtifactStore, get_store
from app.datasets import service as datasets
from app.jobs import lease
from app.jobs import service as jobs
from app.ml.config import FeatureSpec
from app.ml.device import runtime_fingerprint
from app.ml.sisa import ShardEntry, SisaManifest, train_shard
from app.models import Job
from app.models.base import utcnow
from app.registry import artifacts
from app.registry.candidate import JobContext


def _snapshot_path(job_id: str, attempt: int | None) -> str:
    # One per attempt: a chord left over from a taken-over attempt reads its own.
    return (
        f"jobs/{job_id}/context.json"
        if attempt is None
        else f"jobs/{job_id}/context-{attempt}.json"
    )


def save_snapshot(
    store: ArtifactStore,
    ctx: JobContext,
    started: float,
    *,
    purpose: str,
    spec: FeatureSpec,
    shards: list[int],
) -> None:
    body = {
        "purpose": purpose,
        "spec": spec.to_dict(),
        "shards": shards,
        "job_id": ctx.job_id,
        "model_id": ctx.model_id,
        "config": ctx.config,
        "dataset_id": ctx.ds.id,
        "base_version": ctx.base_version,
        "new_version": ctx.new_version,
        "manifest_rel": ctx.manifest_rel,
        "request_ids": ctx.request_ids,
        "features": [list(f) for f in ctx.features],
        "retrain_estimate": ctx.retrain_estimate,
        "attempt": ctx.attempt,
        "started": started,
        "ids": ctx.ids.tolist(),
        "shard": ctx.shard.tolist(),
        "slc": ctx.slc.tolist(),
        "is_train": ctx.is_train.tolist(),
        "is_active": ctx.is_active.tolist(),
    }
    store.write_bytes(_snapshot_path(ctx.job_id, ctx.attempt), json.dumps(body).encode())


@dataclass
class Snapshot:
    ctx: JobContext
    started: float
    purpose: str  # "feature" | "unlearn"
    spec: FeatureSpec  # what the shards train with
    shards: list[int]  # the shards the chord trains


def load_snapshot(store: ArtifactStore, job_id: str, attempt: int | None = None) -> Snapshot:
    body = json.loads(store.read_bytes(_snapshot_path(job_id, attempt)))
    with session_scope() as s:
        ds = datasets.get(s, body["dataset_id"])
        s.expunge(ds)
    ctx = JobContext(
        job_id=body["job_id"],
        model_id=body["model_id"],
        config=body["config"],
        ds=ds,
        base_version=body["base_version"],
        new_version=body["new_version"],
        manifest_rel=body["manifest_rel"],
        request_ids=body["request_ids"],
        features=[(f[0], f[1]) for f in body["features"]],
        ids=np.asarray(body["ids"], dtype=np.int64),
        shard=np.asarray(body["shard"], dtype=np.int64),
        slc=np.asarray(body["slc"], dtype=np.int64),
        is_train=np.asarray(body["is_train"], dtype=bool),
        is_active=np.asarray(body["is_active"], dtype=bool),
        retrain_estimate=body["retrain_estimate"],
        attempt=body.get("attempt"),
    )
    return Snapshot(
        ctx,
        float(body["started"]),
        str(body["purpose"]),
        FeatureSpec.from_dict(body["spec"]),
        [int(x) for x in body["shards"]],
    )


def dispatch(
    ctx: JobContext, started: float, *, purpose: str, spec: FeatureSpec, shards: list[int]
) -> None:
    """Send the chord: one task per shard, then `sisa_finish` with their results. The
    job keeps its model lock; the callback concludes it and releases the lock.

    Every task carries the attempt that sent it: shards heartbeat the job under it, and
    once the job is taken over (attempts moved on) a left-over chord does nothing. The
    job is marked as waiting for its shards first, so the sweep gives it the shard lease
    (the shards may queue behind other work)."""
    from workers.celery_app import get_celery

    save_snapshot(get_store(), ctx, started, purpose=purpose, spec=spec, shards=shards)
    with session_scope() as s:
        job = jobs.claim(s, ctx.job_id, ctx.attempt)
        job.result = {
            **job.result,
            "fanout": {"attempt": ctx.attempt, "shards": shards, "at": utcnow().isoformat()},
        }
        job.heartbeat_at = utcnow()
    app = get_celery()
    header = [
        app.signature("palimpsest.sisa_shard", args=(ctx.job_id, s, ctx.attempt), queue="gpu")
        for s in shards
    ]
    body = app.signature("palimpsest.sisa_finish", args=(ctx.job_id, ctx.attempt), queue="gpu")
    chord(header, app=app)(body)


def train_one_shard(job_id: str, shard: int, attempt: int | None = None) -> dict[str, Any]:
    """One shard on its retained rows under the snapshot's feature spec. Idempotent:
    checkpoints are content-addressed, so a redelivered task reuses what the first
    attempt wrote, and an unlearning shard reuses the slices before its first change.
    LeaseLost when the job's attempt `attempt` no longer owns it."""
    from app.registry.runner import _device

    with session_scope() as s:
        jobs.claim(s, job_id, attempt)
    store = get_store()
    snap = load_snapshot(store, job_id, attempt)
    ctx = snap.ctx
    manifest = artifacts.load_manifest(store, ctx.manifest_rel)
    mask = ctx.retained_mask & (ctx.shard == shard)
    table = datasets.read_partitions(store, ctx.ds)
    data = datasets.to_tabular(ctx.ds, table, ctx.ids[mask])  # sorted by id, as ids are
    res = train_shard(
        data,
        ctx.slc[mask],
        shard=shard,
        feature_spec=snap.spec,
        arch=manifest.arch,
        training=manifest.training,
        sisa=manifest.sisa,
        n_classes=manifest.n_classes,
        model_key=manifest.model_key,
        store=artifacts.checkpoint_store(store, ctx.model_id),
        device=_device(),
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
        "worker": lease.worker_id(),  # which worker trained it (host:pid), for operators
    }


def assemble(
    job_id: str, results: list[dict[str, Any]], attempt: int | None = None
) -> tuple[Snapshot, SisaManifest, SisaManifest, dict[str, Any]]:
    """The candidate manifest: the chord's shards from their results, every other shard
    as it was."""
    from app.registry.runner import _device

    store = get_store()
    snap = load_snapshot(store, job_id, attempt)
    base = artifacts.load_manifest(store, snap.ctx.manifest_rel)
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
        runtime=runtime_fingerprint(_device()),
        weighting=base.weighting,
    )
    by_shard = {int(r["entry"]["shard"]): r for r in results}
    shard_seconds = [float(by_shard[s]["seconds"]) for s in sorted(by_shard)]
    result: dict[str, Any] = {
        "approximate": False,
        "parallelism": "celery_chord",
        "weighted": base.weighting is not None,
        "shard_seconds": shard_seconds,
        "device_seconds": sum(shard_seconds),
        "shard_workers": {str(s): by_shard[s].get("worker") for s in sorted(by_shard)},
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
            "forgotten_found": len(snap.ctx.forgotten),
            "seconds": sum(shard_seconds),
        }
    return snap, base, new, result
