"""Feature-removal jobs and fallback retraining jobs (kind `retrain`, method `retrain`).

Both produce a candidate version that goes through the same verification and decision
as an unlearning job (`app.registry.candidate.conclude`).
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from app.core.db import session_scope
from app.core.storage import get_store
from app.datasets import service as datasets
from app.jobs import service as jobs
from app.ml.data import TabularData
from app.ml.sisa import SisaManifest
from app.ml.weighting import GroupWeighting
from app.models import Job
from app.registry import artifacts, fanout, monolithic
from app.registry.candidate import (
    JobContext,
    load_context,
)
from app.registry.runner import (
    _begin,
    _device,
    _removed_features,
    verify_candidate,
    verify_unlearning,
)


def run_feature(job_id: str) -> None:
    """Kind `unlearn`, method `feature`: make the model blind to the requested feature.
    SISA models retrain every shard without it, fanned out as a Celery chord
    (`app.registry.fanout`); monolithic ones are updated in this task."""
    t0 = time.perf_counter()
    started = time.time()
    with session_scope() as s:
        job = _begin(s, job_id, "unlearn")
        if job is None:
            return
        ctx = load_context(s, job, "unlearning")
    if not ctx.features:
        raise RuntimeError(f"feature job {job_id} has no feature request attached")
    feature, _ = ctx.features[0]
    store = get_store()
    device = _device()
    ckpt = artifacts.checkpoint_store(store, ctx.model_id)
    manifest = artifacts.load_manifest(store, ctx.manifest_rel)
    sisa = ctx.config["unlearning"]["mode"] != "monolithic"
    exact = sisa and ctx.config["unlearning"].get("feature_mode", "exact") == "exact"
    if exact and feature not in manifest.feature_spec.removed:
        # The job keeps its model lock; the chord's callback concludes and releases it.
        fanout.dispatch(
            ctx,
            started,
            purpose="feature",
            spec=monolithic.spec_without(manifest.feature_spec, [feature]),
            shards=list(range(manifest.sisa.shards)),
        )
        return
    table = datasets.read_partitions(store, ctx.ds)
    mask = ctx.retained_mask
    retained = datasets.to_tabular(ctx.ds, table, ctx.ids[mask])
    progress = jobs.ProgressReporter(job_id).sub(0.0, 0.8)
    if feature in manifest.feature_spec.removed:
        new_manifest, result = manifest, {"method": "none", "approximate": False}
    elif sisa:
        new_manifest, result = monolithic.approximate_sisa_feature(
            manifest,
            retained,
            ctx.shard[mask],
            feature,
            job_id=job_id,
            store=ckpt,
            device=device,
            progress=progress,
        )
    else:
        new_manifest, result = monolithic.feature_unlearn(
            manifest,
            retained,
            feature,
            config=ctx.config,
            job_id=job_id,
            store=ckpt,
            device=device,
            progress=progress,
        )
    result["feature"] = feature
    new_manifest.weighting = manifest.weighting
    _verify_feature(
        ctx, manifest, new_manifest, result, len(retained), time.perf_counter() - t0, started
    )


def finish_chord(job_id: str, results: list[dict[str, Any]], attempt: int | None = None) -> None:
    """The chord's callback: its shards are trained; verify and conclude the job."""
    with session_scope() as s:
        job = s.get(Job, job_id)
        if job is None or job.status != "running":
            return  # idempotent: concluded (or failed) already
        if attempt is not None and job.attempts != attempt:
            return  # the chord of an attempt that was taken over
    snap, manifest, new_manifest, result = fanout.assemble(job_id, results, attempt)
    ctx, compute = snap.ctx, float(result["device_seconds"])
    n_retained = sum(e.n_records for e in new_manifest.entries)
    if snap.purpose == "feature":
        result["feature"] = ctx.features[0][0]
        _verify_feature(ctx, manifest, new_manifest, result, n_retained, compute, snap.started)
    else:
        verify_unlearning(ctx, manifest, new_manifest, result, n_retained, compute, snap.started)


