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
from sqlalchemy import insert, select, update
from sqlalchemy.orm import Session

from app.audit import service as audit
from app.core.db import session_scope
from app.core.settings import get_settings
from app.core.storage import get_store
from app.datasets import service as datasets
from app.jobs import service as jobs
from app.ml.config import ArchitectureConfig, FeatureSpec, SisaConfig, TrainingConfig
from app.ml.data import TabularData
from app.ml.device import derive_seed, enable_determinism, resolve_device
from app.ml.metrics import accuracy
from app.ml.sharding import assign_shards, assign_slices
from app.ml.sisa import SisaEnsemble, train_sisa, unlearn_sisa
from app.models import DeletionRequest, Job, Lineage, MLModel, ModelVersion, Record, RequestModel
from app.registry import artifacts
from app.registry import service as registry
from app.requests.lifecycle import advance
from app.requests.service import transition
from app.verification import service as verification

log = logging.getLogger(__name__)
WORKER = "worker"


class ModelBusy(Exception):
    """Another job holds the model's lock; the task retries later."""


def _configs(
    model: MLModel,
) -> tuple[ArchitectureConfig, TrainingConfig, SisaConfig, FeatureSpec, int]:
    c = model.config
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
    job = session.get(Job, job_id)
    if job is None or job.kind != kind or job.status in ("succeeded", "failed"):
        return None  # idempotent: a redelivered task finds its work done
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
    arch, training, sisa, spec, n_classes = _configs_from(config)
    data = datasets.to_tabular(ds, datasets.read_partitions(store, ds), active)
    test_mask = _is_test(data.record_ids, training.seed, test_fraction)
    train, test = data.take(~test_mask), data.take(test_mask)
    shard_of = assign_shards(train, sisa, training.seed)
    slice_of = assign_slices(train.record_ids, sisa.slices, training.seed)
    report = jobs.ProgressReporter(job_id)
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
    rel = artifacts.save_manifest(store, model_id, 1, manifest)
    ensemble = SisaEnsemble.load(manifest, artifacts.checkpoint_store(store, model_id), device)
    metrics = _metrics(ensemble, test, len(train))
    wall = time.perf_counter() - t0
    with session_scope() as s:
        job = s.get(Job, job_id)
        model = s.get(MLModel, model_id)
        assert job is not None and model is not None
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
            "version": 1,
            "metrics": metrics,
            "shards": sisa.shards,
            "slices": sisa.slices,
        }
        jobs.finish(
            s,
            job,
            ok=True,
            wall_seconds=wall,
            device=str(device),
            device_seconds=wall,
            retrain_estimate_seconds=wall,
        )
        jobs.unlock(s, model_id, job_id)


def _configs_from(
    config: dict[str, Any],
) -> tuple[ArchitectureConfig, TrainingConfig, SisaConfig, FeatureSpec, int]:
    return _configs(MLModel(config=config))


def _metrics(ensemble: SisaEnsemble, test: TabularData, n_train: int) -> dict[str, Any]:
    acc = accuracy(ensemble.predict_proba(test.columns), test.labels) if len(test) else None
    return {"test_accuracy": acc, "test_rows": len(test), "train_rows": n_train}


# -- unlearning -------------------------------------------------------------------------


