"""Benchmark B1: SISA unlearning of one subject vs a full monolithic retrain.

Run with `python -m bench.b1_sisa` (add `--quick` for a small smoke run). Everything is
measured in the same process on the same seeded synthetic data:

* Data: 50,000 training rows (plus a 10,000-row held-out test set) with six numeric
  columns on different scales and three categorical columns (5, 8 and 12 levels); the
  label is a noisy function with an interaction term, so an MLP beats a linear model.
  Each subject owns 1-4 records; records are sharded by subject, sliced by record id.
* Model: the same MLP (one hidden layer of 32) for the shard models and the monolithic
  model, Adam, batch size 256, one CPU thread (`torch.set_num_threads(1)`) for every
  measurement, so neither side benefits from parallelism the other lacks.
* Fair epochs: the monolithic model trains E = 45 epochs on all retained data. A SISA
  shard trains each of its R slice stages for e = 2E/(R+1) epochs (45, 18 and 10 for
  R = 1, 4, 8: E = 45 is the smallest value that makes e whole for all three), so a
  record sees E epochs on average and the whole SISA ensemble does the same number of
  sample-gradient steps as the monolithic model (Bourtoule et al. 2021, section V-B).
* Timed unlearning: `unlearn_sisa` end to end for one subject's records (refit the
  affected shard's preprocessor, hash the checkpoint chain, load the checkpoint before the
  earliest affected slice, retrain forward, write the new checkpoints). Timed retrain:
  fit the preprocessor on all retained rows, transform, initialise, train E epochs, write
  the checkpoint. Both get the retained rows and the persisted layout prepared beforehand.
  Several subjects (the same ones for every layout) are unlearned independently from the
  same trained ensemble; the ratio uses their mean time.
* Theory: S·2R/(R+1) is the expected speed-up for one record when every slice stage costs
  the same. With uniform stage epochs stage i costs in proportion to i+1 (it sees slices
  0..i), so the expectation for one record is S·3R/(2R+1); a subject with several records
  restarts from the earliest slice any of them is in, which costs more still, and any
  request with a record in slice 0 retrains its whole shard, bounding its ratio by S.
  The table also gives this cost model for the requests actually measured ("model").
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.ml.architectures import build_model
from app.ml.checkpoints import FsspecCheckpointStore
from app.ml.config import ArchitectureConfig, FeatureSpec, SisaConfig, TrainingConfig
from app.ml.data import TabularData
from app.ml.device import derive_seed, enable_determinism
from app.ml.metrics import accuracy
from app.ml.preprocess import fit_preprocessor
from app.ml.sharding import assign_shards, assign_slices
from app.ml.sisa import SisaEnsemble, train_sisa, unlearn_sisa
from app.ml.training import fit, init_model_, predict_proba

EPOCHS = 45
THREADS = 1
SEED = 2024
RESULTS = Path(__file__).resolve().parent / "results" / "b1.json"
SPEC = FeatureSpec(
    numeric=tuple(f"num{i}" for i in range(6)), categorical=("region", "plan", "channel")
)
ARCH = ArchitectureConfig(kind="mlp", hidden=(32,))
LEVELS = {"region": 5, "plan": 8, "channel": 12}


@dataclass(frozen=True)
class Settings:
    """Sizes of one benchmark run."""

    n_train: int
    n_test: int
    shards: tuple[int, ...]
    slices: tuple[int, ...]
    requests: int


FULL = Settings(50_000, 10_000, (1, 4, 8, 16), (1, 4, 8), 3)
QUICK = Settings(4_000, 2_000, (1, 4), (1, 4), 1)


def synth(n_rows: int, seed: int, id_offset: int = 0) -> TabularData:
    """Seeded tabular task: numeric + categorical inputs, 1-4 records per subject."""
    rng = np.random.default_rng(seed)
    per = rng.integers(1, 5, size=n_rows)  # more subjects than needed, then trim
    subjects = np.repeat(np.arange(n_rows), per)[:n_rows]
    scales = np.array([1.0, 3.0, 0.5, 10.0, 2.0, 1.0])
    means = np.array([0.0, 5.0, -1.0, 100.0, 0.0, 2.0])
    z = rng.normal(size=(n_rows, 6))
    cols: dict[str, np.ndarray] = {f"num{i}": z[:, i] * scales[i] + means[i] for i in range(6)}
    logit = 1.2 * z[:, 0] - 1.0 * z[:, 1] + 1.5 * z[:, 2] * z[:, 3] + 0.5 * np.abs(z[:, 4])
    for name, k in LEVELS.items():
        effect = np.random.default_rng(derive_seed(SEED, name) % 2**32).normal(size=k)
        codes = rng.integers(0, k, size=n_rows)
        cols[name] = np.array([f"{name}-{c}" for c in codes], dtype=object)
        logit += effect[codes]
    labels = (rng.random(n_rows) < 1.0 / (1.0 + np.exp(-2.0 * (logit - 0.4)))).astype(np.int64)
    ids = rng.permutation(n_rows).astype(np.int64) * 2 + 1 + id_offset
    return TabularData(
        record_ids=ids,
        columns=cols,
        labels=labels,
        subjects=np.array([f"subj-{id_offset}-{s}" for s in subjects], dtype=object),
        sources=np.array([f"district-{s % 8}" for s in subjects], dtype=object),
    )


def monolithic_retrain(
    retained: TabularData, training: TrainingConfig, store: FsspecCheckpointStore
) -> tuple[torch.nn.Module, Any, float]:
    """Full retrain on all retained rows; returns (model, preprocessor, seconds)."""
    t0 = time.perf_counter()
    prep = fit_preprocessor(SPEC, retained.columns)
    data = retained.sorted_by_id()
    x = prep.transform(data.columns)
    y = torch.from_numpy(data.labels)
    model = build_model(ARCH, prep.n_inputs, 2)
    init_model_(model, derive_seed(training.seed, "mono", "init"))
    fit(model, x, y, training, derive_seed(training.seed, "mono"))
    store.save("mono", dict(model.state_dict()), {"preprocessor": prep.to_dict()})
    return model, prep, time.perf_counter() - t0


def cost_model_ratio(shards: int, slices: int, earliest: int) -> float:
    """S x (cost of all stages) / (cost of stages earliest..R-1), stage i costing i+1."""
    full = slices * (slices + 1) / 2
    redo = sum(i + 1 for i in range(earliest, slices))
    return shards * full / redo if redo else float("inf")


def run_layout(
    train: TabularData,
    test: TabularData,
    requests: list[np.ndarray],
    shards: int,
    slices: int,
    root: Path,
) -> dict[str, Any]:
    sisa = SisaConfig(shards=shards, slices=slices, sharding="subject")
    stage_epochs = 2 * EPOCHS // (slices + 1)
    assert stage_epochs * (slices + 1) == 2 * EPOCHS
    sisa_training = TrainingConfig(epochs=stage_epochs, batch_size=256, lr=0.01, seed=SEED)
    mono_training = TrainingConfig(epochs=EPOCHS, batch_size=256, lr=0.01, seed=SEED)
    device = torch.device("cpu")
    store = FsspecCheckpointStore.local(str(root / f"s{shards}-r{slices}"))
    # The layout is computed once and persisted; unlearning reads it, never recomputes it.
    shard_of = assign_shards(train, sisa, seed=SEED)
    slice_of = assign_slices(train.record_ids, slices, seed=SEED)

    t0 = time.perf_counter()
    manifest = train_sisa(
        train,
        shard_of,
        slice_of,
        feature_spec=SPEC,
        arch=ARCH,
        training=sisa_training,
        sisa=sisa,
        n_classes=2,
        model_key="b1",
        store=store,
        device=device,
    )
    initial_train_s = time.perf_counter() - t0

    runs: list[dict[str, Any]] = []
    first_manifest = manifest
    for ids in requests:
        keep = ~np.isin(train.record_ids, ids)
        retained = train.take(keep)
        t1 = time.perf_counter()
        new, stats = unlearn_sisa(
            manifest,
            retained,
            shard_of[keep],
            slice_of[keep],
            ids,
            store=store,
            device=device,
        )
        seconds = time.perf_counter() - t1
        (shard,) = stats.affected_shards
        k = stats.earliest_affected_slice[shard]
        runs.append(
            {
                "records": len(ids),
                "shard": shard,
                "earliest_slice": k,
                "slices_retrained": stats.slices_retrained[shard],
                "seconds": seconds,
                "model_ratio": cost_model_ratio(shards, slices, k),
            }
        )
        if len(runs) == 1:
            first_manifest = new

    retained = train.without(requests[0])
    mono, prep, mono_s = monolithic_retrain(retained, mono_training, store)
    mono_acc = accuracy(predict_proba(mono, prep.transform(test.columns)), test.labels)
    ens = SisaEnsemble.load(first_manifest, store, device)
    ens_acc = accuracy(ens.predict_proba(test.columns), test.labels)
    unlearn_s = float(np.mean([r["seconds"] for r in runs]))
    return {
        "shards": shards,
        "slices": slices,
        "stage_epochs": stage_epochs,
        "monolithic_epochs": EPOCHS,
        "initial_sisa_train_s": initial_train_s,
        "unlearn_s": unlearn_s,
        "retrain_s": mono_s,
        "ratio": mono_s / unlearn_s,
        "ratio_min": min(mono_s / r["seconds"] for r in runs),
        "ratio_max": max(mono_s / r["seconds"] for r in runs),
        "theoretical_ratio": shards * 2 * slices / (slices + 1),
        "model_ratio": float(np.mean([r["model_ratio"] for r in runs])),
        "ensemble_accuracy": ens_acc,
        "monolithic_accuracy": mono_acc,
        "requests": runs,
    }


def main(quick: bool = False, out: Path | None = None) -> dict[str, Any]:
    """Run B1, print a table, write JSON (to bench/results/b1.json unless `out`)."""
    settings = QUICK if quick else FULL
    torch.set_num_threads(THREADS)
    enable_determinism()
    train = synth(settings.n_train, SEED)
    test = synth(settings.n_test, SEED + 1, id_offset=10_000_000)
    rng = np.random.default_rng(SEED)
    chosen = rng.choice(np.unique(train.subjects), size=settings.requests, replace=False)
    requests = [train.record_ids[train.subjects == s] for s in chosen]

    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="b1-") as tmp:
        for shards in settings.shards:
            for slices in settings.slices:
                rows.append(run_layout(train, test, requests, shards, slices, Path(tmp)))
    total_s = time.perf_counter() - t0

    target = next((r for r in rows if r["shards"] == 16 and r["slices"] == 8), None)
    met: bool | None = None
    if target is not None:
        gap = 100 * (target["monolithic_accuracy"] - target["ensemble_accuracy"])
        met = bool(target["ratio"] >= 25 and gap <= 1.5)
    result: dict[str, Any] = {
        "benchmark": "B1",
        "quick": quick,
        "n_train": settings.n_train,
        "n_test": settings.n_test,
        "torch_threads": THREADS,
        "torch": torch.__version__,
        "arch": ARCH.to_dict(),
        "monolithic_epochs": EPOCHS,
        "request_record_counts": [len(r) for r in requests],
        "rows": rows,
        "target": "ratio >= 25x at S=16, R=8 with ensemble accuracy within 1.5 points",
        "target_met": met,
        "total_seconds": total_s,
    }
    path = out if out is not None else RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2) + "\n")
    _print(result, path)
    return result


def _print(result: dict[str, Any], path: Path) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"B1: SISA unlearning of one subject vs monolithic retrain "
        f"({result['n_train']:,} rows, {result['torch_threads']} thread)"
    )
    for col in ("S", "R", "e/stage", "unlearn s", "retrain s", "ratio", "theory", "model"):
        table.add_column(col, justify="right")
    table.add_column("acc SISA", justify="right")
    table.add_column("acc mono", justify="right")
    for r in result["rows"]:
        table.add_row(
            str(r["shards"]),
            str(r["slices"]),
            str(r["stage_epochs"]),
            f"{r['unlearn_s']:.3f}",
            f"{r['retrain_s']:.3f}",
            f"{r['ratio']:.1f}x",
            f"{r['theoretical_ratio']:.1f}x",
            f"{r['model_ratio']:.1f}x",
            f"{100 * r['ensemble_accuracy']:.2f}",
            f"{100 * r['monolithic_accuracy']:.2f}",
        )
    console = Console(width=120)
    console.print(table)
    met = result["target_met"]
    verdict = "n/a (S=16, R=8 not run)" if met is None else ("MET" if met else "NOT MET")
    console.print(f"Target ({result['target']}): {verdict}")
    console.print(f"Total {result['total_seconds']:.0f} s; JSON written to {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    args = parser.parse_args()
    main(quick=args.quick)
