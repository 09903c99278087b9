"""Feature removal: make a model stop using one input feature.

Linear models get a second-order update toward the model trained without the feature
(Warnecke, Pirch, Wressnegger, Rieck, "Machine Unlearning of Features and Labels",
NDSS 2023). Networks get the feature's input weights zeroed and frozen, then a repair
pass on the retained data with those inputs zeroed. Either way the removed weights are
exactly zero, and with `PreprocessorState.with_removed(feature)` the inputs are zero as
well, so the model is structurally blind: changing the raw feature changes no score.
"""

from __future__ import annotations

import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from torch import nn

from app.ml.architectures import LogisticRegression, input_layer, probabilities
from app.ml.certified import (
    augment,
    newton_minimise,
    objective_gradient,
    objective_hessian,
    signed_labels,
)
from app.ml.config import TrainingConfig
from app.ml.preprocess import PreprocessorState
from app.ml.training import fit


@dataclass(frozen=True)
class FeatureUpdateResult:
    """Outcome of the linear second-order update; gradient norms are mean-form on the
    zeroed inputs over the remaining coordinates (0 would be the exact retrained model)."""

    columns: list[int]
    gradient_norm_before: float
    gradient_norm_after: float
    step_norm: float
    newton_steps: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@dataclass(frozen=True)
class FeatureRepairResult:
    """Outcome of zero-and-freeze plus repair for a network."""

    columns: list[int]
    repair_epochs: int
    examples: int
    seconds: float

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


def zero_columns(x: torch.Tensor, columns: Sequence[int]) -> torch.Tensor:
    """A copy of x (N, d) with `columns` set to 0 (what the preprocessor emits once the
    feature is removed)."""
    out = x.clone()
    if len(columns):
        out[:, list(columns)] = 0.0
    return out


def linear_feature_update(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    columns: list[int],
    lam: float,
    *,
    newton_steps: int = 1,
) -> FeatureUpdateResult:
    """Second-order update of a binary `LogisticRegression` in place, toward the
    minimiser of mean_i loss + lam/2 ||w||^2 (bias included in w) on x with `columns`
    zeroed and their weights fixed at 0.

    With w the current weights (removed ones set to 0) and F the remaining coordinates,
    w_F <- w_F - H_FF^-1 g_F, g and H the gradient and Hessian on the zeroed inputs: one
    Newton step (Warnecke et al.), which is exact to second order when the model was
    near its optimum with the feature. `newton_steps` > 1 iterates toward the optimum.
    """
    if not isinstance(model, LogisticRegression) or model.linear.out_features != 1:
        raise TypeError("the linear update needs a binary LogisticRegression (one logit)")
    start = time.perf_counter()
    lin = model.linear
    dev = lin.weight.device
    d = lin.in_features
    xa = augment(zero_columns(x.to(dev), columns))
    s = signed_labels(y, dev)
    n = xa.shape[0]
    w = torch.cat([lin.weight.detach()[0], lin.bias.detach()]).to(torch.float64)
    w[list(columns)] = 0.0
    free = torch.ones(d + 1, dtype=torch.bool, device=dev)
    free[list(columns)] = False
    idx = torch.nonzero(free)[:, 0]
    w_before = w.clone()
    # The mean-form objective is the sum form divided by n: same Newton step
    g0 = float(objective_gradient(xa, s, w, lam, None)[idx].norm()) / n
    for _ in range(max(1, newton_steps)):
        g = objective_gradient(xa, s, w, lam, None)[idx]
        h = objective_hessian(xa, w, lam)[idx][:, idx]
        w[idx] -= torch.linalg.solve(h, g)
    g1 = float(objective_gradient(xa, s, w, lam, None)[idx].norm()) / n
    with torch.no_grad():
        lin.weight.copy_(w[:d].to(lin.weight.dtype)[None, :])
        lin.bias.copy_(w[d:].to(lin.bias.dtype))
    return FeatureUpdateResult(
        columns=list(columns),
        gradient_norm_before=g0,
        gradient_norm_after=g1,
        step_norm=float((w - w_before).norm()),
        newton_steps=max(1, newton_steps),
        seconds=time.perf_counter() - start,
    )


def fit_logistic_exact(
    x: torch.Tensor, y: torch.Tensor, lam: float, *, removed_columns: Sequence[int] = ()
) -> LogisticRegression:
    """Reference: the exact minimiser of mean loss + lam/2 ||w||^2 (bias included),
    optionally retrained without `removed_columns` (inputs zeroed, weights held at 0)."""
    dev = x.device
    xa = augment(zero_columns(x, removed_columns))
    free = torch.ones(xa.shape[1], dtype=torch.bool, device=dev)
    free[list(removed_columns)] = False
    w = newton_minimise(xa, signed_labels(y, dev), lam, None, free=free)
    model = LogisticRegression(x.shape[1], 2).to(dev)
    with torch.no_grad():
        model.linear.weight.copy_(w[:-1].to(torch.float32)[None, :])
        model.linear.bias.copy_(w[-1:].to(torch.float32))
    model.eval()
    return model


