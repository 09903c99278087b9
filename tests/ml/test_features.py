"""Feature forgetting: structural blindness (exact) and the linear update vs retraining."""

from __future__ import annotations

import numpy as np
import torch

from app.ml.architectures import LogisticRegression, build_model
from app.ml.config import ArchitectureConfig, FeatureSpec, TrainingConfig
from app.ml.features import (
    fit_logistic_exact,
    flip_test,
    linear_feature_update,
    mlp_feature_removal,
    zero_columns,
)
from app.ml.preprocess import PreprocessorState, fit_preprocessor
from app.ml.training import fit, init_model_, predict_proba

LAM = 1e-3
# Stated tolerances for one Newton step (Warnecke et al.) against the exact retrained model
WEIGHT_REL_TOL = 0.05  # ||w_update - w_retrained|| / ||w_retrained||
PROBA_TOL = 0.01  # max |P_update(y=1) - P_retrained(y=1)| over rows


def make_cv_data(n: int, seed: int) -> tuple[dict[str, np.ndarray], np.ndarray]:
    """CV-screening-like rows whose labels favour a driving licence."""
    rng = np.random.default_rng(seed)
    experience = rng.gamma(2.0, 3.0, n)
    score = rng.normal(0, 1, n)
    licence = rng.choice(np.array(["yes", "no"], dtype=object), n, p=[0.6, 0.4])
    region = rng.choice(np.array(["north", "south", "east"], dtype=object), n)
    logit = 0.25 * (experience - 6) + 1.0 * score + 1.5 * (licence == "yes") - 0.7
    y = (rng.random(n) < 1 / (1 + np.exp(-logit))).astype(np.int64)
    cols = {"experience": experience, "score": score, "licence": licence, "region": region}
    return cols, y


SPEC = FeatureSpec(numeric=("experience", "score"), categorical=("licence", "region"))


def prepared(
    n: int = 1500, seed: int = 0
) -> tuple[PreprocessorState, dict[str, np.ndarray], torch.Tensor, torch.Tensor]:
    cols, y = make_cv_data(n, seed)
    pre = fit_preprocessor(SPEC, cols)
    return pre, cols, pre.transform(cols), torch.from_numpy(y)


def test_linear_update_lands_close_to_retraining_without_the_column() -> None:
    pre, _, x, y = prepared()
    columns = pre.feature_columns("licence")
    assert len(columns) == 2  # every one-hot column of the categorical
    model = fit_logistic_exact(x, y, LAM)
    result = linear_feature_update(model, x, y, columns, LAM)
    reference = fit_logistic_exact(x, y, LAM, removed_columns=columns)

    w = torch.cat([model.linear.weight[0], model.linear.bias]).detach().double()
    w_ref = torch.cat([reference.linear.weight[0], reference.linear.bias]).detach().double()
    assert torch.all(model.linear.weight[0, columns] == 0)
    rel = float((w - w_ref).norm() / w_ref.norm())
    assert rel <= WEIGHT_REL_TOL, rel
    x0 = zero_columns(x, columns)
    gap = float((predict_proba(model, x0)[:, 1] - predict_proba(reference, x0)[:, 1]).abs().max())
    assert gap <= PROBA_TOL, gap
    assert result.gradient_norm_after < result.gradient_norm_before


def _assert_blind(
    model: torch.nn.Module, pre: PreprocessorState, cols: dict[str, np.ndarray]
) -> None:
    blind = pre.with_removed("licence")
    flipped = dict(cols)
    flipped["licence"] = np.where(cols["licence"] == "yes", "no", "yes").astype(object)
    before = predict_proba(model, blind.transform(cols))
    after = predict_proba(model, blind.transform(flipped))
    assert torch.equal(before, after)
    # the weights alone already ignore the inputs: even the original encoding gives no change
    assert torch.equal(
        predict_proba(model, pre.transform(cols)), predict_proba(model, pre.transform(flipped))
    )
    res = flip_test(model, blind, cols, "licence", "yes")
    assert res.max_abs_change == 0.0


def test_logreg_is_structurally_blind_after_the_linear_update() -> None:
    pre, cols, x, y = prepared()
    model = init_model_(LogisticRegression(x.shape[1], 2), seed=1)
    fit(model, x, y, TrainingConfig(epochs=5, lr=0.05), seed=1)
    before = flip_test(model, pre, cols, "licence", "yes")
    assert before.max_abs_change > 0.05 and before.group_gap > 0.05
    linear_feature_update(model, x, y, pre.feature_columns("licence"), LAM)
    _assert_blind(model, pre, cols)


def test_mlp_is_structurally_blind_after_zero_freeze_and_repair() -> None:
    pre, cols, x, y = prepared()
    model = init_model_(build_model(ArchitectureConfig("mlp", (32,)), x.shape[1], 2), seed=2)
    cfg = TrainingConfig(epochs=8, lr=0.01, batch_size=64)
    fit(model, x, y, cfg, seed=2)
    acc_before = float((predict_proba(model, x).argmax(1) == y).float().mean())
    before = flip_test(model, pre, cols, "licence", "yes")
    assert before.max_abs_change > 0.05
    columns = pre.feature_columns("licence")
    result = mlp_feature_removal(model, x, y, columns, cfg, seed=3, repair_epochs=2)
    assert result.repair_epochs == 2
    assert torch.all(model.input_layer.weight[:, columns] == 0)
    _assert_blind(model, pre, cols)
    # repair keeps the model useful: the licence carried signal, so allow a few points
    acc_after = float(
        (predict_proba(model, zero_columns(x, columns)).argmax(1) == y).float().mean()
    )
    assert acc_after >= acc_before - 0.08, (acc_before, acc_after)


def test_flip_test_reports_group_gap_of_a_biased_model() -> None:
    pre, cols, x, y = prepared()
    model = fit_logistic_exact(x, y, LAM)
    res = flip_test(model, pre, cols, "licence", "yes")
    assert res.n_with + res.n_without == len(y)
    assert res.group_gap > 0.1  # licence holders score higher
    assert res.mean_abs_change <= res.max_abs_change
