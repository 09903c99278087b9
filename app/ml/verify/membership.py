"""Membership inference: does the unlearned model still treat the forget set as members?

Scores follow Carlini et al., "Membership Inference Attacks From First Principles"
(IEEE S&P 2022): the logit-scaled confidence on the true label, log p_y - log(1 - p_y),
which is close to Gaussian across models for a fixed example. Two attacks are offered:

- a global threshold attack over the scores (`attack`): AUC and TPR at 1% FPR of members
  (here: the forget set) against non-members from the same population (test rows);
- the offline likelihood-ratio test (`lira_offline`): each example's score is compared
  with its own distribution under reference models that never trained on it, which
  removes per-example difficulty and is what makes low-FPR claims meaningful.

`forgetting_check` turns them into a pass/fail: the candidate's attack on the forget set
must not beat the same attack against reference models (which never saw the forget set)
by more than a margin. Comparing against references rather than against 0.5 matters when
the forget set is not a random sample (a withdrawn district scores differently from the
test rows even under a model that never saw it).
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any

import numpy as np
import torch

from app.ml.metrics import roc_summary

# Probabilities are floored here before taking logs, which bounds scores to about +-27.6.
_PROB_FLOOR = 1e-12
# Below this many reference models a per-example variance is too noisy to trust (the
# paper's recommendation for per-example tests); the pooled variance is used instead.
LIRA_MIN_REFS = 4
# With K >= LIRA_MIN_REFS each example's variance is floored at this share of the pooled
# variance: a variance estimated from four samples is often far too small by chance,
# which would turn small score differences into huge z-scores.
_VAR_FLOOR_SHARE = 0.5
_MIN_STD = 1e-3
_MAX_SCORES_REPORTED = 500
LOW_FPR = 0.01
LOWER_FPR = 0.001
# RMIA's offline correction (Zarifzadeh et al., ICML 2024): with out-references only,
# Pr(x) is approximated by ((1 + a) * mean_out + (1 - a)) / 2; the paper's a for
# models of this kind.
RMIA_OFFLINE_A = 0.3
RMIA_GAMMA = 1.0


def _finite_or_none(v: float | None) -> float | None:
    if v is None or not math.isfinite(v):
        return None
    return float(v)


def member_scores(proba: torch.Tensor | np.ndarray, labels: np.ndarray) -> np.ndarray:
    """Per-example score (N,), higher = more member-like: log p_y - log(1 - p_y).

    `proba` is (N, C) class probabilities. 1 - p_y is taken as the sum of the other
    classes' probabilities (no cancellation when p_y is close to 1), and both terms are
    floored at 1e-12 so the score stays finite.
    """
    p = proba.detach().cpu().numpy() if isinstance(proba, torch.Tensor) else np.asarray(proba)
    p = p.astype(np.float64)
    y = np.asarray(labels, dtype=np.int64).reshape(-1)
    if p.ndim != 2 or p.shape[0] != len(y):
        raise ValueError(f"proba must be (N, C) with N = {len(y)}, got {p.shape}")
    if len(y) and (y.min() < 0 or y.max() >= p.shape[1]):
        raise ValueError("labels must be class indices into proba's columns")
    rows = np.arange(len(y))
    p_y = p[rows, y]
    others = p.sum(axis=1) - p_y
    if p.shape[1] == 2:
        others = p[rows, 1 - y]  # exact for binary, where rounding would matter most
    out: np.ndarray = np.log(np.maximum(p_y, _PROB_FLOOR)) - np.log(np.maximum(others, _PROB_FLOOR))
    return out


@dataclass
class AttackResult:
    """A threshold attack's success: members vs non-members."""

    auc: float
    tpr_at_1pct_fpr: float
    n_members: int
    n_nonmembers: int
    tpr_at_01pct_fpr: float = float("nan")

    def to_dict(self) -> dict[str, Any]:
        return {
            "auc": _finite_or_none(self.auc),
            "tpr_at_1pct_fpr": _finite_or_none(self.tpr_at_1pct_fpr),
            "tpr_at_0.1pct_fpr": _finite_or_none(self.tpr_at_01pct_fpr),
            "n_members": self.n_members,
            "n_nonmembers": self.n_nonmembers,
        }


