"""What the GPU worker runs: training a model's first version and unlearning jobs.

Each job works in short transactions around long computation, so progress (written in
transactions of its own) and the API stay live, and SQLite's single writer is never
held while tensors are crunched.
"""

from __future__ import annotations

import logging
import time
from typing import Any

import numpy as np
import torch
from sqlalchemy import insert, select
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.core.db import session_scope
from app.core.settings import get_settings
from app.core.storage import get_store
from app.datasets import service as datasets
from app.jobs import lease
from app.jobs import service as jobs
from app.jobs.energy import EnergyMeter
from app.ml.config import ArchitectureConfig, FeatureSpec, SisaConfig, TrainingConfig
from app.ml.data import TabularData
from app.ml.device import derive_seed, enable_determinism, resolve_device
from app.ml.metrics import accuracy
from app.ml.preprocess import PreprocessorState
from app.ml.sharding import assign_shards, assign_slices
from app.ml.sisa import SisaEnsemble, SisaManifest, train_sisa, unlearn_sisa
from app.models import DeletionRequest, Job, Lineage, MLModel, ModelVersion, Record, RequestModel
from app.registry import artifacts, fanout, monolithic, references
from app.registry import service as registry
from app.registry.candidate import (
    Candidate,
    JobContext,
    begin_verification,
    conclude,
    load_context,
)
from app.requests.lifecycle import advance
from app.requests.service import transition
from app.verification import service as verification
from app.verification.fairness import fairness
from app.verification.forgetting import forgetting
from app.verification.injection import injection
from app.webhooks import service as webhooks

log = logging.getLogger(__name__)
WORKER = "worker"


class ModelBusy(Exception):
    """Another job holds the model's lock; the task retries later."""


def _configs(
    c: dict[str, Any],
) -> tuple[ArchitectureConfig, TrainingConfig, SisaConfig, FeatureSpec, int]:
    """The engine configs of a model's stored creation body."""
    spec = FeatureSpec.from_dict(c["resolved"]["feature_spec"])
    return (
        ArchitectureConfig.from_dict(c["architecture"]),
        TrainingConfig.from_dict(c["training"]),
        SisaConfig.from_dict(c["unlearning"]),
        spec,
        len(c["resolved"]["label_classes"]),
    )


def _device() -> torch.device:
    settings = get_settings()
    if settings.torch_threads:
        torch.set_num_threads(settings.torch_threads)
    enable_determinism()
    return resolve_device(settings.device)


def _is_test(record_ids: np.ndarray, seed: int, fraction: float) -> np.ndarray:
    cut = int(fraction * 1_000_000)
    return np.fromiter(
        (derive_seed(seed, "test-split", int(r)) % 1_000_000 < cut for r in record_ids),
        dtype=bool,
        count=len(record_ids),
    )


def _begin(session: Session, job_id: str, kind: str) -> Job | None:
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
    if not jobs.try_lock(session, job.model_id, job.id):
        raise ModelBusy(job.model_id)
    jobs.start(session, job)
    return job


# -- training ---------------------------------------------------------------------------


