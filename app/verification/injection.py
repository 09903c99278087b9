"""The injection check for approximate methods (Izzo et al., AISTATS 2021).

On a sample of the job's rows a synthetic feature is injected that is non-zero only on
the forget rows and carries their label; a fresh model of the same architecture learns
it, the model's own strategy unlearns the forget rows, and the share of the feature's
weight that survives is reported (exact retraining leaves 0; doing nothing leaves 1).
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch

from app.ml.approximate import run_strategy
from app.ml.config import ArchitectureConfig, TrainingConfig
from app.ml.data import TabularData
from app.ml.preprocess import PreprocessorState
from app.ml.verify.injection import injection_test
from app.verification.service import Check

MAX_RETAIN, MAX_FORGET = 1500, 300  # a sample: the test trains a fresh model


def injection(
    arch: ArchitectureConfig,
    training: TrainingConfig,
    n_classes: int,
    prep: PreprocessorState,
    retained: TabularData,
    forget: TabularData,
    *,
    strategy: str,
    params: dict[str, Any] | None,
    device: torch.device,
    seed: int,
    max_residual: float | None,
) -> Check:
    threshold = {"max_residual": max_residual}
    if len(forget) == 0 or len(retained) == 0:
        return Check(True, {"note": "no forget or retained rows"}, threshold)
    rng = np.random.default_rng(seed)
    r = retained.take(np.sort(rng.permutation(len(retained))[:MAX_RETAIN]))
    f = forget.take(np.sort(rng.permutation(len(forget))[:MAX_FORGET]))
    x = torch.cat([prep.transform(r.columns), prep.transform(f.columns)]).to(device)
    y = torch.from_numpy(np.concatenate([r.labels, f.labels])).to(device)
    mask = np.concatenate([np.zeros(len(r), dtype=bool), np.ones(len(f), dtype=bool)])

    def unlearn(model: torch.nn.Module, forget_xy: Any, retain_xy: Any) -> None:
        run_strategy(strategy, model, forget_xy, retain_xy, params=params, seed=seed)

    try:
        result = injection_test(
            arch,
            x,
            y,
            mask,
            unlearn,
            training,
            seed,
            n_classes=n_classes,
        )
    # e.g. the sample model did not pick the feature up, or (TypeError) the network
    # exposes no input layer to inject into (an architecture plugin without one)
    except (ValueError, TypeError) as exc:
        return Check(True, {"note": f"not measurable: {exc}"}, threshold)
    passed = max_residual is None or result.residual <= max_residual
    metrics = result.to_dict() | {"strategy": strategy, "gating": max_residual is not None}
    return Check(passed, metrics, threshold)
