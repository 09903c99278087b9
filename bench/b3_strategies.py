"""Benchmark B3: approximate unlearning strategies for an MLP vs retraining from scratch.

Run with `python -m bench.b3_strategies` (add `--quick` for a small smoke run).

* Data: 60,000 seeded synthetic rows (50,000 train + 10,000 test), 40 standardised
  features, label = sign of a nonlinear function (a linear part, a product of two
  features and a sine) with 10% of training labels flipped, so the trained MLP partly
  memorises its training rows and forget accuracy starts above test accuracy.
* Forget set: 1% of the training records, chosen at random (seeded).
* Model: MLP with one hidden layer of 256, Adam (lr 3e-3), batch 256, E = 40 epochs;
  the original is trained on all rows, the reference is retrained from scratch on the
  retained rows with the same config. One CPU thread for every measurement.
* Timed: retraining (init + `fit`) and each strategy's `run` with its default
  hyper-parameters, starting from a copy of the original. The fraction is strategy time /
  retrain time (target <= 10%); the gaps are strategy minus retrained accuracy on the
  forget, retain and test sets (0 is best; forget accuracy is measured on the forget
  set's own labels).
"""

from __future__ import annotations

import argparse
import copy
import json
import time
from pathlib import Path
from typing import Any

import torch
from torch import nn

from app.ml.approximate import DEFAULT_STRATEGY, STRATEGIES, get_strategy
from app.ml.architectures import build_model
from app.ml.config import ArchitectureConfig, TrainingConfig
from app.ml.device import derive_seed
from app.ml.training import fit, init_model_, predict_proba

SEED = 2024
THREADS = 1
TARGET_FRACTION = 0.10
RESULTS = Path(__file__).resolve().parent / "results" / "b3.json"
ARCH = ArchitectureConfig("mlp", (256,))


def make_data(n: int, d: int, seed: int, noise: float) -> tuple[torch.Tensor, torch.Tensor]:
    """Seeded synthetic binary task; `noise` is the fraction of flipped labels."""
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=torch.Generator().manual_seed(SEED))
    x = torch.randn(n, d, generator=gen)
    f = x @ w / d**0.5 + 1.5 * x[:, 0] * x[:, 1] + torch.sin(2.0 * x[:, 2])
    y = (f > 0).long()
    flip = torch.rand(n, generator=gen) < noise
    return x, torch.where(flip, 1 - y, y)


def accuracy(model: nn.Module, x: torch.Tensor, y: torch.Tensor) -> float:
    return float((predict_proba(model, x).argmax(1) == y).float().mean())


def trained(x: torch.Tensor, y: torch.Tensor, cfg: TrainingConfig, seed: int) -> nn.Module:
    model = init_model_(build_model(ARCH, x.shape[1], 2), seed)
    return fit(model, x, y, cfg, seed)


def main(quick: bool = False, out: Path | None = None) -> dict[str, Any]:
    """Run B3, print a table, write JSON (to bench/results/b3.json unless `out`)."""
    torch.set_num_threads(THREADS)
    n_train, d = (6_000, 40) if quick else (50_000, 40)
    cfg = TrainingConfig(epochs=5 if quick else 40, batch_size=256, lr=3e-3, weight_decay=0.0)
    x, y = make_data(n_train, d, derive_seed(SEED, "train"), noise=0.1)
    xt, yt = make_data(n_train // 5, d, derive_seed(SEED, "test"), noise=0.0)
    perm = torch.randperm(n_train, generator=torch.Generator().manual_seed(SEED))
    n_forget = n_train // 100
    forget_idx, retain_idx = perm[:n_forget], perm[n_forget:]
    forget = (x[forget_idx], y[forget_idx])
    retain = (x[retain_idx], y[retain_idx])

    original = trained(x, y, cfg, SEED)
    t0 = time.perf_counter()
    reference = trained(*retain, cfg, SEED + 1)
    retrain_s = time.perf_counter() - t0

    def scores(m: nn.Module) -> dict[str, float]:
        return {
            "forget": accuracy(m, *forget),
            "retain": accuracy(m, *retain),
            "test": accuracy(m, xt, yt),
        }

    ref_scores = scores(reference)
    rows: list[dict[str, Any]] = [
        {"method": "original", "seconds": None, "fraction": None, **scores(original)},
        {"method": "retrain", "seconds": retrain_s, "fraction": 1.0, **ref_scores},
    ]
    for name in STRATEGIES:
        strategy = get_strategy(name)
        model = copy.deepcopy(original)
        result = strategy.run(model, forget, retain, strategy.default_params(), SEED, None)
        s = scores(model)
        rows.append(
            {
                "method": name,
                "seconds": result.wall_seconds,
                "fraction": result.wall_seconds / retrain_s,
                **s,
                "gap": {k: s[k] - ref_scores[k] for k in s},
                "params": result.params,
                "steps": result.steps,
                "examples": result.examples,
                "teacher_examples": result.teacher_examples,
                "met": result.wall_seconds / retrain_s <= TARGET_FRACTION,
            }
        )
    result_doc: dict[str, Any] = {
        "benchmark": "B3",
        "quick": quick,
        "n_train": n_train,
        "n_test": int(xt.shape[0]),
        "n_features": d,
        "n_forget": n_forget,
        "architecture": ARCH.to_dict(),
        "training": cfg.to_dict(),
        "threads": THREADS,
        "default_strategy": DEFAULT_STRATEGY,
        "target_fraction": TARGET_FRACTION,
        "rows": rows,
    }
    _print(result_doc)
    path = out or RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result_doc, indent=2) + "\n")
    return result_doc


def _print(doc: dict[str, Any]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(
        title=f"B3 - forgetting {doc['n_forget']} of {doc['n_train']} rows, MLP "
        f"{doc['architecture']['hidden']} (target: <= {doc['target_fraction']:.0%} of retrain)"
    )
    for col in ("method", "seconds", "of retrain", "forget acc", "retain acc", "test acc"):
        table.add_column(col, justify="right")
    table.add_column("gap to retrain (f / r / t)", justify="right")
    table.add_column("target met", justify="center")
    for r in doc["rows"]:
        gap = r.get("gap")
        table.add_row(
            r["method"],
            "-" if r["seconds"] is None else f"{r['seconds']:.2f}",
            "-" if r["fraction"] is None else f"{r['fraction']:.1%}",
            f"{r['forget']:.3f}",
            f"{r['retain']:.3f}",
            f"{r['test']:.3f}",
            "-"
            if gap is None
            else f"{gap['forget']:+.3f} / {gap['retain']:+.3f} / {gap['test']:+.3f}",
            "-" if "met" not in r else ("yes" if r["met"] else "NO"),
        )
    Console(width=160).print(table)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small smoke run")
    args = parser.parse_args()
    main(quick=args.quick)