def run_training(job_id: str) -> None:
    t0 = time.perf_counter()
    with session_scope() as s:
        job = _begin(s, job_id, "train")
        if job is None:
            return
        token = job.attempts
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
        model_id, config, test_fraction = (
            model.id,
            model.config,
            float(model.config["test_fraction"]),
        )
        s.expunge(ds)
    store = get_store()
    device = _device()
    arch, training, sisa, spec, n_classes = _configs(config)
    data = datasets.to_tabular(ds, datasets.read_partitions(store, ds), active)
    test_mask = _is_test(data.record_ids, training.seed, test_fraction)
    train, test = data.take(~test_mask), data.take(test_mask)
    shard_of = assign_shards(train, sisa, training.seed)
    slice_of = assign_slices(train.record_ids, sisa.slices, training.seed)
    report = jobs.ProgressReporter(job_id)
    meter = EnergyMeter(device)
    extra: dict[str, Any] = {}
    if monolithic.is_certified(config):
        manifest, extra = monolithic.train_certified_manifest(
            train,
            feature_spec=spec,
            arch=arch,
            training=training,
            sisa=sisa,
            n_classes=n_classes,
            model_key=model_id,
            cfg=monolithic.certified_config(config),
            store=artifacts.checkpoint_store(store, model_id),
            device=device,
        )
    else:
        manifest = train_sisa(
            train,
            shard_of,
            slice_of,
            feature_spec=spec,
            arch=arch,
            training=training,
            sisa=sisa,
            n_classes=n_classes,
            model_key=model_id,
            store=artifacts.checkpoint_store(store, model_id),
            device=device,
            progress=report.sub(0.0, 0.95),
        )
    if config["unlearning"]["mode"] == "monolithic":
        # Shadow models with known membership calibrate the forgetting check later.
        references.train_references(
            store,
            model_id,
            train,
            k=int(config.get("verification", {}).get("reference_models", 2)),
            feature_spec=spec,
            arch=arch,
            training=training,
            n_classes=n_classes,
            device=device,
        )
    lease.check(job_id)  # a taken-over execution writes no version
    rel = artifacts.save_manifest(store, model_id, 1, manifest)
    ensemble = SisaEnsemble.load(manifest, artifacts.checkpoint_store(store, model_id), device)
    metrics = _metrics(ensemble, test, len(train))
    wall = time.perf_counter() - t0
    with session_scope() as s:
        job = jobs.claim(s, job_id, token)
        model = s.get(MLModel, model_id)
        assert model is not None
        rows: list[dict[str, Any]] = [
            {
                "record_id": int(r),
                "model_id": model_id,
                "shard": int(sh),
                "slice": int(sl),
                "split": "train",
                "from_version": 1,
            }
            for r, sh, sl in zip(train.record_ids, shard_of, slice_of, strict=True)
        ] + [
            {
                "record_id": int(r),
                "model_id": model_id,
                "shard": -1,
                "slice": -1,
                "split": "test",
                "from_version": 1,
            }
            for r in test.record_ids
        ]
        for i in range(0, len(rows), 5000):
            s.execute(insert(Lineage), rows[i : i + 5000])
        mv = ModelVersion(
            model_id=model_id,
            version=1,
            status="candidate",
            created_by_job=job_id,
            metrics=metrics,
            manifest=artifacts.summary(manifest, rel),
            manifest_path=rel,
            schema={
                "features": spec.to_dict(),
                "label_classes": config["resolved"]["label_classes"],
            },
        )
        s.add(mv)
        s.flush()
        registry.promote(s, model, mv, WORKER, reason="first version")
        model.status = "ready"
        job.result = {
            **job.result,
            "version": 1,
            "metrics": metrics,
            "shards": sisa.shards,
            "slices": sisa.slices,
            **extra,
        }
        jobs.finish(
            s,
            job,
            ok=True,
            wall_seconds=wall,
            device=str(device),
            device_seconds=wall,
            retrain_estimate_seconds=wall,
            energy_joules=meter.joules(),
        )
        jobs.unlock(s, model_id, job_id)


def _metrics(
    ensemble: SisaEnsemble,
    test: TabularData,
    n_train: int,
    checks: dict[str, verification.Check] | None = None,
) -> dict[str, Any]:
    """A version's headline metrics; the utility check's candidate accuracy, when there
    is one, is the same number on the same rows, so it is not computed twice."""
    util = (checks or {}).get("utility")
    acc = util.metrics.get("candidate_accuracy") if util is not None else None
    if acc is None and len(test):
        acc = accuracy(ensemble.predict_proba(test.columns), test.labels)
    return {"test_accuracy": acc, "test_rows": len(test), "train_rows": n_train}


# -- unlearning -------------------------------------------------------------------------


def _removed_features(config: dict[str, Any], new: list[tuple[str, str]]) -> list[dict[str, str]]:
    out: list[dict[str, str]] = list(config["resolved"].get("removed_features", []))
    have = {d["feature"] for d in out}
    out += [{"feature": f, "request_id": r} for f, r in new if f not in have]
    return out


def _max_drop(config: dict[str, Any]) -> float:
    # An explicit 0 means "no drop at all", not "use the default".
    value = config.get("verification", {}).get("utility_max_drop")
    return float(get_settings().utility_max_drop if value is None else value)