def mlp_feature_removal(
    model: nn.Module,
    x: torch.Tensor,
    y: torch.Tensor,
    columns: list[int],
    cfg: TrainingConfig,
    seed: int,
    repair_epochs: int = 2,
) -> FeatureRepairResult:
    """Zero and freeze the feature's input weights, then repair on the retained data
    (x (N, d), y (N,)) with those inputs zeroed. Works for any model with an input layer
    (MLP or LogisticRegression); modifies `model` in place."""
    start = time.perf_counter()
    first = input_layer(model)
    with torch.no_grad():
        first.weight[:, columns] = 0.0
    dev = first.weight.device
    fit(
        model,
        zero_columns(x.to(dev), columns),
        y.to(dev),
        cfg,
        seed,
        epochs=repair_epochs,
        frozen_input_columns=columns,
    )
    model.eval()
    return FeatureRepairResult(
        columns=list(columns),
        repair_epochs=repair_epochs,
        examples=int(x.shape[0]) * max(repair_epochs, 0),
        seconds=time.perf_counter() - start,
    )


@dataclass(frozen=True)
class FlipTestResult:
    """Score changes when a feature's raw value is flipped.

    `max_abs_change`/`mean_abs_change`: over rows and over the alternative values, the
    change of the positive-class score against the row's own value. `group_gap`: mean
    score of rows whose raw value equals `value` minus that of the other rows.
    """

    feature: str
    value: str
    max_abs_change: float
    mean_abs_change: float
    group_gap: float
    n_with: int
    n_without: int

    def to_dict(self) -> dict[str, Any]:
        return dict(self.__dict__)


@torch.no_grad()
def _scores(model: nn.Module, x: torch.Tensor, positive_class: int) -> torch.Tensor:
    model.eval()
    dev = next(model.parameters()).device
    return probabilities(model(x.to(dev)))[:, positive_class].cpu()


def flip_values(pre: PreprocessorState, feature: str, column: np.ndarray) -> list[object]:
    """The values a flip test cycles through: a categorical's vocabulary, or the distinct
    values of a numeric feature (at most 10, e.g. a 0/1 flag)."""
    for name, vocab in pre.categorical:
        if name == feature:
            return list(vocab)
    distinct = np.unique(np.asarray(column, dtype=np.float64))
    distinct = distinct[np.isfinite(distinct)]
    if len(distinct) > 10:
        raise ValueError(f"{feature!r} has {len(distinct)} values; pass `values` explicitly")
    return [float(v) for v in distinct]


def flip_test(
    model: nn.Module,
    pre: PreprocessorState,
    columns: Mapping[str, np.ndarray],
    feature: str,
    value: object,
    *,
    values: Sequence[object] | None = None,
    positive_class: int = 1,
) -> FlipTestResult:
    """How much the model's score depends on `feature`, through the preprocessor `pre`.

    Each row is scored with its own raw value and with every other value of the feature
    (`values`, default `flip_values`); structurally blind models give exactly 0.
    """
    raw = np.asarray(columns[feature])
    vals = list(values) if values is not None else flip_values(pre, feature, raw)
    base = _scores(model, pre.transform(columns), positive_class)
    max_change = 0.0
    total, count = 0.0, 0
    for v in vals:
        flipped = dict(columns)
        flipped[feature] = np.full(len(raw), v, dtype=raw.dtype)
        diff = (_scores(model, pre.transform(flipped), positive_class) - base).abs()
        # rows already holding v compare against themselves; skip them for the mean
        other = ~_equal(raw, v)
        if other.any():
            max_change = max(max_change, float(diff[torch.from_numpy(other)].max()))
            total += float(diff[torch.from_numpy(other)].sum())
            count += int(other.sum())
    is_value = _equal(raw, value)
    n_with, n_without = int(is_value.sum()), int((~is_value).sum())
    mask = torch.from_numpy(is_value)
    gap = 0.0
    if n_with and n_without:
        gap = float(base[mask].mean() - base[~mask].mean())
    return FlipTestResult(
        feature=feature,
        value=str(value),
        max_abs_change=max_change,
        mean_abs_change=total / count if count else 0.0,
        group_gap=gap,
        n_with=n_with,
        n_without=n_without,
    )


def _equal(raw: np.ndarray, value: object) -> np.ndarray:
    if raw.dtype.kind in "fiub":
        return np.asarray(np.asarray(raw, dtype=np.float64) == float(str(value)), dtype=bool)
    return np.asarray([str(v) == str(value) for v in raw], dtype=bool)
