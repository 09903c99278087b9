"""Benchmark B1 on a GPU: SISA subject unlearning vs a monolithic retrain, on CUDA.

Run with `python -m bench.b1_gpu` (bench/gpu.sh does, on a machine with CUDA; `--quick`
for a small run; `--device cpu` to try it anywhere). The data, model and epoch budget
are B1's (bench/b1_sisa.py: 50,000 training rows, the MLP with one hidden layer of 32,
E = 45 monolithic epochs, 2E/(R+1) per SISA slice stage) at one layout, S = 16 shards
and R = 8 slices, on the device:

* samples/s: sample-gradient steps per second. Both sides take N x E of them (the SISA
  ensemble's stages add up to E epochs per record), so the rate compares like with like;
* the unlearning ratio: the monolithic retrain's time over the mean time of unlearning
  one subject (several subjects, each from the same trained ensemble), beside the
  schedule's theoretical S x 2R/(R+1);
* energy per job: NVML's total-energy counter across each job (app/jobs/energy.py), in
  joules; "n/a" where NVML does not report it (no nvidia-ml-py, or an older GPU).
"""

from __future__ import annotations

import argparse
import json
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.jobs.energy import EnergyMeter
from app.ml.architectures import build_model
from app.ml.checkpoints import FsspecCheckpointStore
from app.ml.config import SisaConfig, TrainingConfig
from app.ml.device import derive_seed, enable_determinism, resolve_device
from app.ml.metrics import accuracy
from app.ml.preprocess import fit_preprocessor
from app.ml.sharding import assign_shards, assign_slices
from app.ml.sisa import SisaEnsemble, train_sisa, unlearn_sisa
from app.ml.training import fit, init_model_, predict_proba
from bench.b1_sisa import ARCH, EPOCHS, SEED, SPEC, synth

RESULTS = Path(__file__).resolve().parent / "results" / "b1_gpu.json"


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def _job(device: torch.device, fn: Any) -> tuple[Any, float, float | None]:
    """fn()'s value, its seconds and its joules (None where NVML has no counter)."""
    meter = EnergyMeter(device)
    _sync(device)
    t0 = time.perf_counter()
    value = fn()
    _sync(device)
    return value, time.perf_counter() - t0, meter.joules()


