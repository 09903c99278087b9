"""Exact feature removal on a SISA model, fanned out: one Celery task per shard, joined
by a chord whose callback verifies and concludes the job. Several GPU workers then share
the shards; with one worker they simply run one after another.

The parent job snapshots its context (lineage, layout, versions) into the artifact store
before dispatching, so every shard trains on the same retained set even if new requests
quarantine more records while the shards run.
"""

from __future__ import annotations

import json
import time
from typing import Any

import numpy as np
from celery import chord
from sqlalchemy import update

from app.core.db import session_scope
from app.core.storage import ArtifactStore, get_store
from app.datasets import service as datasets
from app.ml.device import runtime_fingerprint
from app.ml.sisa import ShardEntry, SisaManifest, train_shard
from app.models import Job
from app.registry import artifacts, monolithic
from app.registry.candidate import JobContext


def _snapshot_path(job_id: str) -> str:
    return f"jobs/{job_id}/context.json"


def save_snapshot(store: ArtifactStore, ctx: JobContext, started: float) -> None:
    body = {
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
        "started": started,
        "ids": ctx.ids.tolist(),
        "shard": ctx.shard.tolist(),
        "slc": ctx.slc.tolist(),
        "is_train": ctx.is_train.tolist(),
        "is_active": ctx.is_active.tolist(),
    }
    store.write_bytes(_snapshot_path(ctx.job_id), json.dumps(body).encode())


def load_snapshot(store: ArtifactStore, job_id: str) -> tuple[JobContext, float]:
    body = json.loads(store.read_bytes(_snapshot_path(job_id)))
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
    )
    return ctx, float(body["started"])


def dispatch(ctx: JobContext, n_shards: int, started: float) -> None:
    """Send the chord: every shard task, then `feature_finish` with their results."""
    from workers.celery_app import get_celery

    save_snapshot(get_store(), ctx, started)
    app = get_celery()
    header = [
        app.signature("palimpsest.feature_shard", args=(ctx.job_id, s), queue="gpu")
        for s in range(n_shards)
    ]
    body = app.signature("palimpsest.feature_finish", args=(ctx.job_id,), queue="gpu")
    chord(header, app=app)(body)


def train_one_shard(job_id: str, shard: int) -> dict[str, Any]:
    """One shard without the feature. Idempotent: checkpoints are content-addressed, so a
    redelivered task reuses what the first attempt wrote."""
    from app.registry.runner import _device

    store = get_store()
    ctx, _ = load_snapshot(store, job_id)
    feature = ctx.features[0][0]
    manifest = artifacts.load_manifest(store, ctx.manifest_rel)
    spec = monolithic.spec_without(manifest.feature_spec, [feature])
    mask = ctx.retained_mask & (ctx.shard == shard)
    table = datasets.read_partitions(store, ctx.ds)
    data = datasets.to_tabular(ctx.ds, table, ctx.ids[mask])  # sorted by id, as ids are
    res = train_shard(
        data,
        ctx.slc[mask],
        shard=shard,
        feature_spec=spec,
        arch=manifest.arch,
        training=manifest.training,
        sisa=manifest.sisa,
        n_classes=manifest.n_classes,
        model_key=manifest.model_key,
        store=artifacts.checkpoint_store(store, ctx.model_id),
        device=_device(),
    )
    step = 0.8 / manifest.sisa.shards
    with session_scope() as s:
        s.execute(
            update(Job)
            .where(Job.id == job_id, Job.status == "running")
            .values(progress=Job.progress + step)
        )
    return {"entry": ShardEntry.from_result(res).to_dict(), "seconds": res.seconds}


def assemble(
    job_id: str, results: list[dict[str, Any]]
) -> tuple[JobContext, SisaManifest, SisaManifest, dict[str, Any], float]:
    """The candidate manifest from the shard results, in shard order."""
    from app.registry.runner import _device

    store = get_store()
    ctx, started = load_snapshot(store, job_id)
    feature = ctx.features[0][0]
    base = artifacts.load_manifest(store, ctx.manifest_rel)
    entries = sorted((ShardEntry.from_dict(r["entry"]) for r in results), key=lambda e: e.shard)
    new = SisaManifest(
        model_key=base.model_key,
        arch=base.arch,
        training=base.training,
        sisa=base.sisa,
        feature_spec=monolithic.spec_without(base.feature_spec, [feature]),
        n_classes=base.n_classes,
        entries=entries,
        runtime=runtime_fingerprint(_device()),
    )
    shard_seconds = [float(r["seconds"]) for r in results]
    result = {
        "method": "feature_retrain",
        "approximate": False,
        "shards": len(entries),
        "parallelism": "celery_chord",
        "shard_seconds": shard_seconds,
        "device_seconds": sum(shard_seconds),
    }
    return ctx, base, new, result, started


def elapsed_since(started: float) -> float:
    return max(0.0, time.time() - started)
