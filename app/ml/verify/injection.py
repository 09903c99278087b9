"""Feature-injection test for approximate unlearning (Izzo et al., AISTATS 2021).

A synthetic input column is appended that is non-zero only on the forget rows and there
carries the label (+scale for the target class, -scale otherwise), so the model learns
to lean on it. Its input weights start at exactly zero. On the retained rows the column
is identically zero, so a model retrained on them alone receives no gradient for those
weights (and Adam's L2 term on a zero weight is zero too): they stay exactly 0. The
residual ||W[:, injected]|| after / before therefore measures how much of what the
forget set alone taught the model survives the method: 0 for exact retraining, 1 for a
method that does nothing.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from app.ml.architectures import build_model, input_layer
from app.ml.config import ArchitectureConfig, TrainingConfig
from app.ml.device import derive_seed
from app.ml.training import fit, init_model_

UnlearnFn = Callable[[nn.Module, tuple[Tensor, Tensor], tuple[Tensor, Tensor]], None]


@dataclass
class InjectionResult:
    """Norm of the injected column's input weights before and after unlearning."""

    residual: float
    weight_before: float
    weight_after: float
    n_sample: int
    n_forget: int

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def injected_column(y: Tensor, forget_mask: np.ndarray, scale: float = 1.0) -> Tensor:
    """The synthetic column (N, 1): +-scale by label on the forget rows, 0 elsewhere.

    The sign is + for the target class (class 1 for binary tasks, the forget rows' most
    frequent class otherwise) and - for every other class.
    """
    f = torch.from_numpy(np.asarray(forget_mask, dtype=bool))
    yl = y.long()
    n_classes = int(yl.max().item()) + 1 if len(yl) else 2
    if n_classes <= 2 or not bool(f.any()):
        target = 1
    else:
        target = int(torch.bincount(yl[f], minlength=n_classes).argmax().item())
    sign = torch.where(yl == target, 1.0, -1.0)
    return torch.where(f, sign * scale, 0.0).to(torch.float32)[:, None]


def reset_injected_model_(model: nn.Module, seed: int) -> nn.Module:
    """Re-initialise `model` from `seed` with the injected (last) input column at zero.

    What an exact-retraining callback starts from, so it reproduces the protocol's
    fresh model rather than one whose injected weights start random.
    """
    init_model_(model, seed)
    with torch.no_grad():
        input_layer(model).weight[:, -1] = 0.0
    return model


def _column_norm(model: nn.Module) -> float:
    return float(input_layer(model).weight.detach()[:, -1].norm().item())


def injection_test(
    arch: ArchitectureConfig,
    x: Tensor,
    y: Tensor,
    forget_mask: np.ndarray,
    unlearn: UnlearnFn,
    training: TrainingConfig,
    seed: int,
    *,
    scale: float = 1.0,
    n_classes: int | None = None,
) -> InjectionResult:
    """Inject, train a fresh `arch` on the sample, unlearn the forget rows, report residual.

    `x` (N, d) preprocessed inputs of a sample, `y` (N,) labels, `forget_mask` (N,) bool.
    `unlearn(model, forget=(x_f, y_f), retain=(x_r, y_r))` updates the model in place.
    `scale` should match the inputs' spread (1.0 for standardised features).
    """
    f = np.asarray(forget_mask, dtype=bool)
    if f.shape != (x.shape[0],) or len(y) != x.shape[0]:
        raise ValueError("x, y and forget_mask must have one entry per row")
    if not f.any() or f.all():
        raise ValueError("the injection test needs both forget and retained rows")
    k = n_classes if n_classes is not None else max(2, int(y.max().item()) + 1)
    x_aug = torch.cat([x.to(torch.float32), injected_column(y, f, scale)], dim=1)
    model = build_model(arch, x_aug.shape[1], k)
    reset_injected_model_(model, derive_seed(seed, "injection", "init"))
    fit(model, x_aug, y.long(), training, derive_seed(seed, "injection", "fit"))
    before = _column_norm(model)
    if before == 0.0:
        raise ValueError("the model did not learn the injected feature; raise scale or epochs")
    ft = torch.from_numpy(f)
    unlearn(model, (x_aug[ft], y[ft].long()), (x_aug[~ft], y[~ft].long()))
    after = _column_norm(model)
    return InjectionResult(
        residual=after / before,
        weight_before=before,
        weight_after=after,
        n_sample=int(x.shape[0]),
        n_forget=int(f.sum()),
    )