def attack(member: np.ndarray, nonmember: np.ndarray) -> AttackResult:
    """Threshold attack over scores (any shape; flattened). Both sides must be non-empty.

    With fewer than 100 non-members, "1% FPR" means no false positive at all.
    """
    m = np.asarray(member, dtype=np.float64).reshape(-1)
    n = np.asarray(nonmember, dtype=np.float64).reshape(-1)
    if len(m) == 0 or len(n) == 0:
        raise ValueError("an attack needs at least one member and one non-member score")
    scores = np.concatenate([m, n])
    is_member = np.concatenate([np.ones(len(m), dtype=bool), np.zeros(len(n), dtype=bool)])
    area, (tpr_low, tpr_lower) = roc_summary(scores, is_member, (LOW_FPR, LOWER_FPR))
    return AttackResult(
        auc=area,
        tpr_at_1pct_fpr=tpr_low,
        n_members=len(m),
        n_nonmembers=len(n),
        tpr_at_01pct_fpr=tpr_lower,
    )


def lira_offline(target: np.ndarray, out_refs: np.ndarray) -> np.ndarray:
    """Offline LiRA statistic (N,): one-sided z-score of each target score, higher = member.

    `target` (N,) are the scores of N examples under the model being tested; `out_refs`
    (K, N) their scores under K reference models that did not train on them, NaN where
    a reference is missing for an example (an example has K_i >= 1 finite entries). Each
    example's out-distribution is a Gaussian N(mu_i, sigma_i^2):

    - mu_i is the mean of its K_i reference scores;
    - at most one reference per example: no per-example spread is observable; sigma is
      the spread of the reference scores across examples (conservative: it includes
      example difficulty);
    - fewer than 4 references: the pooled variance (mean of the per-example variances
      of the examples with two or more), the paper's "global variance" variant for few
      shadow models;
    - K_i >= 4: the per-example variance, floored at half the pooled variance.

    The z-score divides by the predictive spread sigma_i * sqrt(1 + 1/K_i) (the target's
    own spread plus that of a mean of K_i references), so examples with different
    numbers of references are standardised alike; with the same K_i everywhere this is
    a constant factor and ranks are unchanged. Carlini et al. recommend K >= 4 reference
    models before trusting per-example variances. The z-score is monotone in the paper's
    offline likelihood ratio 1 - Pr[Z > target], so ranks (and AUCs) agree.
    """
    t = np.asarray(target, dtype=np.float64).reshape(-1)
    refs = np.asarray(out_refs, dtype=np.float64)
    if refs.ndim == 1:
        refs = refs[None, :]
    if refs.ndim != 2 or refs.shape[1] != len(t):
        raise ValueError(f"out_refs must be (K, {len(t)}), got {refs.shape}")
    k = refs.shape[0]
    if k < 1:
        raise ValueError("LiRA needs at least one reference model")
    if len(t) == 0:
        return np.zeros(0, dtype=np.float64)
    have = np.isfinite(refs)
    k_i = have.sum(axis=0)
    if (k_i == 0).any():
        raise ValueError("every example needs at least one reference score")
    filled = np.where(have, refs, 0.0)
    mu = filled.sum(axis=0) / k_i
    dev2 = np.where(have, (refs - mu[None, :]) ** 2, 0.0).sum(axis=0)
    multi = k_i >= 2
    if not multi.any():
        single = filled.sum(axis=0)  # one score per example
        var = np.full(len(t), single.var(ddof=1) if len(t) > 1 else 0.0)
    else:
        per = np.where(multi, dev2 / np.maximum(k_i - 1, 1), np.nan)
        pooled = float(np.nanmean(per))
        own = k_i >= LIRA_MIN_REFS
        var = np.where(own, np.maximum(np.nan_to_num(per), _VAR_FLOOR_SHARE * pooled), pooled)
    std = np.maximum(np.sqrt(var * (1.0 + 1.0 / k_i)), _MIN_STD)
    z: np.ndarray = (t - mu) / std
    return z


