"""Benchmark B7: one-subject SISA unlearning vs monolithic retraining for a gbdt model.

Run with `python -m bench.b7_trees` (add `--quick` for a small smoke run).

* Data: seeded synthetic tabular task, 50,000 rows (1-4 per subject) with 8 numeric and
  2 categorical features; labels from a non-linear rule (interactions and thresholds)
  plus noise, so trees have something to learn; 10,000 further rows for testing.
* Model: `architecture.kind = "gbdt"` (HistGradientBoostingClassifier, 100 iterations,
  Palimpsest's defaults), in the engine exactly as a job runs it (`train_sisa`,
  `unlearn_sisa`, skops checkpoints in a local store). SISA: 8 shards by subject, one
  slice (slices do not apply to trees). Monolithic: the same estimator on all rows, one
  shard.
* Timed, in the same run: unlearning one subject from the SISA model (the one shard that
  holds them refitted on its retained rows, the others reused) vs retraining the
  monolithic model on the retained rows (what forgetting costs it: approximate methods
  do not apply to trees). Median of 3 subjects each.
* Reported: the time ratio, test accuracy of the SISA ensemble and of the monolithic
  model after the erasure, and the check that the unlearned shard equals that shard
  refitted from scratch (predictions on the test rows).
"""

from __future__ import annotations

import argparse
import json
import statistics
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.ml.checkpoints import FsspecCheckpointStore
from app.ml.config import ArchitectureConfig, FeatureSpec, SisaConfig, TrainingConfig
from app.ml.data import TabularData
from app.ml.metrics import accuracy
from app.ml.sharding import assign_shards, assign_slices
from app.ml.sisa import SisaEnsemble, train_shard, train_sisa, unlearn_sisa

SEED = 7
CPU = torch.device("cpu")
RESULTS = Path(__file__).resolve().parent / "results" / "b7.json"
NUMERIC = tuple(f"x{i}" for i in range(8))
SPEC = FeatureSpec(numeric=NUMERIC, categorical=("c0", "c1"))
ARCH = ArchitectureConfig(kind="gbdt", params={})
TRAIN = TrainingConfig(seed=SEED)


def make_data(n: int, seed: int, id_offset: int = 0) -> TabularData:
    rng = np.random.default_rng(seed)
    per = rng.integers(1, 5, size=n)  # more subjects than needed, cut to n rows
    subjects = np.repeat(np.arange(len(per)), per)[:n]
    x = rng.normal(size=(n, len(NUMERIC)))
    c0 = rng.choice(np.array(["a", "b", "c", "d"], dtype=object), size=n)
    c1 = rng.choice(np.array(["u", "v"], dtype=object), size=n)
    signal = (
        np.where(x[:, 0] > 0.3, 1.2, -0.8)
        + x[:, 1] * x[:, 2]
        + np.sin(2 * x[:, 3])
        + np.where((c0 == "a") | (c0 == "c"), 0.7, -0.4)
        + np.where(c1 == "u", 0.3 * x[:, 4], -0.3 * x[:, 4])
    )
    labels = (signal + 0.5 * rng.normal(size=n) > 0).astype(np.int64)
    columns: dict[str, np.ndarray] = {name: x[:, i] for i, name in enumerate(NUMERIC)}
    columns |= {"c0": c0, "c1": c1}
    return TabularData(
        record_ids=np.arange(id_offset, id_offset + n, dtype=np.int64),
        columns=columns,
        labels=labels,
        subjects=np.array([f"s{seed}-{s}" for s in subjects], dtype=object),
        sources=np.array(["bench"] * n, dtype=object),
    )


def _train(data: TabularData, sisa: SisaConfig, store: FsspecCheckpointStore, key: str) -> Any:
    return train_sisa(
        data,
        assign_shards(data, sisa, seed=SEED),
        assign_slices(data.record_ids, 1, seed=SEED),
        feature_spec=SPEC,
        arch=ARCH,
        training=TRAIN,
        sisa=sisa,
        n_classes=2,
        model_key=key,
        store=store,
        device=CPU,
    )