def run_unlearning(job_id: str) -> None:
    t0 = time.perf_counter()
    with session_scope() as s:
        job = _begin(s, job_id, "unlearn")
        if job is None:
            return
        rms = s.scalars(select(RequestModel).where(RequestModel.job_id == job_id)).all()
        request_ids = sorted({rm.request_id for rm in rms})
        model = s.get(MLModel, job.model_id)
        assert model is not None
        if model.production_version is None:
            raise RuntimeError(f"model {model.name} has no production version to unlearn from")
        base_version = model.production_version
        base = registry.get_version(s, model, base_version)
        for rm in rms:
            rm.status = "unlearning"
            rm.from_version = base_version
        for req in s.scalars(select(DeletionRequest).where(DeletionRequest.id.in_(request_ids))):
            if req.status == "planned":
                transition(s, req, "unlearning", WORKER, job_id=job_id)
        lineage = s.execute(
            select(Lineage.record_id, Lineage.shard, Lineage.slice, Lineage.split, Record.status)
            .join(Record, Record.id == Lineage.record_id)
            .where(Lineage.model_id == model.id, Lineage.to_version.is_(None))
            .order_by(Lineage.record_id)
        ).all()
        ds = datasets.get(s, model.dataset_id)
        s.expunge(ds)
        model_id, config, manifest_rel = model.id, model.config, base.manifest_path
        retrain_estimate = _retrain_estimate(s, model_id)
    store = get_store()
    device = _device()
    ckpt = artifacts.checkpoint_store(store, model_id)
    ids = np.asarray([r[0] for r in lineage], dtype=np.int64)
    shard = np.asarray([r[1] for r in lineage], dtype=np.int64)
    slc = np.asarray([r[2] for r in lineage], dtype=np.int64)
    is_train = np.asarray([r[3] == "train" for r in lineage], dtype=bool)
    is_active = np.asarray([r[4] == "active" for r in lineage], dtype=bool)
    forgotten = ids[is_train & ~is_active]
    retained_mask = is_train & is_active
    if len(forgotten) == 0:
        _nothing_to_forget(job_id, model_id, base_version, request_ids, time.perf_counter() - t0)
        return
    manifest = artifacts.load_manifest(store, manifest_rel)
    table = datasets.read_partitions(store, ds)
    retained = datasets.to_tabular(ds, table, ids[retained_mask])
    test = datasets.to_tabular(ds, table, ids[~is_train & is_active])
    # to_tabular sorts by id, as `ids` is; the layout arrays line up with it.
    new_manifest, stats = unlearn_sisa(
        manifest,
        retained,
        shard[retained_mask],
        slc[retained_mask],
        forgotten,
        store=ckpt,
        device=device,
        progress=jobs.ProgressReporter(job_id).sub(0.0, 0.8),
    )
    unlearn_seconds = time.perf_counter() - t0
    new_version = base_version + 1
    rel = artifacts.save_manifest(store, model_id, new_version, new_manifest)
    jobs.ProgressReporter(job_id)(0.85)
    candidate = SisaEnsemble.load(new_manifest, ckpt, device)
    baseline = SisaEnsemble.load(manifest, ckpt, device)
    checks = {
        "lineage": verification.lineage_check(new_manifest, forgotten),
        "utility": verification.utility_check(
            candidate,
            baseline,
            test,
            config.get("verification", {}).get("utility_max_drop")
            or get_settings().utility_max_drop,
        ),
    }
    metrics = _metrics(candidate, test, len(retained))
    wall = time.perf_counter() - t0
    with session_scope() as s:
        job = s.get(Job, job_id)
        model = s.get(MLModel, model_id)
        assert job is not None and model is not None
        mv = ModelVersion(
            model_id=model_id,
            version=new_version,
            status="candidate",
            created_by_job=job_id,
            metrics=metrics | {"unlearning": stats.to_dict()},
            manifest=artifacts.summary(new_manifest, rel),
            manifest_path=rel,
            schema={
                "features": new_manifest.feature_spec.to_dict(),
                "label_classes": config["resolved"]["label_classes"],
            },
        )
        s.add(mv)
        for i in range(0, len(forgotten), 900):
            s.execute(
                update(Lineage)
                .where(
                    Lineage.model_id == model_id,
                    Lineage.record_id.in_([int(x) for x in forgotten[i : i + 900]]),
                )
                .values(to_version=base_version)
            )
        s.flush()
        report = verification.save_report(s, model, job_id, new_version, base_version, checks)
        rms = s.scalars(select(RequestModel).where(RequestModel.job_id == job_id)).all()
        if report.decision == "promote":
            registry.promote(s, model, mv, WORKER, reason=f"unlearning job {job_id}")
        for rm in rms:
            rm.to_version = new_version
            rm.method = "sisa"
            rm.report_id = report.id
            rm.status = "promoted" if report.passed else "needs_review"
        job.report_id = report.id
        job.result = {
            "version": new_version,
            "decision": report.decision,
            "unlearning": stats.to_dict(),
            "forgotten_records": len(forgotten),
            "unlearn_seconds": unlearn_seconds,
        }
        jobs.finish(
            s,
            job,
            ok=True,
            wall_seconds=wall,
            device=str(device),
            device_seconds=unlearn_seconds,
            retrain_estimate_seconds=retrain_estimate,
        )
        jobs.unlock(s, model_id, job_id)
        advance(s, request_ids)


def _nothing_to_forget(
    job_id: str, model_id: str, version: int, request_ids: list[str], wall: float
) -> None:
    """The job's records are already out of the production version (a batch-mate's job
    removed them): the current version stands, nothing is retrained."""
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None
        for rm in s.scalars(select(RequestModel).where(RequestModel.job_id == job_id)):
            rm.status, rm.to_version, rm.method = "promoted", version, "none"
        job.result = {"version": version, "decision": "nothing_to_forget"}
        jobs.finish(s, job, ok=True, wall_seconds=wall, device="cpu", device_seconds=0.0)
        jobs.unlock(s, model_id, job_id)
        advance(s, request_ids)


def _retrain_estimate(session: Session, model_id: str) -> float | None:
    """What a full retrain costs: the wall time of this model's training job."""
    job = session.scalars(
        select(Job).where(Job.model_id == model_id, Job.kind == "train", Job.status == "succeeded")
    ).first()
    return float(job.cost.get("wall_seconds", 0.0)) if job else None


def fail_job(job_id: str, error: str) -> None:
    """Final failure after retries: the job fails, its model unlocks, requests are flagged."""
    with session_scope() as s:
        job = s.get(Job, job_id)
        if job is None or job.status in ("succeeded", "failed"):
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
