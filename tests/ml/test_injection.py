"""Izzo et al.'s feature-injection test: exact retraining 0, doing nothing 1."""

from __future__ import annotations

import json
from collections.abc import Iterator

import numpy as np
import pytest
import torch
from torch import Tensor, nn

from app.ml.approximate import STRATEGIES, run_strategy
from app.ml.config import ArchitectureConfig, TrainingConfig
from app.ml.training import fit
from app.ml.verify.injection import (
    UnlearnFn,
    injected_column,
    injection_test,
    reset_injected_model_,
)

D = 8
N = 400
TRAIN = TrainingConfig(epochs=30, batch_size=64, lr=1e-2, weight_decay=1e-4)
SMALL_TASK_PARAMS = {
    "finetune": {"epochs": 10, "retain_fraction": 1.0},
    "neggrad_plus": {"epochs": 5, "retain_fraction": 1.0},
    "scrub": {"epochs": 5, "max_epochs": 3, "retain_fraction": 1.0},
}


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _sample(seed: int = 0) -> tuple[Tensor, Tensor, np.ndarray]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(N, D, generator=gen)
    y = (x[:, 0] - x[:, 1] + 0.5 * torch.randn(N, generator=gen) > 0).long()
    forget = np.zeros(N, dtype=bool)
    forget[np.random.default_rng(seed).choice(N, size=40, replace=False)] = True
    return x, y, forget


def _exact(seed: int) -> UnlearnFn:
    def unlearn(
        model: nn.Module, forget: tuple[Tensor, Tensor], retain: tuple[Tensor, Tensor]
    ) -> None:
        reset_injected_model_(model, seed)
        fit(model, retain[0], retain[1], TRAIN, seed)

    return unlearn


def _nothing(
    model: nn.Module, forget: tuple[Tensor, Tensor], retain: tuple[Tensor, Tensor]
) -> None:
    return None


@pytest.mark.parametrize("kind", ["logreg", "mlp"])
def test_exact_retraining_leaves_no_residual(kind: str) -> None:
    x, y, f = _sample()
    arch = ArchitectureConfig(kind=kind, hidden=(32,))  # type: ignore[arg-type]
    res = injection_test(arch, x, y, f, _exact(5), TRAIN, seed=3)
    assert res.weight_before > 0.1
    assert res.residual == 0.0 and res.weight_after == 0.0
    assert res.n_sample == N and res.n_forget == 40
    json.dumps(res.to_dict())


@pytest.mark.parametrize("kind", ["logreg", "mlp"])
def test_doing_nothing_keeps_the_injected_weight(kind: str) -> None:
    x, y, f = _sample()
    arch = ArchitectureConfig(kind=kind, hidden=(32,))  # type: ignore[arg-type]
    res = injection_test(arch, x, y, f, _nothing, TRAIN, seed=3)
    assert res.residual == pytest.approx(1.0)


@pytest.mark.parametrize("name", sorted(SMALL_TASK_PARAMS))
def test_approximate_strategies_report_a_residual(name: str) -> None:
    assert name in STRATEGIES
    x, y, f = _sample()

    def unlearn(
        model: nn.Module, forget: tuple[Tensor, Tensor], retain: tuple[Tensor, Tensor]
    ) -> None:
        run_strategy(name, model, forget, retain, params=SMALL_TASK_PARAMS[name], seed=1)

    res = injection_test(ArchitectureConfig(kind="mlp", hidden=(32,)), x, y, f, unlearn, TRAIN, 3)
    print(f"{name}: residual {res.residual:.3f}")
    assert np.isfinite(res.residual) and res.residual >= 0.0


def test_injected_column_is_label_tied_on_forget_rows_only() -> None:
    y = torch.tensor([0, 1, 1, 0, 2, 2])
    f = np.array([True, True, False, False, True, True])
    col = injected_column(y, f, scale=2.0)[:, 0]
    assert col.tolist() == [-2.0, -2.0, 0.0, 0.0, 2.0, 2.0]  # target = forget rows' mode (2)
    with pytest.raises(ValueError):
        injection_test(
            ArchitectureConfig(), torch.zeros(6, 2), y, np.zeros(6, dtype=bool), _nothing, TRAIN, 0
        )