def run(
    device: torch.device, n_train: int, n_test: int, shards: int, slices: int, k: int
) -> dict[str, Any]:
    enable_determinism()
    train, test = synth(n_train, SEED), synth(n_test, SEED + 1, id_offset=10**7)
    sisa = SisaConfig(shards=shards, slices=slices, sharding="subject")
    stage_epochs = 2 * EPOCHS // (slices + 1)
    sisa_training = TrainingConfig(epochs=stage_epochs, batch_size=256, lr=0.01, seed=SEED)
    mono_training = TrainingConfig(epochs=EPOCHS, batch_size=256, lr=0.01, seed=SEED)
    shard_of = assign_shards(train, sisa, seed=SEED)
    slice_of = assign_slices(train.record_ids, slices, seed=SEED)
    subjects = np.unique(train.subjects)
    picks = np.random.default_rng(SEED).choice(subjects, size=k, replace=False)
    requests = [train.record_ids[train.subjects == s] for s in picks]
    with tempfile.TemporaryDirectory(prefix="b1-gpu-") as tmp:
        store = FsspecCheckpointStore.local(tmp)
        manifest, train_s, train_j = _job(
            device,
            lambda: train_sisa(
                train,
                shard_of,
                slice_of,
                feature_spec=SPEC,
                arch=ARCH,
                training=sisa_training,
                sisa=sisa,
                n_classes=2,
                model_key="b1-gpu",
                store=store,
                device=device,
            ),
        )
        unlearn: list[dict[str, Any]] = []
        first = manifest
        for ids in requests:
            keep = ~np.isin(train.record_ids, ids)
            (new, stats), secs, joules = _job(
                device,
                lambda ids=ids, keep=keep: unlearn_sisa(
                    manifest,
                    train.take(keep),
                    shard_of[keep],
                    slice_of[keep],
                    ids,
                    store=store,
                    device=device,
                ),
            )
            if not unlearn:
                first = new
            (shard,) = stats.affected_shards
            unlearn.append(
                {
                    "records": len(ids),
                    "earliest_slice": stats.earliest_affected_slice[shard],
                    "seconds": secs,
                    "joules": joules,
                }
            )

        retained = train.without(requests[0])

        def mono() -> tuple[torch.nn.Module, Any]:
            prep = fit_preprocessor(SPEC, retained.columns)
            data = retained.sorted_by_id()
            x = prep.transform(data.columns).to(device)
            y = torch.from_numpy(data.labels).to(device)
            model = build_model(ARCH, prep.n_inputs, 2).to(device)
            init_model_(model, derive_seed(mono_training.seed, "mono", "init"))
            fit(model, x, y, mono_training, derive_seed(mono_training.seed, "mono"))
            return model, prep

        (model, prep), mono_s, mono_j = _job(device, mono)
        mono_acc = accuracy(
            predict_proba(model, prep.transform(test.columns).to(device)).cpu(), test.labels
        )
        ens_acc = accuracy(
            SisaEnsemble.load(first, store, device).predict_proba(test.columns).cpu(), test.labels
        )
    unlearn_s = float(np.mean([u["seconds"] for u in unlearn]))
    joules = [u["joules"] for u in unlearn if u["joules"] is not None]
    return {
        "device": str(device),
        "gpu": torch.cuda.get_device_name(device) if device.type == "cuda" else None,
        "torch": torch.__version__,
        "rows": n_train,
        "shards": shards,
        "slices": slices,
        "sisa_train_seconds": train_s,
        "sisa_train_samples_per_s": n_train * EPOCHS / train_s,
        "sisa_train_joules": train_j,
        "retrain_seconds": mono_s,
        "retrain_samples_per_s": len(retained.record_ids) * EPOCHS / mono_s,
        "retrain_joules": mono_j,
        "unlearn_seconds": unlearn_s,
        "unlearn_joules": float(np.mean(joules)) if joules else None,
        "ratio": mono_s / unlearn_s,
        "theoretical_ratio": shards * 2 * slices / (slices + 1),
        "ensemble_accuracy": ens_acc,
        "monolithic_accuracy": mono_acc,
        "requests": unlearn,
    }


def _j(x: float | None) -> str:
    return "n/a" if x is None else f"{x:.0f} J"


def main(quick: bool = False, device: str = "cuda") -> dict[str, Any]:
    dev = resolve_device(device)
    r = run(dev, 4_000 if quick else 50_000, 2_000 if quick else 10_000, 16, 8, 1 if quick else 3)
    print(
        f"B1 on {r['device']} ({r['gpu'] or 'no GPU'}),"
        f" S={r['shards']} R={r['slices']}, {r['rows']} rows"
    )
    print(
        f"  SISA training      {r['sisa_train_seconds']:8.1f} s  "
        f"{r['sisa_train_samples_per_s']:10.0f} samples/s  {_j(r['sisa_train_joules'])}"
    )
    print(
        f"  monolithic retrain {r['retrain_seconds']:8.1f} s  "
        f"{r['retrain_samples_per_s']:10.0f} samples/s  {_j(r['retrain_joules'])}"
    )
    print(
        f"  unlearn 1 subject  {r['unlearn_seconds']:8.2f} s (mean of {len(r['requests'])})"
        f"  {_j(r['unlearn_joules'])} per job"
    )
    print(
        f"  unlearning ratio   {r['ratio']:.1f}x (theoretical {r['theoretical_ratio']:.1f}x);"
        f" accuracy ensemble {r['ensemble_accuracy']:.4f},"
        f" monolithic {r['monolithic_accuracy']:.4f}"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(r, indent=2))
    return r


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--device", default="cuda", choices=["cuda", "cpu", "auto"])
    a = parser.parse_args()
    main(quick=a.quick, device=a.device)
