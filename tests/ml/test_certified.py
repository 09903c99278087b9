"""Certified removal: the bound holds, removal ~ retraining, the budget forces a retrain."""

from __future__ import annotations

import pytest
import torch

from app.ml.certified import (
    NOISE_PER_ROW,
    SIGMA_FLOOR,
    CertifiedConfig,
    default_sigma,
    from_module,
    gradient_norm,
    predict_proba_certified,
    reference_bound,
    remove,
    retrain_certified,
    to_module,
    train_certified,
)
from app.ml.training import predict_proba
from app.pipeline.spec import UnlearningConfig

AGREEMENT = 0.99  # removal vs retrain-from-scratch prediction agreement on test rows


def make_data(n: int, d: int, seed: int) -> tuple[torch.Tensor, torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(d, generator=torch.Generator().manual_seed(7))
    x = torch.randn(n, d, generator=gen)
    y = (torch.rand(n, generator=gen) < torch.sigmoid(x @ w)).long()
    return x, y


CFG = CertifiedConfig(epsilon=1.0, delta=1e-4, lam=1e-2, sigma=5.0)


def split(n: int, removed: list[int]) -> torch.Tensor:
    keep = torch.ones(n, dtype=torch.bool)
    keep[removed] = False
    return keep


def test_gradient_residual_is_within_the_reported_bound_over_several_removals() -> None:
    x, y = make_data(2000, 10, 0)
    state = train_certified(x, y, CFG, seed=1)
    assert state.cumulative_bound < 1e-5  # training residual, counted in the bound
    keep = torch.ones(len(y), dtype=torch.bool)
    for batch in ([0], [1, 2, 3], list(range(10, 30))):
        new_keep = keep.clone()
        new_keep[batch] = False
        state, res = remove(state, x[new_keep], y[new_keep], x[batch], y[batch])
        keep = new_keep
        assert not res.fallback_required
        assert res.gradient_norm is not None
        assert res.gradient_norm <= res.cumulative_bound
        assert res.gradient_norm == pytest.approx(gradient_norm(state, x[keep], y[keep]))
        assert res.budget_left == pytest.approx(res.budget - res.cumulative_bound)
        assert res.budget == pytest.approx(CFG.sigma * CFG.epsilon / CFG.c)
    assert state.n == int(keep.sum())


def test_removal_agrees_with_retraining_from_scratch() -> None:
    x, y = make_data(3000, 20, 1)
    xt, _ = make_data(2000, 20, 2)
    state = train_certified(x, y, CFG, seed=3)
    keep = split(len(y), [5])
    removed, res = remove(state, x[keep], y[keep], x[~keep], y[~keep])
    assert not res.fallback_required
    reference = retrain_certified(x[keep], y[keep], CFG, seed=3)
    agree = (predict_proba_certified(removed, xt) > 0.5) == (
        predict_proba_certified(reference, xt) > 0.5
    )
    assert float(agree.double().mean()) >= AGREEMENT
    # the Newton step moves towards the retrained optimum, not away
    assert (removed.w - reference.w).norm() < (state.w - reference.w).norm()


def test_exceeding_the_budget_requires_fallback_and_retrain_resets_it() -> None:
    x, y = make_data(500, 5, 4)
    cfg = CertifiedConfig(epsilon=1.0, delta=1e-4, lam=1e-2, sigma=0.05)
    state = train_certified(x, y, cfg, seed=5)
    batch = list(range(100))
    keep = split(len(y), batch)
    unchanged, res = remove(state, x[keep], y[keep], x[~keep], y[~keep])
    assert res.fallback_required
    assert res.cumulative_bound > res.budget and res.budget_left == 0.0
    assert res.gradient_norm is None
    assert unchanged is state  # nothing applied: the caller retrains
    fresh = retrain_certified(x[keep], y[keep], cfg, seed=5)
    assert fresh.n == int(keep.sum())
    assert fresh.cumulative_bound < 1e-6 and fresh.budget_left == pytest.approx(
        cfg.budget, rel=1e-3
    )


def test_remove_refuses_inconsistent_row_counts() -> None:
    x, y = make_data(200, 4, 6)
    state = train_certified(x, y, CFG, seed=0)
    with pytest.raises(ValueError):
        remove(state, x[2:], y[2:], x[:1], y[:1])


def test_exported_module_serves_the_same_scores() -> None:
    x, y = make_data(400, 6, 8)
    state = train_certified(x, y, CFG, seed=0)
    module = to_module(state, 6)
    p_module = predict_proba(module, x)[:, 1].double()
    assert torch.allclose(p_module, predict_proba_certified(state, x), atol=1e-5)
    assert torch.allclose(from_module(module), state.w, atol=1e-5)


def test_config_derives_sigma_and_budget_from_epsilon_delta() -> None:
    cfg = CertifiedConfig.from_budget(epsilon=0.5, delta=1e-5, lam=1e-3, budget=0.2)
    assert cfg.budget == pytest.approx(0.2)
    assert cfg.sigma == pytest.approx(cfg.c * 0.2 / 0.5)
    with pytest.raises(ValueError):
        CertifiedConfig(lam=0.0)


def _sequential(
    x: torch.Tensor, y: torch.Tensor, n_removals: int, **kw: object
) -> tuple[list[float], list[float], list[float], int, int | None]:
    """`n_removals` single-record removals one after another: the running bound, the
    reference formulation's running bound on the same inputs (Hessian at the current
    weights every time), the measured residuals, how many Hessian rebuilds, and the
    removal at which the budget ran out (None: it did not)."""
    cfg = CertifiedConfig(epsilon=1.0, delta=1e-4, lam=1e-2, sigma=10.0)
    state = train_certified(x, y, cfg, seed=1)
    keep = torch.ones(len(y), dtype=torch.bool)
    ours, ref, residual = [], [], []
    ref_total = state.cumulative_bound
    for i in range(n_removals):
        new_keep = keep.clone()
        new_keep[i] = False
        _, ref_step = reference_bound(state, x[new_keep], x[i : i + 1], y[i : i + 1])
        ref_total += ref_step
        state, res = remove(state, x[new_keep], y[new_keep], x[i : i + 1], y[i : i + 1], **kw)  # type: ignore[arg-type]
        if res.fallback_required:
            return ours, ref, residual, state.refreshes, i
        keep = new_keep
        ours.append(res.cumulative_bound)
        ref.append(ref_total)
        assert res.gradient_norm is not None
        residual.append(res.gradient_norm)
    return ours, ref, residual, state.refreshes, None


def test_running_bound_stays_above_the_residual_and_near_the_reference_over_100_removals() -> None:
    x, y = make_data(1500, 10, 3)
    x = x / x.norm(dim=1, keepdim=True)  # unit rows, as in B2 and the paper
    ours, ref, residual, refreshes, exhausted = _sequential(x, y, 100)
    assert exhausted is None and len(ours) == 100  # inside the budget, no forced retrain
    assert all(r <= b for r, b in zip(residual, ours, strict=True))
    assert all(a <= 1.5 * b for a, b in zip(ours, ref, strict=True)), (ours[-1], ref[-1])
    assert refreshes > 0
    # Without rebuilds the drift term dominates: the same budget runs out early.
    stale, ref2, residual2, none, stale_exhausted = _sequential(x, y, 100, refresh_share=None)
    assert none == 0 and stale_exhausted is not None and stale_exhausted < 100
    assert stale[-1] > 1.5 * ref2[-1]
    assert all(r <= b for r, b in zip(residual2, stale, strict=True))


def test_default_noise_scale_follows_the_training_set_and_explicit_sigma_is_kept() -> None:
    default = CertifiedConfig()
    assert default.sigma is None
    assert default.for_rows(50_000).sigma == pytest.approx(NOISE_PER_ROW * 1e-3 * 50_000)
    assert default.for_rows(200).sigma == SIGMA_FLOOR  # small sets keep the floor
    assert CertifiedConfig(sigma=0.5).for_rows(50_000).sigma == 0.5
    with pytest.raises(ValueError):
        _ = default.budget  # unresolved: the rows decide it
    # Training fixes it, and the state remembers it (its budget solved back).
    x, y = make_data(400, 4, 11)
    state = train_certified(x, y, CertifiedConfig(lam=10.0), seed=0)
    assert state.sigma == pytest.approx(default_sigma(400, 10.0)) and state.sigma == 800.0
    # A model's stored settings: an explicit sigma wins over everything; without one,
    # retrains keep the sigma the model was first trained with.
    explicit = UnlearningConfig.from_dict({"certified": True, "certified_sigma": 3.0})
    assert explicit.certified_config(sigma=state.sigma).sigma == 3.0
    implicit = UnlearningConfig.from_dict({"certified": True})
    assert implicit.certified_config().sigma is None
    assert implicit.certified_config(sigma=state.sigma).sigma == state.sigma
