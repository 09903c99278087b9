"""An imported model's first job (kind `train`, method `import`): no training of the model
itself. It records which rows the uploaded network saw, trains the reference models the
forgetting check compares against (Palimpsest's own, on the retained data, with the same
architecture), writes version 1 from the uploaded checkpoint and promotes it."""

from __future__ import annotations

import time
from typing import Any

import numpy as np
from sqlalchemy import insert

from app.core.db import session_scope
from app.core.storage import get_store
from app.datasets import service as datasets
from app.jobs import lease
from app.jobs import service as jobs
from app.ml.data import TabularData
from app.ml.device import runtime_fingerprint
from app.ml.metrics import accuracy
from app.ml.sisa import ShardEntry, SisaEnsemble, SisaManifest
from app.models import Job, Lineage, MLModel, ModelVersion
from app.pipeline.inputs import Phases
from app.pipeline.outputs import ShardOutputs, SharedEnsemble, save_test_outputs
from app.pipeline.spec import ModelSpec, seed_key
from app.pipeline.start import WORKER, begin_first_version, device, test_split
from app.registry import artifacts, references
from app.registry import service as registry

IMPORT_METHOD = "import"


def is_import(job_id: str) -> bool:
    with session_scope() as s:
        job = s.get(Job, job_id)
        return job is not None and job.method == IMPORT_METHOD


def _write_lineage(session: Any, model_id: str, train: TabularData, test: TabularData) -> None:
    """Version 1 of an imported model: every training row in its one shard and slice,
    the held-out rows as test rows (shard -1), as a trained version's lineage reads."""
    rows = [
        {"record_id": int(r), "model_id": model_id, "shard": 0, "slice": 0, "split": "train"}
        for r in train.record_ids
    ] + [
        {"record_id": int(r), "model_id": model_id, "shard": -1, "slice": -1, "split": "test"}
        for r in test.record_ids
    ]
    for row in rows:
        row["from_version"] = 1
    for i in range(0, len(rows), 5000):
        session.execute(insert(Lineage), rows[i : i + 5000])


def run_import(job_id: str) -> None:
    t0 = time.perf_counter()
    phases = Phases()
    started = begin_first_version(job_id)
    if started is None:
        return
    token, model_id, config = started.token, started.model_id, started.config
    ds, active = started.ds, started.active
    spec = ModelSpec.of(model_id, config)
    imported: dict[str, Any] = config["imported"]
    store = get_store()
    dev = device()
    with phases.timed("load"):
        data = datasets.to_tabular(ds, datasets.read_partitions(store, ds), active)
    held = imported.get("held_out_sources")
    if held:
        test_mask = np.isin(np.asarray(data.sources, dtype=object), np.asarray(held, dtype=object))
    else:
        test_mask = test_split(data.record_ids, spec.training.seed, spec.test_fraction)
    train, test = data.take(~test_mask), data.take(test_mask)
    ckpt = artifacts.checkpoint_store(store, model_id)
    key = str(imported["checkpoint"])
    ids = np.sort(np.asarray(train.record_ids, dtype=np.int64))
    manifest = SisaManifest(
        # Seeds from the model's name, never its install-random id: the same import on
        # the same data is verified alike on any install.
        model_key=seed_key(started.model_name),
        arch=spec.arch,
        training=spec.training,
        sisa=spec.sisa,
        feature_spec=spec.feature_spec,
        n_classes=spec.n_classes,
        entries=[
            ShardEntry(
                shard=0,
                final_key=key,
                checkpoint_keys=[key],
                preprocessor=dict(imported["preprocessor"]),
                n_records=len(ids),
                record_ids=[int(v) for v in ids],
            )
        ],
        runtime=runtime_fingerprint(dev),
    )
    with phases.timed("compute"):
        references.train_references(
            store,
            model_id,
            train,
            seed_key=manifest.model_key,
            k=spec.verification.reference_models,
            feature_spec=spec.feature_spec,
            arch=spec.arch,
            training=spec.training,
            n_classes=spec.n_classes,
            device=dev,
        )
    lease.check(job_id)
    rel = artifacts.save_manifest(store, model_id, 1, manifest)
    with phases.timed("metrics"):
        outputs = ShardOutputs()
        ensemble = SharedEnsemble.of(SisaEnsemble.load(manifest, ckpt, dev), outputs)
        acc = accuracy(ensemble.predict_proba(test.columns), test.labels) if len(test) else None
        metrics = {"test_accuracy": acc, "test_rows": len(test), "train_rows": len(train)}
    with session_scope() as s:
        job = jobs.claim(s, job_id, token)
        model = s.get(MLModel, model_id)
        assert model is not None
        _write_lineage(s, model_id, train, test)
        mv = ModelVersion(
            model_id=model_id,
            version=1,
            status="candidate",
            created_by_job=job_id,
            metrics=metrics | {"imported": True},
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
        wall = time.perf_counter() - t0
        job.result = {
            **job.result,
            "version": 1,
            "metrics": metrics,
            "imported": {"sha256": imported["sha256"], "checkpoint": key},
            "held_out": "sources" if held else "test_split",
            "phases": phases.to_dict(),
        }
        jobs.finish(
            s,
            job,
            ok=True,
            wall_seconds=wall,
            device=str(dev),
            device_seconds=wall,
            retrain_estimate_seconds=None,
            energy_joules=None,
        )
        jobs.unlock(s, model_id, job_id)
    save_test_outputs(
        store,
        model_id,
        test.record_ids,
        manifest,
        outputs.of(test.columns, list(ensemble.keys.values())),
    )