def lira_online(target: np.ndarray, ref_scores: np.ndarray, in_mask: np.ndarray) -> np.ndarray:
    """Online LiRA statistic (N,): log N(t; mu_in, s_in) - log N(t; mu_out, s_out).

    `ref_scores` (K, N) are the N examples' scores under K reference models and `in_mask`
    (K, N) says which of them trained on each example. Per-example means; variances are
    pooled per side over the examples (Carlini et al.'s "global variance", the variant
    they recommend below 64 references). An example with no in-reference (a test row no
    model trained on) takes mu_out plus the mean in-out shift of the examples that have
    both, and one with no out-reference mu_in minus it; with no example having both
    sides the statistic falls back to the offline z-score.
    """
    t = np.asarray(target, dtype=np.float64).reshape(-1)
    refs = np.asarray(ref_scores, dtype=np.float64)
    inm = np.asarray(in_mask, dtype=bool)
    if refs.ndim != 2 or refs.shape != inm.shape or refs.shape[1] != len(t):
        raise ValueError(f"ref_scores and in_mask must be (K, {len(t)})")
    if len(t) == 0:
        return np.zeros(0, dtype=np.float64)
    outm = ~inm
    n_in, n_out = inm.sum(axis=0), outm.sum(axis=0)
    with np.errstate(invalid="ignore", divide="ignore"):
        mu_in = np.where(n_in > 0, (refs * inm).sum(axis=0) / np.maximum(n_in, 1), np.nan)
        mu_out = np.where(n_out > 0, (refs * outm).sum(axis=0) / np.maximum(n_out, 1), np.nan)
    both = (n_in > 0) & (n_out > 0)
    if not both.any():
        return lira_offline(t, refs)
    shift = float(np.mean(mu_in[both] - mu_out[both]))
    mu_in = np.where(n_in > 0, mu_in, mu_out + shift)
    mu_out = np.where(n_out > 0, mu_out, mu_in - shift)

    def pooled(mask: np.ndarray, mu: np.ndarray) -> float:
        dev = np.where(mask, (refs - mu[None, :]) ** 2, 0.0)
        dof = np.maximum(mask.sum(axis=0) - 1, 0)
        ok = dof > 0
        if not ok.any():  # one reference per side: the spread across examples
            return float(np.var(refs[mask])) if mask.any() else 1.0
        return float(dev[:, ok].sum() / dof[ok].sum())

    s_in = max(math.sqrt(pooled(inm, mu_in)), _MIN_STD)
    s_out = max(math.sqrt(pooled(outm, mu_out)), _MIN_STD)
    out: np.ndarray = (
        -0.5 * ((t - mu_in) / s_in) ** 2
        - math.log(s_in)
        + 0.5 * ((t - mu_out) / s_out) ** 2
        + math.log(s_out)
    )
    return out


def score_to_probability(scores: np.ndarray) -> np.ndarray:
    """The true label's probability behind a member score (its logistic)."""
    s = np.asarray(scores, dtype=np.float64)
    out: np.ndarray = 1.0 / (1.0 + np.exp(-s))
    return out


def rmia_prior(refs: np.ndarray, *, a: float = RMIA_OFFLINE_A) -> np.ndarray:
    """RMIA's Pr(x) per example from its out-references' member scores (K, N) or (N,):
    their mean probability (NaN: a reference missing), corrected as
    ((1 + a) p_out + (1 - a)) / 2, floored away from 0."""
    r = np.asarray(refs, dtype=np.float64)
    if r.ndim == 1:
        r = r[None, :]
    p_out = np.nanmean(score_to_probability(r), axis=0)
    prior: np.ndarray = np.maximum(0.5 * ((1.0 + a) * p_out + (1.0 - a)), _PROB_FLOOR)
    return prior


