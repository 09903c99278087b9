"""Benchmark B1: one-record SISA unlearning vs a full monolithic retrain.

Run with `python -m bench.b1_sisa` (`--quick` for a small smoke run, `--target` for the
S=16, R=8 layout alone). Everything is measured in the same process on the same seeded
synthetic data:

* Data: 50,000 training rows (plus a 10,000-row held-out test set) with six numeric
  columns on different scales and three categorical columns (5, 8 and 12 levels); the
  label is a noisy function with an interaction term, so an MLP beats a linear model.
  Each subject owns 1-4 records; records are sharded by subject, sliced by record id.
* Model: the same MLP (one hidden layer of 32) and the same `training` body (E = 45
  epochs, Adam, batch size 256) for the shard models and the monolithic model, one CPU
  thread (`torch.set_num_threads(1)`) for every measurement, so neither side benefits
  from parallelism the other lacks.
* Epochs: `training.epochs` means passes over each record in every mode (the
  `per_record` schedule, app/ml/schedule.py): a shard's R slice stages train
  2E/(R+1) epochs each (45, 18 and 10 for R = 1, 4, 8), so a record sees E passes on
  average and the ensemble does the monolithic model's sample-gradient work.
* Requests: one record from each slice 0..R-1 (chosen at random within it), each
  unlearned independently from the same trained ensemble, so their mean cost is the
  expectation for a record in a uniformly random slice. Timed unlearning:
  `unlearn_sisa` end to end (refit the affected shard's preprocessor, hash the
  checkpoint chain, load the checkpoint before the earliest affected slice, retrain
  forward, write the new checkpoints). Timed retrain: fit the preprocessor on all
  retained rows, transform, initialise, train E epochs, write the checkpoint. Both get
  the retained rows and the persisted layout prepared beforehand. A round times the
  monolithic retrain and then the R unlearnings (the new checkpoints are deleted after
  a round, so the next recomputes them), so both sides of a round's ratio ran under
  the same load from other processes; the median round is reported, in wall-clock and
  in CPU time. The verdict uses CPU time: the work is single-threaded, so its CPU time
  is its wall time on an idle machine, while on a shared one wall time mostly measures
  the other tenants.
* Theory: for one record in a uniformly random slice of one of S shards, the
  expected speed-up in sample-gradient steps is S*R*sum((i+1)e_i) / sum((i+1)^2 e_i)
  (`app.ml.schedule.theoretical_speedup`), S*3R/(2R+1) = 22.6x at S=16, R=8 with equal
  stage epochs. "steps" is the same ratio counted in optimiser steps on the actual
  shard sizes: small stages end in partial batches, and when a step costs the same
  whatever its size that is the ceiling. Target: measured >= 90% of theory at S=16,
  R=8 with ensemble accuracy within 1.5 points of the monolithic model.
"""

from __future__ import annotations

import argparse
import json
import math
import tempfile
import time
from collections.abc import Callable
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
from app.ml.schedule import mean_passes_per_record, stage_epochs, theoretical_speedup
from app.ml.sharding import assign_shards, assign_slices
from app.ml.sisa import SisaEnsemble, SisaManifest, UnlearnStats, train_sisa, unlearn_sisa
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
# The same body for both sides: `epochs` is passes over each record in every mode.
TRAINING = TrainingConfig(epochs=EPOCHS, batch_size=256, lr=0.01, seed=SEED, schedule="per_record")
TARGET = (16, 8)
TARGET_SHARE = 0.9
# The verdict uses CPU time: the computation is single-threaded, so its CPU time is its
# wall time on an idle machine, while wall time on a shared one mostly measures the
# other tenants (wall-clock figures are printed beside it).
SHARE_FIELD = "share_of_theory_cpu"


@dataclass(frozen=True)
class Settings:
    """Sizes of one benchmark run."""

    n_train: int
    n_test: int
    layouts: tuple[tuple[int, int], ...]  # (shards, slices)
    repeats: int


FULL = Settings(50_000, 10_000, ((4, 8), (8, 8), (16, 1), (16, 4), (16, 8)), 3)
ONLY_TARGET = Settings(50_000, 10_000, (TARGET,), 5)
QUICK = Settings(4_000, 2_000, ((1, 1), (1, 4), (4, 1), (4, 4)), 1)


@dataclass(frozen=True)
class Timing:
    wall: float
    cpu: float


def timed(fn: Callable[[], Any]) -> tuple[Any, Timing]:
    c0, t0 = time.process_time(), time.perf_counter()
    out = fn()
    return out, Timing(time.perf_counter() - t0, time.process_time() - c0)


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
) -> tuple[torch.nn.Module, Any]:
    """Full retrain on all retained rows; returns (model, preprocessor)."""
    prep = fit_preprocessor(SPEC, retained.columns)
    data = retained.sorted_by_id()
    x = prep.transform(data.columns)
    y = torch.from_numpy(data.labels)
    model = build_model(ARCH, prep.n_inputs, 2)
    init_model_(model, derive_seed(training.seed, "mono", "init"))
    fit(model, x, y, training, derive_seed(training.seed, "mono"))
    store.save("mono", dict(model.state_dict()), {"preprocessor": prep.to_dict()})
    return model, prep


