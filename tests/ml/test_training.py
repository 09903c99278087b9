"""The lean training loop is bit-identical to the plain one it replaced.

`plain_fit` below is `fit` as it was before the per-step overhead was cut (batch gather by
`x[idx]`, `torch.optim.Adam`, a slice of the permutation per step). Every model trained
before, and every SISA checkpoint a later unlearning reuses, came from it, so the new
loop must reproduce it exactly, not approximately.
"""

from __future__ import annotations

import pytest
import torch
from torch import nn

from app.ml.architectures import build_model, input_layer, loss_fn
from app.ml.config import ArchitectureConfig, TrainingConfig
from app.ml.device import derive_seed
from app.ml.training import _normalised_weights, _weighted_loss, fit, init_model_


def plain_fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainingConfig,
    seed: int,
    *,
    epochs: int | None = None,
    frozen_input_columns: list[int] | None = None,
    sample_weight: torch.Tensor | None = None,
) -> nn.Module:
    n = x.shape[0]
    epochs = cfg.epochs if epochs is None else epochs
    w = None if sample_weight is None else _normalised_weights(sample_weight, n)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(derive_seed(seed, "order"))
    mask = first = None
    if frozen_input_columns:
        first = input_layer(model)
        mask = torch.ones_like(first.weight)
        mask[:, frozen_input_columns] = 0.0
        frozen_values = first.weight.detach().clone()
    model.train()
    bs = max(1, cfg.batch_size)
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen)
        for start in range(0, n, bs):
            idx = order[start : start + bs]
            opt.zero_grad(set_to_none=True)
            if w is None:
                loss = loss_fn(model(x[idx]), y[idx])
            else:
                loss = _weighted_loss(model(x[idx]), y[idx], w[idx])
            loss.backward()  # type: ignore[no-untyped-call]
            if mask is not None and first is not None and first.weight.grad is not None:
                first.weight.grad.mul_(mask)
            opt.step()
            if mask is not None and first is not None:
                with torch.no_grad():
                    first.weight.copy_(torch.where(mask.bool(), first.weight, frozen_values))
    model.eval()
    return model


def _task(n: int, d: int, classes: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    x = torch.randn(n, d, generator=gen)
    y = (x[:, :classes].argmax(dim=1) if classes > 2 else (x[:, 0] + x[:, 1] > 0)).long()
    return x, y


def _pair(arch: ArchitectureConfig, d: int, classes: int) -> tuple[nn.Module, nn.Module]:
    a = init_model_(build_model(arch, d, classes), 5)
    b = init_model_(build_model(arch, d, classes), 5)
    return a, b


def _assert_equal(a: nn.Module, b: nn.Module) -> None:
    sa, sb = a.state_dict(), b.state_dict()
    assert sa.keys() == sb.keys()
    for k in sa:
        assert torch.equal(sa[k], sb[k]), k


@pytest.mark.parametrize(
    ("arch", "classes", "n", "cfg"),
    [
        # Partial last batch, weight decay on, hidden layers of odd widths.
        (
            ArchitectureConfig(kind="mlp", hidden=(37, 5)),
            2,
            301,
            TrainingConfig(epochs=4, batch_size=64, lr=0.02, weight_decay=1e-4),
        ),
        # Multi-class logistic model, no weight decay, batch larger than the data.
        (
            ArchitectureConfig(kind="logreg"),
            3,
            90,
            TrainingConfig(epochs=6, batch_size=128, lr=0.05, weight_decay=0.0),
        ),
        # Batch of one.
        (
            ArchitectureConfig(kind="mlp", hidden=(8,)),
            2,
            13,
            TrainingConfig(epochs=2, batch_size=1, lr=0.01, weight_decay=1e-3),
        ),
    ],
)
def test_fit_is_bit_identical_to_the_plain_loop(
    arch: ArchitectureConfig, classes: int, n: int, cfg: TrainingConfig
) -> None:
    x, y = _task(n, 11, classes, seed=n)
    a, b = _pair(arch, 11, classes)
    fit(a, x, y, cfg, seed=9)
    plain_fit(b, x, y, cfg, seed=9)
    _assert_equal(a, b)
    # An explicit epoch count (a SISA stage's) is honoured the same way.
    fit(a, x, y, cfg, seed=10, epochs=3)
    plain_fit(b, x, y, cfg, seed=10, epochs=3)
    _assert_equal(a, b)


def test_fit_with_weights_and_frozen_columns_is_bit_identical_to_the_plain_loop() -> None:
    x, y = _task(257, 9, 2, seed=1)
    cfg = TrainingConfig(epochs=3, batch_size=32, lr=0.03, weight_decay=1e-4)
    weights = torch.linspace(0.2, 3.0, 257)
    a, b = _pair(ArchitectureConfig(kind="mlp", hidden=(16,)), 9, 2)
    fit(a, x, y, cfg, seed=2, sample_weight=weights, frozen_input_columns=[1, 4])
    plain_fit(b, x, y, cfg, seed=2, sample_weight=weights, frozen_input_columns=[1, 4])
    _assert_equal(a, b)
    before = init_model_(build_model(ArchitectureConfig(kind="mlp", hidden=(16,)), 9, 2), 5)
    frozen = input_layer(a).weight[:, [1, 4]]
    assert torch.equal(frozen, input_layer(before).weight[:, [1, 4]])


def test_zero_epochs_or_rows_leave_the_model_untouched() -> None:
    x, y = _task(20, 4, 2, seed=3)
    a, b = _pair(ArchitectureConfig(kind="logreg"), 4, 2)
    fit(a, x, y, TrainingConfig(epochs=5), seed=1, epochs=0)
    fit(a, x[:0], y[:0], TrainingConfig(epochs=5), seed=1)
    _assert_equal(a, b)
