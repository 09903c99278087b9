"""Deterministic mini-batch training.

Given the same initial weights, inputs in the same order, config and seed, `fit` yields
bit-identical weights on CPU: the batch order is a permutation drawn from a generator
seeded only by `seed`, and the optimiser is created fresh for each call.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn

from app.ml.architectures import loss_fn
from app.ml.config import TrainingConfig
from app.ml.device import derive_seed

ProgressFn = Callable[[float], None]


def init_model_(model: nn.Module, seed: int) -> nn.Module:
    """Re-initialise every parameter from `seed` (independent of global RNG state)."""
    gen = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in sorted(model.named_parameters()):
            if name.endswith("bias"):
                p.zero_()
            else:
                fan_in = p.shape[1] if p.dim() > 1 else p.shape[0]
                bound = 1.0 / max(fan_in, 1) ** 0.5
                p.copy_(torch.empty(p.shape).uniform_(-bound, bound, generator=gen))
    return model


def fit(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    cfg: TrainingConfig,
    seed: int,
    *,
    epochs: int | None = None,
    progress: ProgressFn | None = None,
    frozen_input_columns: list[int] | None = None,
    sample_weight: torch.Tensor | None = None,
) -> nn.Module:
    """Train `model` in place on (x (N, d), y (N,)) with Adam and return it.

    `frozen_input_columns` keeps those input-weight columns at their current values
    (used after zeroing a removed feature's weights).

    `sample_weight` (N,), non-negative, turns each batch loss into the weighted mean
    mean_b(w_i * loss_i) with w rescaled to mean 1 over the whole of x: an unbiased
    estimate of the full weighted objective sum(w loss) / sum(w), so a batch that happens
    to hold many upweighted rows pushes harder, as it should. Batch order is unchanged,
    and without weights the computation is exactly the unweighted one.
    """
    n = x.shape[0]
    epochs = cfg.epochs if epochs is None else epochs
    if n == 0 or epochs <= 0:
        return model
    device = next(model.parameters()).device
    x = x.to(device)
    y = y.to(device)
    w: torch.Tensor | None = None
    if sample_weight is not None:
        w = _normalised_weights(sample_weight, n).to(device)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
    gen = torch.Generator().manual_seed(derive_seed(seed, "order"))
    mask: torch.Tensor | None = None
    first: nn.Linear | None = None
    if frozen_input_columns:
        from app.ml.architectures import input_layer

        first = input_layer(model)
        mask = torch.ones_like(first.weight)
        mask[:, frozen_input_columns] = 0.0
        frozen_values = first.weight.detach().clone()
    model.train()
    bs = max(1, cfg.batch_size)
    steps_per_epoch = (n + bs - 1) // bs
    total = epochs * steps_per_epoch
    done = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).to(device)
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
            done += 1
            if progress is not None and (done % 20 == 0 or done == total):
                progress(done / total)
    model.eval()
    return model


def _normalised_weights(sample_weight: torch.Tensor, n: int) -> torch.Tensor:
    w = sample_weight.detach().to(torch.float32).reshape(-1)
    if w.shape[0] != n:
        raise ValueError(f"sample_weight has {w.shape[0]} entries, expected {n}")
    if not bool(torch.isfinite(w).all()) or bool((w < 0).any()):
        raise ValueError("sample weights must be finite and non-negative")
    total = float(w.sum())
    if total <= 0.0:
        raise ValueError("sample weights must not all be zero")
    return w * (n / total)


def _weighted_loss(logits: torch.Tensor, labels: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
    """mean(w_i * cross-entropy_i), the same loss as `loss_fn` when every w_i is 1."""
    if logits.shape[1] == 1:
        per = nn.functional.binary_cross_entropy_with_logits(
            logits[:, 0], labels.to(logits.dtype), reduction="none"
        )
    else:
        per = nn.functional.cross_entropy(logits, labels, reduction="none")
    return (per * w.to(per.dtype)).mean()


@torch.no_grad()
def predict_proba(model: nn.Module, x: torch.Tensor, batch_size: int = 8192) -> torch.Tensor:
    """Class probabilities (N, C) under eval() and no_grad()."""
    from app.ml.architectures import probabilities

    model.eval()
    device = next(model.parameters()).device
    outs = [
        probabilities(model(x[i : i + batch_size].to(device))).cpu()
        for i in range(0, len(x), batch_size)
    ]
    if not outs:
        return torch.zeros((0, 2))
    return torch.cat(outs)