def _redo_work(stages: tuple[int, ...], earliest: int) -> int:
    """Slice-passes of retraining stages earliest..R-1 (stage i sees i+1 slices)."""
    return sum((i + 1) * stages[i] for i in range(earliest, len(stages)))


def _steps(rows_per_stage: list[int], stages: tuple[int, ...], earliest: int) -> int:
    bs = TRAINING.batch_size
    return sum(stages[i] * math.ceil(rows_per_stage[i] / bs) for i in range(earliest, len(stages)))


def run_layout(
    train: TabularData,
    test: TabularData,
    mono: Monolithic,
    shards: int,
    slices: int,
    root: Path,
    repeats: int,
) -> dict[str, Any]:
    sisa = SisaConfig(shards=shards, slices=slices, sharding="subject")
    stages = stage_epochs(TRAINING, slices)
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
        training=TRAINING,
        sisa=sisa,
        n_classes=2,
        model_key="b1",
        store=store,
        device=device,
    )
    initial_train_s = time.perf_counter() - t0
    original = {k for e in manifest.entries for k in e.checkpoint_keys}

    rng = np.random.default_rng(derive_seed(SEED, "requests", shards, slices) % 2**32)
    rows = [int(rng.choice(np.flatnonzero(slice_of == k))) for k in range(slices)]
    # Rounds interleave the monolithic retrain with the R unlearnings, so both sides of
    # a round's ratio ran under the same load from other processes; the median round
    # is reported. Between rounds the new checkpoints are deleted, so each unlearning
    # recomputes what it did the first time.
    rounds: list[tuple[Timing, list[Timing]]] = []
    runs: list[dict[str, Any]] = []
    first_manifest = manifest
    for rnd in range(repeats):
        mono_t = mono.time_retrain()
        times: list[Timing] = []
        for k, row in enumerate(rows):
            ids = train.record_ids[[row]]
            keep = np.ones(len(train), dtype=bool)
            keep[row] = False
            retained = train.take(keep)

            def unlearn(
                retained: TabularData = retained, keep: np.ndarray = keep, ids: np.ndarray = ids
            ) -> tuple[SisaManifest, UnlearnStats]:
                return unlearn_sisa(
                    manifest,
                    retained,
                    shard_of[keep],
                    slice_of[keep],
                    ids,
                    store=store,
                    device=device,
                )

            (new, stats), t = timed(unlearn)
            times.append(t)
            if rnd + 1 < repeats:
                for e in new.entries:
                    for key in set(e.checkpoint_keys) - original:
                        store.delete(key)
                continue
            if k == 0:
                first_manifest = new
            (shard,) = stats.affected_shards
            earliest = stats.earliest_affected_slice[shard]
            in_shard = slice_of[keep][shard_of[keep] == shard]
            rows_per_stage = [int(np.count_nonzero(in_shard <= i)) for i in range(slices)]
            runs.append(
                {
                    "slice": k,
                    "shard": shard,
                    "earliest_slice": earliest,
                    "slices_retrained": stats.slices_retrained[shard],
                    "seconds": [r[1][k].wall for r in rounds] + [t.wall],
                    "cpu_seconds": [r[1][k].cpu for r in rounds] + [t.cpu],
                    "redo_work": _redo_work(stages, earliest),
                    "steps": _steps(rows_per_stage, stages, earliest),
                }
            )
        rounds.append((mono_t, times))

    def summary(field: str) -> dict[str, float]:
        ratios = [
            getattr(m, field) / float(np.mean([getattr(t, field) for t in ts])) for m, ts in rounds
        ]
        mid = int(np.argsort(ratios)[len(ratios) // 2])
        m, ts = rounds[mid]
        return {
            "ratio": ratios[mid],
            "unlearn": float(np.mean([getattr(t, field) for t in ts])),
            "retrain": getattr(m, field),
        }

    wall, cpu = summary("wall"), summary("cpu")
    ens = SisaEnsemble.load(first_manifest, store, device)
    ens_acc = accuracy(ens.predict_proba(test.columns), test.labels)
    work = _redo_work(stages, 0)
    theory = theoretical_speedup(stages, shards)
    return {
        "shards": shards,
        "slices": slices,
        "stage_epochs": list(stages),
        "mean_passes_per_record": mean_passes_per_record(stages),
        "monolithic_epochs": EPOCHS,
        "initial_sisa_train_s": initial_train_s,
        "unlearn_s": wall["unlearn"],
        "retrain_s": wall["retrain"],
        "ratio": wall["ratio"],
        "unlearn_cpu_s": cpu["unlearn"],
        "retrain_cpu_s": cpu["retrain"],
        "ratio_cpu": cpu["ratio"],
        "round_ratios": [m.wall / float(np.mean([t.wall for t in ts])) for m, ts in rounds],
        "round_ratios_cpu": [m.cpu / float(np.mean([t.cpu for t in ts])) for m, ts in rounds],
        "theoretical_ratio": theory,
        "share_of_theory": wall["ratio"] / theory,
        "share_of_theory_cpu": cpu["ratio"] / theory,
        # The cost model on the requests as they fell (a preprocessor change restarts
        # a shard from slice 0), and the same counted in optimiser steps.
        "model_ratio": shards * work / float(np.mean([r["redo_work"] for r in runs])),
        "steps_ratio": mono.steps / float(np.mean([r["steps"] for r in runs])),
        "ensemble_accuracy": ens_acc,
        "monolithic_accuracy": mono.accuracy,
        "requests": runs,
    }


class Monolithic:
    """The monolithic retrain after forgetting one record (any: the cost is the same)."""

    def __init__(self, train: TabularData, test: TabularData, root: Path) -> None:
        self.retained = train.take(np.arange(1, len(train)))
        self.store = FsspecCheckpointStore.local(str(root / "mono"))
        self.steps = EPOCHS * math.ceil(len(self.retained) / TRAINING.batch_size)
        self.test = test
        self.accuracy = math.nan

    def time_retrain(self) -> Timing:
        (model, prep), t = timed(lambda: monolithic_retrain(self.retained, TRAINING, self.store))
        proba = predict_proba(model, prep.transform(self.test.columns))
        self.accuracy = accuracy(proba, self.test.labels)
        return t


def main(quick: bool = False, out: Path | None = None, target_only: bool = False) -> dict[str, Any]:
    """Run B1, print a table, write JSON (to bench/results/b1.json unless `out`)."""
    settings = QUICK if quick else (ONLY_TARGET if target_only else FULL)
    torch.set_num_threads(THREADS)
    enable_determinism()
    train = synth(settings.n_train, SEED)
    test = synth(settings.n_test, SEED + 1, id_offset=10_000_000)

    rows: list[dict[str, Any]] = []
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="b1-") as tmp:
        mono = Monolithic(train, test, Path(tmp))
        for shards, slices in settings.layouts:
            rows.append(run_layout(train, test, mono, shards, slices, Path(tmp), settings.repeats))
    total_s = time.perf_counter() - t0

    target = next((r for r in rows if (r["shards"], r["slices"]) == TARGET), None)
    met: bool | None = None
    if target is not None:
        gap = 100 * (target["monolithic_accuracy"] - target["ensemble_accuracy"])
        met = bool(target[SHARE_FIELD] >= TARGET_SHARE and gap <= 1.5)
    result: dict[str, Any] = {
        "benchmark": "B1",
        "quick": quick,
        "n_train": settings.n_train,
        "n_test": settings.n_test,
        "torch_threads": THREADS,
        "torch": torch.__version__,
        "arch": ARCH.to_dict(),
        "training": TRAINING.to_dict(),
        "monolithic_epochs": EPOCHS,
        "repeats": settings.repeats,
        "rows": rows,
        "target": "one-record unlearning at S=16, R=8 >= 90% of the schedule's theoretical "
        "speed-up (CPU time), ensemble accuracy within 1.5 points of the monolithic model",
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
        title=f"B1: one-record SISA unlearning vs monolithic retrain "
        f"({result['n_train']:,} rows, {result['torch_threads']} thread, "
        f"E={result['monolithic_epochs']} passes per record)"
    )
    cols = ("S", "R", "e/stage", "unlearn s", "retrain s", "ratio", "cpu", "theory")
    for col in (*cols, "share", "share wall", "steps", "acc SISA", "acc mono"):
        table.add_column(col, justify="right")
    for r in result["rows"]:
        stages = r["stage_epochs"]
        table.add_row(
            str(r["shards"]),
            str(r["slices"]),
            str(stages[0]) if len(set(stages)) == 1 else ",".join(map(str, stages)),
            f"{r['unlearn_cpu_s']:.3f}",
            f"{r['retrain_cpu_s']:.3f}",
            f"{r['ratio']:.1f}x",
            f"{r['ratio_cpu']:.1f}x",
            f"{r['theoretical_ratio']:.1f}x",
            f"{100 * r['share_of_theory_cpu']:.0f}%",
            f"{100 * r['share_of_theory']:.0f}%",
            f"{r['steps_ratio']:.1f}x",
            f"{100 * r['ensemble_accuracy']:.2f}",
            f"{100 * r['monolithic_accuracy']:.2f}",
        )
    console = Console(width=140)
    console.print(table)
    met = result["target_met"]
    verdict = "n/a (S=16, R=8 not run)" if met is None else ("MET" if met else "NOT MET")
    console.print(f"Target ({result['target']}): {verdict}")
    console.print(
        "unlearn s / retrain s: CPU seconds; ratio: retrain / mean unlearning, wall-clock, "
        "median round; cpu: the same in CPU time; theory: expected speed-up in "
        "sample-gradient steps; share: cpu / theory; share wall: ratio / theory; steps: "
        "the speed-up counted in optimiser steps (partial batches)"
    )
    console.print(f"Total {result['total_seconds']:.0f} s; JSON written to {path}")


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    parser.add_argument("--target", action="store_true", help="only S=16, R=8, full size")
    args = parser.parse_args()
    main(quick=args.quick, target_only=args.target)