def rmia(
    target: np.ndarray,
    out_refs: np.ndarray,
    population_target: np.ndarray,
    population_refs: np.ndarray,
    *,
    a: float = RMIA_OFFLINE_A,
    gamma: float = RMIA_GAMMA,
    out_prior: np.ndarray | None = None,
    population_prior: np.ndarray | None = None,
) -> np.ndarray:
    """RMIA score (N,) (Zarifzadeh et al., "Low-Cost High-Power Membership Inference
    Attacks", ICML 2024), offline form: the share of population examples z that x
    dominates, i.e. for which (Pr(x|theta) / Pr(x)) / (Pr(z|theta) / Pr(z)) >= gamma.

    Inputs are member scores (logit confidences): `target` (N,) and `out_refs` (K, N) for
    the tested examples, `population_target` (Z,) and `population_refs` (K, Z) for the
    population (non-members from the same distribution); NaN marks a reference missing
    for an example (the mean is over those present). Pr(.|theta) is the true label's
    probability; Pr(x) the out-references' mean corrected as ((1 + a) p_out + (1 - a)) / 2.
    `out_prior` / `population_prior`: Pr(x) already computed (`rmia_prior` of the same
    references with the same `a`), for callers that attack several models against them.
    """

    def ratio(t: np.ndarray, refs: np.ndarray, prior: np.ndarray | None) -> np.ndarray:
        if prior is None:
            prior = rmia_prior(refs, a=a)
        out: np.ndarray = score_to_probability(t) / prior
        return out

    rx = ratio(np.asarray(target, dtype=np.float64).reshape(-1), out_refs, out_prior)
    rz = np.sort(
        ratio(
            np.asarray(population_target, dtype=np.float64).reshape(-1),
            population_refs,
            population_prior,
        )
    )
    if len(rz) == 0:
        raise ValueError("RMIA needs a population")
    # z is dominated when rx / rz >= gamma, i.e. rz <= rx / gamma.
    counts = np.searchsorted(rz, rx / gamma, side="right")
    score: np.ndarray = counts / float(len(rz))
    return score


def auc_null_se(n_pos: int, n_neg: int) -> float:
    """Standard error of the AUC of two exchangeable samples (Mann-Whitney null)."""
    if n_pos == 0 or n_neg == 0:
        return float("nan")
    return math.sqrt((n_pos + n_neg + 1) / (12.0 * n_pos * n_neg))


@dataclass
class ForgettingCheck:
    """Membership inference on the forget set, candidate vs references.

    `passed` is candidate.auc <= reference.auc + max(margin, 3 * SE0) and, when a LiRA
    AUC was computed (K >= 4 references), lira_auc <= lira_threshold as well.
    """

    passed: bool
    candidate: AttackResult
    reference: AttackResult
    margin: float
    lira_auc: float | None
    lira_threshold: float | None = None
    n_refs: int = 0
    allowed_margin: float | None = None
    forget_scores: list[float] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return {
            "passed": self.passed,
            "candidate": self.candidate.to_dict(),
            "reference": self.reference.to_dict(),
            "margin": self.margin,
            "allowed_margin": _finite_or_none(self.allowed_margin),
            "lira_auc": _finite_or_none(self.lira_auc),
            "lira_threshold": _finite_or_none(self.lira_threshold),
            "n_refs": self.n_refs,
            "forget_scores": [
                _finite_or_none(v) for v in self.forget_scores[:_MAX_SCORES_REPORTED]
            ],
        }