def run_unlearning(job_id: str) -> None:
    with session_scope() as s:
        peek = s.get(Job, job_id)
        method = peek.method if peek is not None else None
        if peek is not None and peek.status == "pending" and peek.not_before is not None:
            return  # held by its model's batching policy: the beat sends it when due
    if method == "feature":
        from app.registry import retraining  # it builds on this module's helpers

        retraining.run_feature(job_id)
        return
    t0 = time.perf_counter()
    started = time.time()
    with session_scope() as s:
        job = _begin(s, job_id, "unlearn")
        if job is None:
            return
        ctx = load_context(s, job, "unlearning")
    store = get_store()
    device = _device()
    ckpt = artifacts.checkpoint_store(store, ctx.model_id)
    forgotten = ctx.forgotten
    if len(forgotten) == 0:
        _nothing_to_forget(
            job_id, ctx.model_id, ctx.base_version, ctx.request_ids, time.perf_counter() - t0
        )
        return
    manifest = artifacts.load_manifest(store, ctx.manifest_rel)
    sisa = ctx.config["unlearning"]["mode"] != "monolithic"
    affected = sorted(manifest.shards_containing(int(i) for i in forgotten))
    if sisa and len(affected) > 1:
        # Several shards: one task each, shared by the GPU workers (a Celery chord).
        fanout.dispatch(
            ctx, started, purpose="unlearn", spec=manifest.feature_spec, shards=affected
        )
        return
    table = datasets.read_partitions(store, ctx.ds)
    retained_mask = ctx.retained_mask
    retained = datasets.to_tabular(ctx.ds, table, ctx.ids[retained_mask])
    progress = jobs.ProgressReporter(job_id).sub(0.0, 0.8)
    meter = EnergyMeter(device)
    # to_tabular sorts by id, as `ids` is; the layout arrays line up with it.
    if not sisa:
        # Quarantined rows are still readable: approximate methods need their gradients.
        forget = datasets.to_tabular(ctx.ds, table, forgotten)
        new_manifest, result = monolithic.approximate_unlearn(
            manifest,
            retained,
            forget,
            config=ctx.config,
            job_id=job_id,
            store=ckpt,
            device=device,
            progress=progress,
        )
    else:
        new_manifest, stats = unlearn_sisa(
            manifest,
            retained,
            ctx.shard[retained_mask],
            ctx.slc[retained_mask],
            forgotten,
            store=ckpt,
            device=device,
            progress=progress,
            sample_weight=artifacts.sample_weights(manifest, retained),
        )
        result = {
            "method": "sisa",
            "approximate": False,
            "weighted": manifest.weighting is not None,
            **stats.to_dict(),
        }
    # Approximate methods do not apply a mitigation's weights, but later exact trainings
    # of this model (a fallback retrain) still must: the table stays with the model.
    new_manifest.weighting = manifest.weighting
    result["energy_joules"] = meter.joules()
    verify_unlearning(
        ctx, manifest, new_manifest, result, len(retained), time.perf_counter() - t0, started
    )


def verify_candidate(
    ctx: JobContext,
    manifest: SisaManifest,
    new_manifest: SisaManifest,
    result: dict[str, Any],
    *,
    forgotten: np.ndarray,
    features: list[str],
    removed_features: list[dict[str, str]],
    allow_retrain: bool,
    n_retained: int,
    compute: float,
    started: float,
) -> None:
    """Save the candidate, run every check that applies to it, and conclude the job.

    Lineage for exact methods that dropped records; utility, fairness and (with records
    forgotten) forgetting always; the injection test for approximate strategies; the
    flip test for each feature removed by this job."""
    store = get_store()
    device = _device()
    ckpt = artifacts.checkpoint_store(store, ctx.model_id)
    exact = not result["approximate"]
    lease.check(ctx.job_id)  # a taken-over execution writes no candidate
    rel = artifacts.save_manifest(store, ctx.model_id, ctx.new_version, new_manifest)
    jobs.ProgressReporter(ctx.job_id)(0.85)
    begin_verification(ctx)
    table = datasets.read_partitions(store, ctx.ds)
    test = datasets.to_tabular(ctx.ds, table, ctx.test_ids)
    # Quarantined rows stay readable until erasure: the attack needs them.
    forget = datasets.to_tabular(ctx.ds, table, forgotten) if len(forgotten) else None
    candidate = SisaEnsemble.load(new_manifest, ckpt, device)
    baseline = SisaEnsemble.load(manifest, ckpt, device)
    checks: dict[str, verification.Check] = {}
    if exact and len(forgotten):
        # Manifests prove exclusion only for exact methods; approximate ones rely on
        # the other checks.
        checks["lineage"] = verification.lineage_check(new_manifest, forgotten)
    members = None
    if forget is not None and len(forget):
        # A sample of the retained training rows: the dashboard draws their membership
        # scores beside the forgotten records' (what "still a member" looks like).
        pool = ctx.ids[ctx.retained_mask]
        rng = np.random.default_rng(derive_seed(ctx.job_id, "members") % (2**32))
        pick = np.sort(rng.choice(pool, size=min(len(pool), 400), replace=False))
        members = datasets.to_tabular(ctx.ds, table, pick)
    checks |= quality_checks(
        ctx, candidate, baseline, test, forget, device, exact=exact, retained=members
    )
    if not exact and forget is not None and not monolithic.is_certified(ctx.config):
        # Izzo et al.'s injection test of the strategy itself, on a sample of this job.
        v = ctx.config.get("verification", {})
        checks["injection"] = injection(
            ctx.config,
            PreprocessorState.from_dict(new_manifest.entries[0].preprocessor),
            datasets.to_tabular(ctx.ds, table, ctx.ids[ctx.retained_mask]),
            forget,
            strategy=monolithic.strategy_name(ctx.config),
            device=device,
            seed=derive_seed(ctx.job_id, "injection") % (2**31),
            max_residual=v.get("injection_max_residual"),
        )
    for feature in features:
        checks["feature"] = verification.feature_check(candidate, baseline, test, feature)
    conclude(
        ctx,
        Candidate(
            manifest=new_manifest,
            rel=rel,
            checks=checks,
            metrics=_metrics(candidate, test, n_retained, checks),
            result=result,
            forgotten=forgotten,
            removed_features=removed_features,
            allow_retrain=allow_retrain,
            device=str(device),
            compute_seconds=compute,
            wall_seconds=max(0.0, time.time() - started),
        ),
    )


