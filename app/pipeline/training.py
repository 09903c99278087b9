"""A model's first version: train it (SISA or monolithic), record its lineage, promote.

The job works in short transactions around long computation, so progress (written in
transactions of its own) and the API stay live, and SQLite's single writer is never
held while tensors are crunched.
"""

from __future__ import annotations

import time
from typing import Any

import numpy as np
import pyarrow as pa
from sqlalchemy import insert

from app.core.db import session_scope
from app.core.settings import get_settings
from app.core.storage import get_store
from app.datasets import service as datasets
from app.jobs import lease
from app.jobs import service as jobs
from app.jobs.energy import EnergyMeter
from app.ml.data import TabularData
from app.ml.metrics import accuracy
from app.ml.sharding import assign_shards, assign_slices
from app.ml.sisa import SisaEnsemble, train_sisa
from app.models import Lineage, MLModel, ModelVersion
from app.pipeline import imports, methods
from app.pipeline.inputs import Phases
from app.pipeline.outputs import ShardOutputs, SharedEnsemble, save_test_outputs
from app.pipeline.spec import ModelSpec, seed_key
from app.pipeline.start import WORKER, begin_first_version, device, test_split
from app.registry import artifacts, references
from app.registry import service as registry
from app.verification.service import Check


def run_training(job_id: str) -> None:
    if imports.is_import(job_id):  # a model trained elsewhere: nothing to train
        imports.run_import(job_id)
        return
    t0 = time.perf_counter()
    phases = Phases()
    started = begin_first_version(job_id)
    if started is None:
        return
    token, model_id, config = started.token, started.model_id, started.config
    ds, active = started.ds, started.active
    # Seeds and content addresses of a new model derive from its name and training
    # seed, not from the install's random model id: the same data and settings give
    # the same models (and verdicts) on any install.
    key = seed_key(started.model_name)
    spec = ModelSpec.of(model_id, config)
    store = get_store()
    dev = device()
    with phases.timed("load"):
        read: list[pa.Table] = []
        warm = datasets.warm_rows(store, ds, active, get_settings(), read.append)
        if warm is not None:
            data = warm[0]
            phases.warm_reads = int(warm[1])
        else:
            table = read[0] if read else datasets.read_partitions(store, ds)
            data = datasets.to_tabular(ds, table, active, store)
        phases.parquet_reads += 1 if read or warm is None else 0
    test_mask = test_split(data.record_ids, spec.training.seed, spec.test_fraction)
    train, test = data.take(~test_mask), data.take(test_mask)
    shard_of = assign_shards(train, spec.sisa, spec.training.seed)
    slice_of = assign_slices(train.record_ids, spec.sisa.slices, spec.training.seed)
    report = jobs.ProgressReporter(job_id)
    meter = EnergyMeter(dev)
    extra: dict[str, Any] = {}
    ckpt = artifacts.checkpoint_store(store, model_id)
    with phases.timed("compute"):
        if spec.unlearning.certified:
            manifest, extra = methods.train_certified_manifest(
                train,
                feature_spec=spec.feature_spec,
                arch=spec.arch,
                training=spec.training,
                sisa=spec.sisa,
                n_classes=spec.n_classes,
                model_key=key,
                cfg=spec.unlearning.certified_config(),
                store=ckpt,
                device=dev,
            )
        else:
            manifest = train_sisa(
                train,
                shard_of,
                slice_of,
                feature_spec=spec.feature_spec,
                arch=spec.arch,
                training=spec.training,
                sisa=spec.sisa,
                n_classes=spec.n_classes,
                model_key=key,
                store=ckpt,
                device=dev,
                progress=report.sub(0.0, 0.95),
            )
        if not spec.unlearning.is_sisa:
            # Shadow models with known membership calibrate the forgetting check later.
            references.train_references(
                store,
                model_id,
                train,
                seed_key=key,
                k=spec.verification.reference_models,
                feature_spec=spec.feature_spec,
                arch=spec.arch,
                training=spec.training,
                n_classes=spec.n_classes,
                device=dev,
            )
    lease.check(job_id)  # a taken-over execution writes no version
    rel = artifacts.save_manifest(store, model_id, 1, manifest)
    with phases.timed("metrics"):
        outputs = ShardOutputs()
        ensemble = SharedEnsemble.of(SisaEnsemble.load(manifest, ckpt, dev), outputs)
        metrics = version_metrics(ensemble, test, len(train))
    t_conclude = time.perf_counter()
    with session_scope() as s:
        job = jobs.claim(s, job_id, token)
        model = s.get(MLModel, model_id)
        assert model is not None
        _write_lineage(s, model_id, train, shard_of, slice_of, test)
        mv = ModelVersion(
            model_id=model_id,
            version=1,
            status="candidate",
            created_by_job=job_id,
            metrics=metrics,
            manifest=artifacts.summary(manifest, rel),
            manifest_path=rel,
            schema={
                "features": spec.feature_spec.to_dict(),
                "label_classes": list(spec.label_classes),
            },
        )
        s.add(mv)
        s.flush()
        registry.promote(s, model, mv, WORKER, reason="first version")
        model.status = "ready"
        phases.add("conclude", time.perf_counter() - t_conclude)
        wall = time.perf_counter() - t0
        job.result = {
            **job.result,
            "version": 1,
            "metrics": metrics,
            "shards": spec.sisa.shards,
            "slices": spec.sisa.slices,
            "phases": phases.to_dict(),
            **extra,
        }
        jobs.finish(
            s,
            job,
            ok=True,
            wall_seconds=wall,
            device=str(dev),
            device_seconds=wall,
            retrain_estimate_seconds=wall,
            energy_joules=meter.joules(),
        )
        jobs.unlock(s, model_id, job_id)
    # The first version serves now: its shard outputs on the test rows are kept for the
    # first unlearning job's verification.
    save_test_outputs(
        store,
        model_id,
        test.record_ids,
        manifest,
        outputs.of(test.columns, list(ensemble.keys.values())),
    )


def _write_lineage(
    session: Any,
    model_id: str,
    train: TabularData,
    shard_of: np.ndarray,
    slice_of: np.ndarray,
    test: TabularData,
) -> None:
    """Which version, shard and slice each record reached (test rows: shard -1)."""
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
        session.execute(insert(Lineage), rows[i : i + 5000])


def version_metrics(
    ensemble: SisaEnsemble,
    test: TabularData,
    n_train: int,
    checks: dict[str, Check] | None = None,
) -> dict[str, Any]:
    """A version's headline metrics; the utility check's candidate accuracy, when there
    is one, is the same number on the same rows, so it is not computed twice."""
    util = (checks or {}).get("utility")
    acc = util.metrics.get("candidate_accuracy") if util is not None else None
    if acc is None and len(test):
        acc = accuracy(ensemble.predict_proba(test.columns), test.labels)
    return {"test_accuracy": acc, "test_rows": len(test), "train_rows": n_train}
