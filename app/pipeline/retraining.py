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
from app.ml.sisa import SisaEnsemble
from app.ml.thresholds import GroupThresholds, fit_group_thresholds
from app.ml.weighting import GroupWeighting
from app.pipeline import methods, tokens
from app.pipeline.inputs import build
from app.pipeline.outcome import RequestEvents
from app.pipeline.start import begin, device
from app.pipeline.verify import verify_candidate
from app.registry import artifacts, references


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
    kind = str((mitigation or {}).get("kind") or "reweight")
    details: dict[str, Any] = {}
    if mitigation and kind == "reweight":
        table = mitigation_table(retained, mitigation)
    elif mitigation and kind == "group_dro":
        losses = group_losses(
            SisaEnsemble.load(manifest, ckpt, dev), retained, list(inputs.spec.group_columns)
        )
        table = GroupWeighting.group_robust(retained, losses)
        details["group_losses"] = losses
    else:  # no mitigation, or thresholds (post-processing): the model's own table
        table = GroupWeighting.from_dict(manifest.weighting)
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
        weights_changed=(table.to_dict() if table is not None else None) != manifest.weighting,
    )
    inputs.phases.add("compute", time.perf_counter() - t_compute)
    u = inputs.spec.unlearning
    k = inputs.spec.verification.reference_models
    if not u.is_sisa and k > 0 and references.count(inputs.store, inputs.model_id) < k:
        # Erasures deleted references that trained on erased rows: the retrain, which
        # trains on the retained data anyway, trains a fresh set on it (only when some
        # are missing: they are cached until the data they saw changes).
        with inputs.phases.timed("references"):
            references.train_references(
                inputs.store,
                inputs.model_id,
                retained,
                seed_key=manifest.model_key,
                k=k,
                feature_spec=spec,
                arch=manifest.arch,
                training=manifest.training,
                n_classes=manifest.n_classes,
                device=dev,
            )
        result["references_retrained"] = k
    result["approximate"] = False
    if words:
        result["tokens"] = words
    new_manifest.weighting = table.to_dict() if table is not None else None
    new_manifest.thresholds = manifest.thresholds
    if mitigation and kind == "thresholds":
        fitted = fit_thresholds(
            SisaEnsemble.load(new_manifest, ckpt, dev), retained, mitigation, inputs
        )
        if fitted is not None:
            new_manifest.thresholds = fitted.to_dict()
            details["thresholds"] = fitted.to_dict()
    if mitigation:
        result["mitigation"] = {
            "kind": kind,
            "flagged": mitigation.get("flagged", []),
            "reweighted": weights is not None,
            "max_weight": float(weights.max()) if weights is not None else None,
            **details,
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


FIT_ROWS = 5000  # a seeded sample of the retained rows fits the mitigation's statistics


def _sample(data: TabularData, seed: int) -> TabularData:
    if len(data) <= FIT_ROWS:
        return data
    rng = np.random.default_rng(seed)
    return data.take(np.sort(rng.choice(len(data), FIT_ROWS, replace=False)))


def group_losses(
    ensemble: SisaEnsemble, retained: TabularData, columns: list[str]
) -> dict[str, dict[str, float]]:
    """Mean cross-entropy of the current version per (group column, value) on a sample
    of the retained rows: what group DRO's weights follow."""
    rows = _sample(retained, 0)
    if len(rows) == 0:
        return {}
    p = ensemble.predict_proba(rows.columns).numpy()
    y = np.asarray(rows.labels, dtype=np.int64)
    loss = -np.log(np.maximum(p[np.arange(len(y)), y], 1e-12))
    out: dict[str, dict[str, float]] = {}
    for c in columns:
        if c not in rows.columns:
            continue
        values = np.asarray([str(v) for v in rows.columns[c]], dtype=object)
        out[c] = {str(v): float(loss[values == v].mean()) for v in sorted(set(values))}
    return out


def fit_thresholds(
    ensemble: SisaEnsemble, retained: TabularData, mitigation: dict[str, Any], inputs: Any
) -> GroupThresholds | None:
    """Per-group decision thresholds of the flagged column (the first flagged one, or the
    model's first group column), fitted on a sample of the retained rows."""
    flagged = [str(f["column"]) for f in mitigation.get("flagged", []) if "column" in f]
    columns = flagged or list(inputs.spec.group_columns)
    if not columns or columns[0] not in retained.columns or ensemble.manifest.n_classes != 2:
        return None
    rows = _sample(retained, 1)
    v = inputs.spec.verification
    return fit_group_thresholds(
        ensemble.predict_proba(rows.columns),
        rows.labels,
        np.asarray(rows.columns[columns[0]]),
        columns[0],
        min_group_size=v.min_group_size,
    )