def verify_unlearning(
    ctx: JobContext,
    manifest: SisaManifest,
    new_manifest: SisaManifest,
    result: dict[str, Any],
    n_retained: int,
    compute: float,
    started: float,
) -> None:
    """An unlearning job's candidate: it forgot the job's quarantined records."""
    verify_candidate(
        ctx,
        manifest,
        new_manifest,
        result,
        forgotten=ctx.forgotten,
        features=[],
        removed_features=_removed_features(ctx.config, []),
        allow_retrain=True,
        n_retained=n_retained,
        compute=compute,
        started=started,
    )


def quality_checks(
    ctx: JobContext,
    candidate: SisaEnsemble,
    baseline: SisaEnsemble,
    test: TabularData,
    forget: TabularData | None,
    device: torch.device,
    *,
    exact: bool = True,
    retained: TabularData | None = None,
) -> dict[str, verification.Check]:
    """Utility and fairness always; forgetting when records were forgotten, calibrated by
    out-references (a SISA model's own shards; a monolithic model's half-data models)."""
    v = ctx.config.get("verification", {})
    checks = {
        "utility": verification.utility_check(candidate, baseline, test, _max_drop(ctx.config)),
        "fairness": fairness(
            candidate,
            baseline,
            test,
            list(ctx.config.get("group_columns") or []),
            threshold=float(v.get("fairness_max_drop", 0.05)),
            min_group_size=int(v.get("min_group_size", 30)),
        ),
    }
    if forget is not None and len(forget):
        if ctx.config["unlearning"]["mode"] == "monolithic":
            refs = references.load(get_store(), ctx.model_id, device)
        else:
            refs = baseline
        checks["forgetting"] = forgetting(
            candidate,
            baseline,
            refs,
            forget,
            test,
            margin=float(v.get("forgetting_margin", 0.05)),
            exact=exact,
            seed=derive_seed(ctx.job_id, "forgetting") % (2**31),
            retained=retained,
        )
    return checks


def _nothing_to_forget(
    job_id: str, model_id: str, version: int, request_ids: list[str], wall: float
) -> None:
    """The job's records are already out of the production version (a batch-mate's job
    removed them): the current version stands, nothing is retrained."""
    with session_scope() as s:
        job = jobs.claim(s, job_id, lease.token(job_id))
        for rm in s.scalars(select(RequestModel).where(RequestModel.job_id == job_id)):
            rm.status, rm.to_version, rm.method = "promoted", version, "none"
        job.result = {**job.result, "version": version, "decision": "nothing_to_forget"}
        jobs.finish(s, job, ok=True, wall_seconds=wall, device="cpu", device_seconds=0.0)
        jobs.unlock(s, model_id, job_id)
        advance(s, request_ids)


def fail_job(job_id: str, error: str, token: int | None = None) -> None:
    """Final failure after retries: the job fails, its model unlocks, requests are flagged.
    With `token`, only while that execution still owns the job (not after a takeover)."""
    with session_scope() as s:
        job = s.get(Job, job_id, with_for_update=True)
        if job is None or job.status in ("succeeded", "failed"):
            return
        if token is not None and not lease.owned(job, token):
            return
        jobs.finish(s, job, ok=False, error=error[:2000])
        jobs.unlock(s, job.model_id, job_id)
        model = s.get(MLModel, job.model_id)
        if job.kind == "train" and model is not None:
            model.status = "failed"
        rms = s.scalars(select(RequestModel).where(RequestModel.job_id == job_id)).all()
        for rm in rms:
            rm.status = "failed"
        for req in s.scalars(
            select(DeletionRequest).where(DeletionRequest.id.in_({rm.request_id for rm in rms}))
        ):
            req.error = f"job {job_id} failed: {error[:500]}"
            transition(s, req, "failed", WORKER, job_id=job_id)
        audit.record(
            s,
            actor=WORKER,
            action="job.failed",
            entity_type="job",
            entity_id=job_id,
            data={"kind": job.kind, "error": error[:500]},
        )
        webhooks.job_failed(s, job, [rm.request_id for rm in rms])