def main(quick: bool = False, out: Path | None = None) -> dict[str, Any]:
    """Run B7, print a table, write JSON (to bench/results/b7.json unless `out`)."""
    n = 5_000 if quick else 50_000
    shards = 8
    data = make_data(n, SEED)
    test = make_data(2_000 if quick else 10_000, SEED + 1, id_offset=10 * n)
    sisa = SisaConfig(shards=shards, slices=1, sharding="subject")
    mono = SisaConfig(shards=1, slices=1, sharding="random")
    rng = np.random.default_rng(SEED)
    subjects = rng.choice(np.unique(data.subjects), size=3, replace=False)
    with tempfile.TemporaryDirectory() as tmp:
        store = FsspecCheckpointStore.local(f"{tmp}/sisa")
        mstore = FsspecCheckpointStore.local(f"{tmp}/mono")
        t0 = time.perf_counter()
        manifest = _train(data, sisa, store, "b7-sisa")
        sisa_train_s = time.perf_counter() - t0
        t0 = time.perf_counter()
        _train(data, mono, mstore, "b7-mono")
        mono_train_s = time.perf_counter() - t0
        unlearn_times, retrain_times, exact = [], [], []
        acc_sisa = acc_mono = float("nan")
        for i, subject in enumerate(subjects):
            ids = data.record_ids[data.subjects == subject]
            retained = data.without(ids)
            shard_of = assign_shards(retained, sisa, seed=SEED)
            t0 = time.perf_counter()
            new, stats = unlearn_sisa(
                manifest,
                retained,
                shard_of,
                np.zeros(len(retained), dtype=np.int64),
                ids,
                store=store,
                device=CPU,
            )
            unlearn_times.append(time.perf_counter() - t0)
            t0 = time.perf_counter()
            mono_new = _train(retained, mono, mstore, f"b7-mono-{i}")
            retrain_times.append(time.perf_counter() - t0)
            ens = SisaEnsemble.load(new, store, CPU)
            acc_sisa = accuracy(ens.predict_proba(test.columns), test.labels)
            acc_mono = accuracy(
                SisaEnsemble.load(mono_new, mstore, CPU).predict_proba(test.columns), test.labels
            )
            shard = stats.affected_shards[0]
            rows = np.flatnonzero(shard_of == shard)
            scratch = FsspecCheckpointStore.local(f"{tmp}/scratch-{i}")
            res = train_shard(
                retained.take(rows),
                np.zeros(len(rows), dtype=np.int64),
                shard=shard,
                feature_spec=SPEC,
                arch=ARCH,
                training=TRAIN,
                sisa=sisa,
                n_classes=2,
                model_key="b7-sisa",
                store=scratch,
                device=CPU,
            )
            fresh = SisaEnsemble(
                new, {shard: _load(scratch, res)}, {shard: res.preprocessor}, CPU
            ).shard_proba(test.columns, shard)
            exact.append(bool(torch.equal(ens.shard_proba(test.columns, shard), fresh)))
    unlearn_s = statistics.median(unlearn_times)
    retrain_s = statistics.median(retrain_times)
    doc: dict[str, Any] = {
        "benchmark": "B7",
        "quick": quick,
        "n_train": n,
        "n_test": len(test),
        "shards": shards,
        "estimator": "HistGradientBoostingClassifier (Palimpsest defaults)",
        "sisa_train_seconds": sisa_train_s,
        "mono_train_seconds": mono_train_s,
        "unlearn_seconds": unlearn_s,
        "retrain_seconds": retrain_s,
        "ratio": retrain_s / unlearn_s,
        "acc_sisa_after": acc_sisa,
        "acc_mono_after": acc_mono,
        "exact": all(exact),
        "subjects": len(subjects),
    }
    _print(doc)
    path = out or RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(doc, indent=2) + "\n")
    return doc


def _load(store: FsspecCheckpointStore, res: Any) -> torch.nn.Module:
    from app.ml.architectures import build_model

    model = build_model(ARCH, res.preprocessor.n_inputs, 2)
    tensors, _ = store.load(res.final_key)
    model.load_state_dict(tensors)
    return model


def _print(doc: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"B7 - gbdt: one-subject SISA unlearning ({doc['shards']} shards) vs monolithic "
        f"retraining, {doc['n_train']} rows"
    )
    for col in ("unlearn s", "retrain s", "ratio", "acc SISA", "acc mono", "exact"):
        table.add_column(col, justify="right")
    table.add_row(
        f"{doc['unlearn_seconds']:.2f}",
        f"{doc['retrain_seconds']:.2f}",
        f"{doc['ratio']:.1f}x",
        f"{doc['acc_sisa_after']:.4f}",
        f"{doc['acc_mono_after']:.4f}",
        "yes" if doc["exact"] else "NO",
    )
    Console(width=140).print(table)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    main(quick=parser.parse_args().quick)
