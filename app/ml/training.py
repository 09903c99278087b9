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

    Small models are bound by per-step overhead, not arithmetic, so the loop does no
    per-step work beyond the step itself: data, labels and weights move to the device
    once, each epoch's permutation is drawn once and split into batch index views, and
    on CPU the update is `_ExactAdam`. Every tensor operation is the one the plain loop
    (`x[idx]`, `torch.optim.Adam`) performs, in the same order, so the weights are
    bit-identical to it (tests/ml/test_training.py holds the plain loop and asserts it).
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
    opt = _optimiser(model, cfg)
    gen = torch.Generator().manual_seed(derive_seed(seed, "order"))
    mask: torch.Tensor | None = None
    first: nn.Linear | None = None
    if frozen_input_columns:
        from app.ml.architectures import input_layer

        first = input_layer(model)
        mask = torch.ones_like(first.weight)
        mask[:, frozen_input_columns] = 0.0
        keep = mask.bool()
        frozen_values = first.weight.detach().clone()
    model.train()
    bs = max(1, cfg.batch_size)
    steps_per_epoch = (n + bs - 1) // bs
    total = epochs * steps_per_epoch
    done = 0
    for _ in range(epochs):
        order = torch.randperm(n, generator=gen).to(device)
        for idx in torch.split(order, bs):
            opt.zero_grad(set_to_none=True)
            xb = x.index_select(0, idx)
            yb = y.index_select(0, idx)
            if w is None:
                loss = loss_fn(model(xb), yb)
            else:
                loss = _weighted_loss(model(xb), yb, w.index_select(0, idx))
            loss.backward()  # type: ignore[no-untyped-call]
            if mask is not None and first is not None and first.weight.grad is not None:
                first.weight.grad.mul_(mask)
            opt.step()
            if mask is not None and first is not None:
                with torch.no_grad():
                    first.weight.copy_(torch.where(keep, first.weight, frozen_values))
            done += 1
            if progress is not None and (done % 20 == 0 or done == total):
                progress(done / total)
    model.eval()
    return model


class _ExactAdam:
    """`torch.optim.Adam`'s update as torch runs it on CPU (the single-tensor path, no
    amsgrad, float hyper-parameters), op for op, without its per-step bookkeeping
    (hooks, profiler ranges, state look-ups, group re-collection), which costs more than
    the arithmetic of a small model. Parameters without a gradient are skipped and keep
    their own step count, as in torch."""

    betas = (0.9, 0.999)
    eps = 1e-8

    def __init__(self, params: list[nn.Parameter], lr: float, weight_decay: float) -> None:
        self.params = params
        self.lr = float(lr)
        self.weight_decay = float(weight_decay)
        self.exp_avg = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
        self.exp_avg_sq = [torch.zeros_like(p, memory_format=torch.preserve_format) for p in params]
        self.steps = [0] * len(params)

    def zero_grad(self, set_to_none: bool = True) -> None:
        for p in self.params:
            p.grad = None

    @torch.no_grad()
    def step(self) -> None:
        beta1, beta2 = self.betas
        for i, p in enumerate(self.params):
            grad = p.grad
            if grad is None:
                continue
            self.steps[i] += 1
            # torch keeps the count in a float32 tensor and reads it back as a float.
            step = float(self.steps[i])
            if self.weight_decay != 0:
                grad = grad.add(p, alpha=self.weight_decay)
            exp_avg, exp_avg_sq = self.exp_avg[i], self.exp_avg_sq[i]
            exp_avg.lerp_(grad, 1 - beta1)
            exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
            bias_correction1 = 1 - beta1**step
            bias_correction2 = 1 - beta2**step
            step_size = self.lr / bias_correction1
            bias_correction2_sqrt = bias_correction2**0.5
            denom = (exp_avg_sq.sqrt() / bias_correction2_sqrt).add_(self.eps)
            p.addcdiv_(exp_avg, denom, value=-step_size)


def _optimiser(model: nn.Module, cfg: TrainingConfig) -> _ExactAdam | torch.optim.Adam:
    params = list(model.parameters())
    # Elsewhere torch may pick its multi-tensor or fused kernels, whose rounding differs.
    if all(p.device.type == "cpu" and p.dtype.is_floating_point for p in params):
        return _ExactAdam(params, cfg.lr, cfg.weight_decay)
    return torch.optim.Adam(params, lr=cfg.lr, weight_decay=cfg.weight_decay)


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