def _verify_feature(
    ctx: JobContext,
    manifest: SisaManifest,
    new_manifest: SisaManifest,
    result: dict[str, Any],
    n_retained: int,
    compute: float,
    started: float,
) -> None:
    """A feature job's candidate: no record forgotten, the feature must be gone."""
    verify_candidate(
        ctx,
        manifest,
        new_manifest,
        result,
        forgotten=np.zeros(0, dtype=np.int64),
        features=[str(result["feature"])],
        removed_features=_removed_features(ctx.config, ctx.features),
        allow_retrain=True,
        n_retained=n_retained,
        compute=compute,
        started=started,
    )


def run_retrain(job_id: str) -> None:
    """From scratch on the retained records, without every removed feature (those of the
    production version and of feature requests attached to this job)."""
    t0 = time.perf_counter()
    started = time.time()
    with session_scope() as s:
        job = _begin(s, job_id, "retrain")
        if job is None:
            return
        ctx = load_context(s, job, "retraining")
        mitigation = job.result.get("mitigation")
    store = get_store()
    device = _device()
    ckpt = artifacts.checkpoint_store(store, ctx.model_id)
    manifest = artifacts.load_manifest(store, ctx.manifest_rel)
    table = datasets.read_partitions(store, ctx.ds)
    mask = ctx.retained_mask
    retained = datasets.to_tabular(ctx.ds, table, ctx.ids[mask])
    # A mitigation freezes its per-group weights into the new manifest; otherwise the
    # model keeps the table it has (if any), so a fallback retrain stays mitigated.
    table = (
        _mitigation_table(retained, mitigation)
        if mitigation
        else GroupWeighting.from_dict(manifest.weighting)
    )
    weights = table.apply(retained) if table is not None else None
    removed = _removed_features(ctx.config, ctx.features)
    spec = monolithic.spec_without(manifest.feature_spec, [d["feature"] for d in removed])
    new_manifest, result = monolithic.retrain(
        manifest,
        retained,
        ctx.shard[mask],
        ctx.slc[mask],
        spec,
        config=ctx.config,
        store=ckpt,
        device=device,
        progress=jobs.ProgressReporter(job_id).sub(0.0, 0.8),
        sample_weight=weights,
    )
    result["approximate"] = False
    new_manifest.weighting = table.to_dict() if table is not None else None
    if mitigation:
        result["mitigation"] = {
            "flagged": mitigation.get("flagged", []),
            "reweighted": weights is not None,
            "max_weight": float(weights.max()) if weights is not None else None,
        }
    compute = time.perf_counter() - t0
    # Everything the production version saw that the retrained one does not.
    seen = np.unique(
        np.concatenate(
            [np.asarray(e.record_ids, dtype=np.int64) for e in manifest.entries]
            + [np.zeros(0, dtype=np.int64)]
        )
    )
    forgotten = np.setdiff1d(seen, np.asarray(retained.record_ids, dtype=np.int64))
    # A retrain's own failed report goes to a person (allow_retrain=False): no loops.
    verify_candidate(
        ctx,
        manifest,
        new_manifest,
        result,
        forgotten=forgotten,
        features=[f for f, _ in ctx.features],
        removed_features=removed,
        allow_retrain=False,
        n_retained=len(retained),
        compute=compute,
        started=started,
    )


def _mitigation_table(data: TabularData, mitigation: dict[str, Any]) -> GroupWeighting | None:
    """Per-group weights upweighting the groups the fairness check flagged (a product over
    the flagged columns, mean 1 on `data`), frozen; None when nothing applies."""
    by_column: dict[str, set[str]] = {}
    for f in mitigation.get("flagged", []):
        by_column.setdefault(str(f["column"]), set()).add(str(f["group"]))
    return GroupWeighting.from_flagged(data, by_column)
