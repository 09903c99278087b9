"""A feature-removal job (kind `unlearn`, method `feature`, its own Celery task): make
the model blind to the requested feature. SISA models retrain every shard without it,
fanned out as a Celery chord; monolithic ones (and SISA in approximate feature mode) are
updated in this task."""

from __future__ import annotations

import time

from app.core.db import session_scope
from app.jobs import service as jobs
from app.pipeline import fanout, methods, tokens
from app.pipeline.conclude import fall_back_to_retrain
from app.pipeline.inputs import JobInputs, build
from app.pipeline.outcome import RequestEvents
from app.pipeline.start import begin, device
from app.pipeline.verify import verify_feature
from app.registry import artifacts


def run_feature(job_id: str, events: RequestEvents) -> None:
    t0 = time.perf_counter()
    with session_scope() as s:
        job = begin(s, job_id, "unlearn")
        if job is None:
            return
        inputs = build(s, job, "unlearning", events)
    if not inputs.features:
        raise RuntimeError(f"feature job {job_id} has no feature request attached")
    feature, _ = inputs.features[0]
    manifest = inputs.manifest
    u = inputs.spec.unlearning
    words = tokens.tokens_of(inputs.request_ids)
    if words:
        _run_tokens(inputs, events, feature, words, t0)
        return
    if u.exact_features and feature not in manifest.feature_spec.removed:
        # The job keeps its model lock; the chord's callback concludes and releases it.
        fanout.dispatch(
            inputs,
            purpose="feature",
            spec=methods.spec_without(manifest.feature_spec, [feature]),
            shards=list(range(manifest.sisa.shards)),
        )
        return
    dev = device()
    ckpt = artifacts.checkpoint_store(inputs.store, inputs.model_id)
    mask = inputs.retained_mask
    retained = inputs.retained()
    progress = jobs.ProgressReporter(job_id).sub(0.0, 0.8)
    t_compute = time.perf_counter()
    try:
        if feature in manifest.feature_spec.removed:
            new_manifest, result = manifest, {"method": "none", "approximate": False}
        elif u.is_sisa:
            new_manifest, result = methods.approximate_sisa_feature(
                manifest,
                retained,
                inputs.shard[mask],
                feature,
                job_id=job_id,
                store=ckpt,
                device=dev,
                progress=progress,
            )
        else:
            new_manifest, result = methods.feature_unlearn(
                manifest,
                retained,
                feature,
                u=u,
                job_id=job_id,
                store=ckpt,
                device=dev,
                progress=progress,
            )
    except Exception as exc:
        # The retraining job drops the feature too (it is attached to its requests).
        fall_back_to_retrain(inputs, events, "feature", exc)
        return
    inputs.phases.add("compute", time.perf_counter() - t_compute)
    result["feature"] = feature
    new_manifest.weighting = manifest.weighting
    new_manifest.thresholds = manifest.thresholds
    verify_feature(inputs, new_manifest, result, events, len(retained), time.perf_counter() - t0)


def _run_tokens(
    inputs: JobInputs, events: RequestEvents, feature: str, words: dict[str, list[str]], t0: float
) -> None:
    """Words forgotten from a text column: exact shard retraining under the new tokenizer
    (SISA, exact feature mode) or the repair of each model (app.pipeline.tokens)."""
    manifest = inputs.manifest
    u = inputs.spec.unlearning
    if u.exact_features:
        fanout.dispatch(
            inputs,
            purpose="feature",
            spec=tokens.spec_blocking(manifest.feature_spec, words),
            shards=list(range(manifest.sisa.shards)),
        )
        return
    mask = inputs.retained_mask
    retained = inputs.retained()
    t_compute = time.perf_counter()
    try:
        new_manifest, result = tokens.approximate_tokens(
            manifest,
            retained,
            inputs.shard[mask],
            words,
            job_id=inputs.job_id,
            store=artifacts.checkpoint_store(inputs.store, inputs.model_id),
            device=device(),
            progress=jobs.ProgressReporter(inputs.job_id).sub(0.0, 0.8),
        )
    except Exception as exc:
        fall_back_to_retrain(inputs, events, "feature", exc)
        return
    inputs.phases.add("compute", time.perf_counter() - t_compute)
    result["feature"] = feature
    result["tokens"] = words
    new_manifest.weighting = manifest.weighting
    verify_feature(inputs, new_manifest, result, events, len(retained), time.perf_counter() - t0)
