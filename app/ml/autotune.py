"""Strategy "auto": choose an approximate strategy and its hyper-parameters per model.

A small validation search: each candidate (a strategy with a few settings) unlearns a
copy of the model on a sample of the job's data, and is scored by how close it comes to
what a model that never saw the forget set looks like, measured on the same rows:

- forget accuracy against the out-references' forget accuracy (reference models that
  never trained on those rows; without them the model's test accuracy stands in: a
  retrained model treats the forget rows like unseen rows);
- retain and test accuracy against the original model's (unlearning should not cost
  them);
- the forget rows' mean membership score against the out-references' (in units of the
  references' score spread, weighted a tenth).

The search starts a candidate only if it should end within its budget (a share of one
retrain's estimated time, predicted from the slowest candidate so far; the first always
runs, so a model whose single strategy run costs more than the budget overshoots); the
best is then run on the job's full data as the job's method. The choice, the
candidates' scores and the search's cost go into the job's result, and later jobs on
the same trained state reuse it.
"""

from __future__ import annotations

import copy
import time
from dataclasses import asdict, dataclass, field
from typing import Any

import numpy as np
import torch
from torch import nn

from app.ml.approximate import Pair, run_strategy
from app.ml.training import predict_proba
from app.ml.verify.membership import member_scores

# (strategy, parameter overrides), cheapest and most often right first.
CANDIDATES: tuple[tuple[str, dict[str, Any]], ...] = (
    ("neggrad_plus", {}),
    ("neggrad_plus", {"epochs": 4}),
    ("neggrad_plus", {"lr": 3e-3}),
    ("scrub", {}),
    ("finetune", {"epochs": 2}),
)
BUDGET_SHARE = 0.15  # of one retrain's estimated time: under the 20%
SAMPLE_RETAIN = 2000  # retained rows the candidates train and are scored on


@dataclass
class AutoChoice:
    strategy: str
    params: dict[str, Any]
    search: list[dict[str, Any]] = field(default_factory=list)
    search_seconds: float = 0.0
    budget_seconds: float | None = None
    targets: dict[str, float] = field(default_factory=dict)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> AutoChoice:
        return cls(
            strategy=str(d["strategy"]),
            params=dict(d.get("params") or {}),
            search=list(d.get("search") or []),
            search_seconds=float(d.get("search_seconds") or 0.0),
            budget_seconds=d.get("budget_seconds"),
            targets=dict(d.get("targets") or {}),
        )


def _acc(model: nn.Module, xy: Pair) -> float:
    x, y = xy
    if len(y) == 0:
        return float("nan")
    return float((predict_proba(model, x).argmax(1) == y.cpu()).float().mean())


def _mean_score(model: nn.Module, xy: Pair) -> float:
    x, y = xy
    return float(np.mean(member_scores(predict_proba(model, x), y.cpu().numpy())))


def select(
    model: nn.Module,
    forget: Pair,
    retain: Pair,
    test: Pair,
    *,
    reference_forget_accuracy: float | None,
    reference_forget_scores: np.ndarray | None,
    retrain_seconds: float | None,
    seed: int,
) -> AutoChoice:
    """Run the candidates on a copy of `model` (not changed) and return the best."""
    t0 = time.perf_counter()
    gen = np.random.default_rng(seed)
    n_r = len(retain[1])
    pick: np.ndarray = (
        np.sort(gen.choice(n_r, min(n_r, SAMPLE_RETAIN), replace=False))
        if n_r
        else np.zeros(0, dtype=np.int64)
    )
    idx = torch.as_tensor(np.asarray(pick, dtype=np.int64))
    retain_s: Pair = (retain[0][idx], retain[1][idx])
    base_test = _acc(model, test) if len(test[1]) else _acc(model, retain_s)
    targets = {
        "forget_accuracy": (
            reference_forget_accuracy if reference_forget_accuracy is not None else base_test
        ),
        "retain_accuracy": _acc(model, retain_s),
        "test_accuracy": base_test,
    }
    ref_mu = ref_sd = None
    if reference_forget_scores is not None and len(reference_forget_scores):
        ref_mu = float(np.mean(reference_forget_scores))
        ref_sd = float(np.std(reference_forget_scores)) + 1e-6
        targets["forget_mean_score"] = ref_mu
    budget = None if retrain_seconds is None else BUDGET_SHARE * retrain_seconds
    search: list[dict[str, Any]] = []
    for i, (name, params) in enumerate(CANDIDATES):
        spent = time.perf_counter() - t0
        # The next candidate starts only if it should end within the budget (its cost
        # predicted by the slowest so far); the first always runs.
        slowest = max((r["seconds"] for r in search), default=0.0)
        if i > 0 and budget is not None and spent + slowest > budget:
            break
        trial = copy.deepcopy(model)
        t1 = time.perf_counter()
        run_strategy(name, trial, forget, retain_s, params=params, seed=seed + i)
        f, r = _acc(trial, forget), _acc(trial, retain_s)
        t = _acc(trial, test) if len(test[1]) else r
        distance = (
            abs(f - targets["forget_accuracy"])
            + abs(r - targets["retain_accuracy"])
            + abs(t - targets["test_accuracy"])
        )
        row: dict[str, Any] = {
            "strategy": name,
            "params": params,
            "forget_accuracy": f,
            "retain_accuracy": r,
            "test_accuracy": t,
            "seconds": time.perf_counter() - t1,  # the run and its scoring
        }
        if ref_mu is not None and ref_sd is not None:
            gap = abs(_mean_score(trial, forget) - ref_mu) / ref_sd
            row["score_gap_sd"] = gap
            distance += 0.1 * gap
        row["distance"] = distance if np.isfinite(distance) else float("inf")
        search.append(row)
    best = min(search, key=lambda r: r["distance"])
    return AutoChoice(
        strategy=str(best["strategy"]),
        params=dict(best["params"]),
        search=search,
        search_seconds=time.perf_counter() - t0,
        budget_seconds=budget,
        targets=targets,
    )
