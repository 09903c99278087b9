"""Fallback retraining jobs (kind `retrain`): from scratch on the retained records,
without every removed feature (those of the production version and of feature requests
attached to this job), then the same verification and decision as any candidate."""

from __future__ import annotations

import time
from typing import Any

import numpy as np

from app.core.db import session_scope
from app.jobs import service as jobs
from app.ml.data import TabularData
from app.ml.weighting import GroupWeighting
from app.pipeline import methods, tokens
from app.pipeline.inputs import build
from app.pipeline.outcome import RequestEvents
from app.pipeline.start import begin, device
from app.pipeline.verify import verify_candidate
from app.registry import artifacts


def run_retrain(job_id: str, events: RequestEvents) -> None:
    t0 = time.perf_counter()
    with session_scope() as s:
        job = begin(s, job_id, "retrain")
        if job is None:
            return
        inputs = build(s, job, "retraining", events)
        mitigation = job.result.get("mitigation")
    dev = device()
    ckpt = artifacts.checkpoint_store(inputs.store, inputs.model_id)
    manifest = inputs.manifest
    mask = inputs.retained_mask
    retained = inputs.retained()
    # A mitigation freezes its per-group weights into the new manifest; otherwise the
    # model keeps the table it has (if any), so a fallback retrain stays mitigated.
    table = (
        mitigation_table(retained, mitigation)
        if mitigation
        else GroupWeighting.from_dict(manifest.weighting)
    )
    weights = table.apply(retained) if table is not None else None
    words = tokens.tokens_of(inputs.request_ids)  # words forgotten: the column stays
    removed = inputs.spec.removed_with(tokens.column_features(inputs.features, words))
    spec = tokens.spec_blocking(
        methods.spec_without(manifest.feature_spec, [d["feature"] for d in removed]), words
    )
    t_compute = time.perf_counter()
    new_manifest, result = methods.retrain(
        manifest,
        retained,
        inputs.shard[mask],
        inputs.slc[mask],
        spec,
        u=inputs.spec.unlearning,
        store=ckpt,
        device=dev,
        progress=jobs.ProgressReporter(job_id).sub(0.0, 0.8),
        sample_weight=weights,
    )
    inputs.phases.add("compute", time.perf_counter() - t_compute)
    result["approximate"] = False
    if words:
        result["tokens"] = words
    new_manifest.weighting = table.to_dict() if table is not None else None
    if mitigation:
        result["mitigation"] = {
            "flagged": mitigation.get("flagged", []),
            "reweighted": weights is not None,
            "max_weight": float(weights.max()) if weights is not None else None,
        }
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
        inputs,
        new_manifest,
        result,
        events,
        forgotten=forgotten,
        features=[f for f, _ in inputs.features],
        removed_features=removed,
        allow_retrain=False,
        n_retained=len(retained),
        compute=time.perf_counter() - t0,
    )


def mitigation_table(data: TabularData, mitigation: dict[str, Any]) -> GroupWeighting | None:
    """Per-group weights upweighting the groups the fairness check flagged (a product over
    the flagged columns, mean 1 on `data`), frozen; None when nothing applies."""
    by_column: dict[str, set[str]] = {}
    for f in mitigation.get("flagged", []):
        by_column.setdefault(str(f["column"]), set()).add(str(f["group"]))
    return GroupWeighting.from_flagged(data, by_column)
