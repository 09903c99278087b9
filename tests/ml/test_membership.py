"""Membership inference finds members of an overfit model and stops after exact unlearning."""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest
import torch

from app.ml.architectures import build_model
from app.ml.config import ArchitectureConfig, TrainingConfig
from app.ml.training import fit, init_model_, predict_proba
from app.ml.verify.membership import (
    LIRA_MIN_REFS,
    attack,
    forgetting_check,
    lira_offline,
    lira_online,
    member_scores,
    rmia,
)

D = 10
N_TRAIN = 300
N_FORGET = 100
N_TEST = 400
K_REFS = 4
ARCH = ArchitectureConfig(kind="mlp", hidden=(256,))
TRAIN = TrainingConfig(epochs=150, batch_size=50, lr=1e-2, weight_decay=0.0)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _population(n: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """A noisy linear task: 30% of labels flipped, so fitting them means memorising."""
    w = torch.linspace(-1.0, 1.0, D)
    x = torch.randn(n, D, generator=gen)
    y = (x @ w > 0).long()
    flip = torch.rand(n, generator=gen) < 0.3
    return x, torch.where(flip, 1 - y, y)


def _train(x: torch.Tensor, y: torch.Tensor, seed: int) -> torch.nn.Module:
    model = init_model_(build_model(ARCH, D, 2), seed)
    return fit(model, x, y, TRAIN, seed)


def _scores(model: torch.nn.Module, x: torch.Tensor, y: torch.Tensor) -> np.ndarray:
    return member_scores(predict_proba(model, x), y.numpy())


@pytest.fixture(scope="module")
def world() -> dict[str, Any]:
    gen = torch.Generator().manual_seed(0)
    x, y = _population(N_TRAIN + N_TEST, gen)
    xtr, ytr, xte, yte = x[:N_TRAIN], y[:N_TRAIN], x[N_TRAIN:], y[N_TRAIN:]
    xf, yf, xr, yr = xtr[:N_FORGET], ytr[:N_FORGET], xtr[N_FORGET:], ytr[N_FORGET:]
    original = _train(xtr, ytr, seed=1)
    retrained = _train(xr, yr, seed=2)  # exact unlearning
    refs = [_train(xr, yr, seed=100 + k) for k in range(K_REFS)]  # never saw the forget set
    ins = [_train(xtr, ytr, seed=200 + k) for k in range(2)]  # trained on the forget set
    return {
        "ins_forget": np.stack([_scores(m, xf, yf) for m in ins]),
        "ins_test": np.stack([_scores(m, xte, yte) for m in ins]),
        "members": (_scores(original, xtr, ytr), _scores(original, xte, yte)),
        "original": (_scores(original, xf, yf), _scores(original, xte, yte)),
        "retrained": (_scores(retrained, xf, yf), _scores(retrained, xte, yte)),
        "refs_forget": np.stack([_scores(m, xf, yf) for m in refs]),
        "refs_test": np.stack([_scores(m, xte, yte) for m in refs]),
    }


def test_member_scores_are_logit_confidence_and_finite() -> None:
    proba = np.array([[0.2, 0.8], [0.9, 0.1], [0.0, 1.0], [1.0, 0.0]])
    s = member_scores(proba, np.array([1, 1, 1, 1]))
    assert s[0] == pytest.approx(np.log(0.8 / 0.2))
    assert s[1] == pytest.approx(np.log(0.1 / 0.9))
    assert np.all(np.isfinite(s)) and s[2] > 20 and s[3] < -20
    multi = torch.tensor([[0.7, 0.2, 0.1]])
    assert member_scores(multi, np.array([0]))[0] == pytest.approx(np.log(0.7 / 0.3))


def test_attack_finds_members_of_an_overfit_model(world: dict[str, Any]) -> None:
    members, nonmembers = world["members"]
    result = attack(members, nonmembers)
    assert result.auc > 0.7
    assert result.n_members == N_TRAIN and result.n_nonmembers == N_TEST
    assert 0.0 <= result.tpr_at_1pct_fpr <= 1.0


def test_exact_unlearning_passes_the_check(world: dict[str, Any]) -> None:
    cand_forget, cand_test = world["retrained"]
    check = forgetting_check(
        cand_forget,
        cand_test,
        world["refs_forget"],
        world["refs_test"],
        out_refs_forget=world["refs_forget"],
        out_refs_nonmember=world["refs_test"],
    )
    assert abs(check.candidate.auc - check.reference.auc) < 0.05
    assert check.passed, check.to_dict()
    assert check.lira_auc is not None and check.n_refs == K_REFS
    d = check.to_dict()
    json.dumps(d)
    assert len(d["forget_scores"]) == N_FORGET


def test_model_that_still_holds_the_forget_set_fails(world: dict[str, Any]) -> None:
    orig_forget, orig_test = world["original"]
    check = forgetting_check(orig_forget, orig_test, world["refs_forget"], world["refs_test"])
    assert check.candidate.auc > check.reference.auc + 0.15
    assert not check.passed
    assert check.lira_auc is None  # no per-example references given
    with_lira = forgetting_check(
        orig_forget,
        orig_test,
        world["refs_forget"],
        world["refs_test"],
        out_refs_forget=world["refs_forget"],
        out_refs_nonmember=world["refs_test"],
    )
    assert with_lira.lira_auc is not None and with_lira.lira_auc > 0.65
    assert not with_lira.passed


def test_lira_alone_can_fail_a_candidate() -> None:
    """Global AUC within the margin, but each forget example sits above its own references."""
    rng = np.random.default_rng(0)
    difficulty = rng.normal(0, 3, size=200)  # per-example level dominates the global view
    refs = difficulty + rng.normal(0, 0.3, size=(LIRA_MIN_REFS, 200))
    cand = difficulty + rng.normal(0, 0.3, size=200)
    cand[:50] += 0.6  # the forget rows: a small but systematic member signal
    check = forgetting_check(
        cand[:50],
        cand[50:],
        refs[0, :50],
        refs[0, 50:],
        margin=0.1,
        out_refs_forget=refs[:, :50],
        out_refs_nonmember=refs[:, 50:],
    )
    assert check.candidate.auc <= check.reference.auc + 0.1
    assert check.lira_auc is not None and check.lira_threshold is not None
    assert check.lira_auc > check.lira_threshold
    assert not check.passed


def test_lira_below_four_references_is_not_used() -> None:
    rng = np.random.default_rng(1)
    refs = rng.normal(size=(3, 30))
    check = forgetting_check(
        rng.normal(size=10),
        rng.normal(size=20),
        refs[0, :10],
        refs[0, 10:],
        out_refs_forget=refs[:, :10],
        out_refs_nonmember=refs[:, 10:],
    )
    assert check.lira_auc is None and check.n_refs == 3


def test_lira_offline_statistic() -> None:
    rng = np.random.default_rng(2)
    mu = rng.normal(0, 5, size=100)
    refs = mu + rng.normal(0, 1, size=(8, 100))
    z_out = lira_offline(mu + rng.normal(0, 1, size=100), refs)
    z_in = lira_offline(mu + 3.0 + rng.normal(0, 1, size=100), refs)
    assert abs(float(np.mean(z_out))) < 0.5
    assert float(np.mean(z_in)) > 2.0
    # One reference still gives a finite statistic; none is refused.
    assert np.all(np.isfinite(lira_offline(mu, refs[:1])))
    with pytest.raises(ValueError):
        lira_offline(mu, np.zeros((0, 100)))
    with pytest.raises(ValueError):
        lira_offline(mu, refs[:, :50])
    with pytest.raises(ValueError):
        attack(np.array([]), np.array([1.0]))


def test_the_allowance_counts_people_not_rows() -> None:
    """Rows of one person are not independent evidence: with the same rows and scores,
    a forget set of 30 people allows more than one of 120 independent rows."""
    from app.ml.verify.membership import forgetting_check

    rng = np.random.default_rng(0)
    cf, cn = rng.normal(size=120), rng.normal(size=600)
    rows = forgetting_check(cf, cn, cf, cn)
    people = forgetting_check(cf, cn, cf, cn, forget_units=30, nonmember_units=150)
    assert people.allowed_margin is not None and rows.allowed_margin is not None
    assert people.allowed_margin > rows.allowed_margin
    # Units never count for more than the rows themselves.
    capped = forgetting_check(cf, cn, cf, cn, forget_units=10_000, nonmember_units=10_000)
    assert capped.allowed_margin == rows.allowed_margin


def test_per_example_attacks_separate_known_members_from_non_members(
    world: dict[str, Any],
) -> None:
    """Offline and online LiRA and RMIA on a small overfit model: its training rows (the
    forget set, members) against held-out rows; and after exact unlearning they cannot."""
    rf, rt = world["refs_forget"], world["refs_test"]  # out-references for both sides
    inf, int_ = world["ins_forget"], world["ins_test"]  # in for the forget rows only
    refs = np.concatenate([np.concatenate([rf, inf]), np.concatenate([rt, int_])], axis=1)
    in_mask = np.zeros(refs.shape, dtype=bool)
    in_mask[K_REFS:, :N_FORGET] = True
    for model, lo, hi in (("original", 0.7, 1.0), ("retrained", 0.35, 0.65)):
        f, t = world[model]
        lira = lira_offline(np.concatenate([f, t]), np.concatenate([rf, rt], axis=1))
        online = lira_online(np.concatenate([f, t]), refs, in_mask)
        r_f, r_t = rmia(f, rf, t, rt), rmia(t, rt, t, rt)
        for name, (m, n) in {
            "lira_offline": (lira[:N_FORGET], lira[N_FORGET:]),
            "lira_online": (online[:N_FORGET], online[N_FORGET:]),
            "rmia": (r_f, r_t),
        }.items():
            result = attack(m, n)
            assert lo <= result.auc <= hi, (model, name, result)
            if model == "original":
                assert result.tpr_at_1pct_fpr > 0.05, (name, result)
            assert 0.0 <= result.tpr_at_01pct_fpr <= result.tpr_at_1pct_fpr


def test_rmia_score_is_the_share_of_the_population_dominated() -> None:
    pop_t, pop_r = np.zeros(4), np.zeros((1, 4))
    # Equal likelihood ratios dominate every population row at gamma = 1.
    assert rmia(np.zeros(1), np.zeros((1, 1)), pop_t, pop_r)[0] == 1.0
    # Far less confident than its references: dominates none.
    assert rmia(np.array([-20.0]), np.zeros((1, 1)), pop_t, pop_r)[0] == 0.0