def forgetting_check(
    cand_forget: np.ndarray,
    cand_nonmember: np.ndarray,
    ref_forget: np.ndarray,
    ref_nonmember: np.ndarray,
    *,
    margin: float = 0.05,
    out_refs_forget: np.ndarray | None = None,
    out_refs_nonmember: np.ndarray | None = None,
    forget_units: int | None = None,
    nonmember_units: int | None = None,
) -> ForgettingCheck:
    """Does the candidate's attack on the forget set beat the references' by > margin?

    `cand_*` are member scores of the unlearned model on the forget set and on same-
    population non-members (test rows); `ref_*` the scores of models that never saw the
    forget set on the same kinds of rows (they may pool several reference models).

    With `out_refs_forget` (K, n_forget) and `out_refs_nonmember` (K, n_nonmember) and
    K >= 4, the per-example LiRA z-scores of the candidate (forget vs non-members) are
    ranked too. Because each example is compared with its own out-distribution, a model
    that never saw the forget set gives a LiRA AUC of 0.5 whatever the forget set's
    population, so the rule is lira_auc <= 0.5 + max(margin, 3 * SE0), where SE0 is the
    AUC's null standard error for these sample sizes: with a few dozen forget rows SE0
    alone is about 0.05, and a bare 0.5 + margin would fail honest unlearning about one
    time in six. Three, not two, standard errors: z-scores from a Gaussian fitted to a
    handful of references are heavy-tailed and a subject's rows are correlated, so the
    null AUC spreads wider than SE0 says. Measured on exact SISA unlearning (which cannot
    remember: every failure is a false alarm), single-subject jobs with 7 references
    failed 16 times in 197 at 2 * SE0, 8% of requests sent to review for nothing
    (0 in 197 at 3 * SE0). The variance is pooled over forget and non-member rows
    together so both sides are standardised alike. With K < 4 no LiRA AUC is computed
    (lira_auc None).

    `forget_units` / `nonmember_units`: the number of independent units behind the rows
    (distinct subjects). A person's rows are alike, so a forget set of 36 people with 124
    rows carries about 36 rows' worth of evidence; SE0 is computed from the units (never
    more than the rows). Rows counted as independent understate SE0 and fail honest
    unlearning of whole subjects: measured on a batch of 36 subjects, LiRA AUC 0.587
    against a row-based threshold of 0.586 on an exact SISA candidate.
    """
    cf = np.asarray(cand_forget, dtype=np.float64).reshape(-1)
    cn = np.asarray(cand_nonmember, dtype=np.float64).reshape(-1)
    candidate = attack(cf, cn)
    reference = attack(ref_forget, ref_nonmember)
    # The attack's resolution: with a handful of forget rows an AUC moves by chance far
    # more than any useful margin, and here two noisy AUCs are compared. The allowance is
    # never below three null standard errors for these sample sizes, so a small forget
    # set cannot fail on noise alone (with 300 forget rows it is about 0.075; with 3 it
    # is so wide that only per-example LiRA with K >= 4 references can say anything).
    n_f = min(len(cf), forget_units or len(cf))
    n_n = min(len(cn), nonmember_units or len(cn))
    allowed = max(margin, 3.0 * auc_null_se(n_f, n_n))
    passed = bool(candidate.auc <= reference.auc + allowed)

    lira: float | None = None
    threshold: float | None = None
    n_refs = 0
    if out_refs_forget is not None and out_refs_nonmember is not None:
        rf = np.asarray(out_refs_forget, dtype=np.float64)
        rn = np.asarray(out_refs_nonmember, dtype=np.float64)
        if rf.ndim == 1:
            rf = rf[None, :]
        if rn.ndim == 1:
            rn = rn[None, :]
        if rf.shape != (rf.shape[0], len(cf)) or rn.shape != (rf.shape[0], len(cn)):
            raise ValueError(
                "out_refs_forget/out_refs_nonmember must be (K, n_forget)/(K, n_nonmember) "
                f"with the same K; got {rf.shape} and {rn.shape}"
            )
        n_refs = rf.shape[0]
        if n_refs >= LIRA_MIN_REFS:
            z = lira_offline(np.concatenate([cf, cn]), np.concatenate([rf, rn], axis=1))
            lira = attack(z[: len(cf)], z[len(cf) :]).auc
            threshold = 0.5 + max(margin, 3.0 * auc_null_se(n_f, n_n))
            passed = passed and bool(lira <= threshold)
    return ForgettingCheck(
        passed=passed,
        candidate=candidate,
        reference=reference,
        margin=margin,
        lira_auc=lira,
        lira_threshold=threshold,
        n_refs=n_refs,
        allowed_margin=allowed,
        forget_scores=[float(v) for v in cf[:_MAX_SCORES_REPORTED]],
    )
