"""The forgetting check: membership-inference attacks on the forget set, calibrated by
reference models that never saw it, and measured for power on the baseline first.

References are shard-like models with known training sets (a `SisaManifest`): for a SISA
model, the production version's own shards (a record is in exactly one shard, so the
others are free out-references); for a monolithic model, K reference models trained on
random halves when the model is trained (`app.registry.references`). For each forget
record the reference score averages the references that did not train on it; the
non-members are the held-out test rows, which no model trained on.
"""

from __future__ import annotations

from typing import Any

import numpy as np

from app.ml.data import TabularData
from app.ml.device import derive_seed, mix64
from app.ml.sisa import SisaEnsemble
from app.ml.verify.membership import (
    attack,
    auc_null_se,
    forgetting_check,
    lira_offline,
    lira_online,
    member_scores,
    rmia,
    rmia_prior,
)
from app.registry.artifacts import Predictor
from app.verification.service import Check

MAX_ROWS = 5000  # enough for a stable AUC; bounds the cost of verification
# Non-members attacked against a forget set of u independent units (people): the AUC's
# null variance is about (1/u + 1/n) / 12, so n = 20 u leaves its standard error within
# 2.5% of an unlimited sample's; at least 1,000, so that a TPR at 0.1% FPR has a
# threshold to stand on (one false positive in 1,000).
NONMEMBERS_PER_UNIT = 20
MIN_NONMEMBERS = 1000
# Scores kept per population in the report, for the dashboard's distribution chart:
# enough to draw a histogram, small enough to keep the report JSON compact.
SAMPLE_SCORES = 200


def _units(data: TabularData) -> int | None:
    """Distinct subjects behind the rows (None when the rows carry no subject keys)."""
    keys = {k for k in np.asarray(data.subjects, dtype=object).tolist() if k}
    return len(keys) if keys else None


def cap_index(n: int, seed: int, k: int = MAX_ROWS) -> np.ndarray | None:
    """The rows the attack uses of `n` (a seeded sample of `k`; None: all)."""
    if n <= k:
        return None
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, k, replace=False))


def _cap(data: TabularData, seed: int) -> TabularData:
    index = cap_index(len(data), seed)
    return data if index is None else data.take(index)


def nonmember_count(forget: TabularData) -> int:
    """How many non-members the attack takes against this forget set: NONMEMBERS_PER_UNIT
    per independent unit behind its (capped) rows, at least MIN_NONMEMBERS, at most
    MAX_ROWS. A one-person request is judged against 1,000 test rows, not 5,000: its
    AUC's resolution is set by the one person, and the other 4,000 rows only cost time."""
    rows = min(len(forget), MAX_ROWS)
    units = min(rows, _units(forget) or rows)
    return int(min(MAX_ROWS, max(MIN_NONMEMBERS, NONMEMBERS_PER_UNIT * units)))


def attack_rows(n_test: int, forget: TabularData, seed: int) -> np.ndarray | None:
    """The test rows (indices of `n_test`) the forgetting check attacks against this
    forget set with this seed (None: all of them): what `forgetting` draws itself, for
    callers that prepare the outputs on those rows beforehand."""
    return cap_index(n_test, seed + 1, nonmember_count(forget))


def score_samples(
    populations: dict[str, np.ndarray], seed: int, k: int = SAMPLE_SCORES
) -> dict[str, list[float]]:
    """Up to `k` scores per population (a seeded random sample, rounded to 3 decimals,
    non-finite ones dropped): what the report shows of each score distribution."""
    out: dict[str, list[float]] = {}
    for i, (name, scores) in enumerate(populations.items()):
        s = np.asarray(scores, dtype=np.float64).reshape(-1)
        s = s[np.isfinite(s)]
        if len(s) > k:
            s = np.random.default_rng(seed + i).choice(s, k, replace=False)
        out[name] = [round(float(v), 3) for v in s]
    return out


def _out_masks(refs: SisaEnsemble, data: TabularData) -> np.ndarray:
    """(K, N): which references did NOT train on each row."""
    out = np.ones((len(refs.shards), len(data)), dtype=bool)
    rows = np.asarray(data.record_ids, dtype=np.int64)
    for j, s in enumerate(refs.shards):
        # A sorted search, not a hash set per reference: the rows are often thousands.
        trained = np.sort(refs.manifest.entry(s).ids)
        if len(trained):
            pos = np.minimum(np.searchsorted(trained, rows), len(trained) - 1)
            out[j] = trained[pos] != rows
    return out


_OUT_SALT = derive_seed("out-reference")


def _pick(out: np.ndarray, record_ids: np.ndarray, k_use: int) -> np.ndarray:
    """(k_use, N): for each row, `k_use` of the references that did not train on it, the
    ones with the smallest hash of (record id, reference): a fixed pseudo-random choice
    per record, made for all rows at once."""
    k = out.shape[0]
    with np.errstate(over="ignore"):
        z = np.asarray(record_ids, dtype=np.uint64)[None, :] * np.uint64(k + 1)
        z = z + np.arange(k, dtype=np.uint64)[:, None]
    z = np.where(out, mix64(z, _OUT_SALT), np.uint64(np.iinfo(np.uint64).max))
    return np.argsort(z, axis=0, kind="stable")[:k_use].astype(np.int64)


def _ref_probas(refs: SisaEnsemble, data: TabularData) -> np.ndarray:
    """(K, N, C): every reference's probabilities on the rows."""
    probas = refs.shard_probas(data.columns)
    return np.stack([probas[s].numpy() for s in refs.shards])


def _all_scores(stacked: np.ndarray, labels: np.ndarray) -> np.ndarray:
    """(K, N): every reference's member score on every row, in one call (the score is
    computed row by row, so each equals the score of that reference's row alone)."""
    k, n, c = stacked.shape
    return member_scores(stacked.reshape(k * n, c), np.tile(labels, k)).reshape(k, n)


def _out_reference(
    stacked: np.ndarray, data: TabularData, out: np.ndarray, k_use: int, scores: np.ndarray
) -> tuple[np.ndarray, np.ndarray]:
    """Scores of each row under `k_use` of the references that did not train on it
    (picked by a hash of the record id so both sides of the attack average alike; a row
    with fewer out-references uses all it has): the score of their mean probability
    (N,), and the per-reference scores (k_use, N), NaN where a row has no more
    references, for the likelihood-ratio tests."""
    n = len(data)
    chosen = _pick(out, data.record_ids, k_use)
    cols = np.arange(n)
    valid = out[chosen, cols[None, :]]  # (k_use, N): a reference that never saw the row
    picked = np.where(valid[..., None], stacked[chosen, cols[None, :]], 0.0)  # (k_use, N, C)
    # Each picked reference's score on its row: `scores` (K, N) of `_all_scores` taken.
    per_ref = np.where(valid, scores[chosen, cols[None, :]], np.nan)
    mean = picked.sum(axis=0) / np.maximum(valid.sum(axis=0), 1)[:, None]
    return member_scores(mean, data.labels), per_ref


def references_per_row(out_f: np.ndarray, out_n: np.ndarray) -> int:
    """How many out-references each row is scored under: the median forget row's count
    of references that never saw it, capped by the fewest any non-member has (so both
    sides use the same number wherever they can). A forget row with fewer uses all it
    has (the likelihood-ratio test's predictive variance accounts for it); the minimum
    over rows instead would let one unlucky row (a random half that held it in five of
    six references) cut every row's references to one."""
    per_f = out_f.sum(axis=0)
    return int(max(1, min(np.median(per_f[per_f > 0]), out_n.sum(axis=0).min())))


# The two bars of each gating attack, in null standard errors of its AUC (counted in
# people): beyond EVIDENCE_SE an attack finds the forget set (on the candidate: fail,
# when it also found it on the baseline); beyond POWER_SE on the baseline it has power,
# which a pass needs. The band between them is hysteresis: a no-op whose baseline shows
# membership at 2 to 3 standard errors fails instead of being inconclusive by luck.
EVIDENCE_SE = 2.0
POWER_SE = 3.0
POWER_RULE = (
    f"an attack has power when it beats its null by {POWER_SE:g} standard errors on the "
    "baseline (which still holds the forget set); a pass needs power; the candidate fails "
    f"when an attack beats {EVIDENCE_SE:g} standard errors on both the baseline and the "
    "candidate"
)


def _attack_suite(
    t_f: np.ndarray,
    t_n: np.ndarray,
    per_ref_f: np.ndarray,
    per_ref_n: np.ndarray,
    all_f: np.ndarray,
    all_n: np.ndarray,
    in_f: np.ndarray,
    in_n: np.ndarray,
    prior_f: np.ndarray,
    prior_n: np.ndarray,
) -> tuple[dict[str, Any], dict[str, np.ndarray]]:
    """Per-example attacks of one model (target scores `t_*`) on the forget rows against
    the non-members: offline LiRA (each row against its own out-references), online LiRA
    (in- and out-references; rows no reference trained on take the mean in-out shift)
    and RMIA (each row's likelihood ratio against the non-member population). Returns
    the AUC / TPR at 1% and 0.1% FPR of each, and the per-example statistics."""
    z = lira_offline(np.concatenate([t_f, t_n]), np.concatenate([per_ref_f, per_ref_n], axis=1))
    on = lira_online(
        np.concatenate([t_f, t_n]),
        np.concatenate([all_f, all_n], axis=1),
        np.concatenate([in_f, in_n], axis=1),
    )
    # Pr(x) of each row from its out-references: the same for every model attacked.
    r_f = rmia(t_f, per_ref_f, t_n, per_ref_n, out_prior=prior_f, population_prior=prior_n)
    r_n = rmia(t_n, per_ref_n, t_n, per_ref_n, out_prior=prior_n, population_prior=prior_n)
    nf = len(t_f)
    stats = {
        "lira_offline": (z[:nf], z[nf:]),
        "lira_online": (on[:nf], on[nf:]),
        "rmia": (r_f, r_n),
    }
    results = {name: attack(f, n).to_dict() for name, (f, n) in stats.items()}
    flat = {f"{name}_{side}": v[i] for name, v in stats.items() for i, side in enumerate("fn")}
    return results, flat


def _per_example(
    after: dict[str, np.ndarray], before: dict[str, np.ndarray], seed: int
) -> dict[str, Any]:
    """A paired sample of per-example statistics (the same rows before and after) for the
    dashboard: up to SAMPLE_SCORES forget rows and non-members."""
    out: dict[str, Any] = {}
    for side, label in (("f", "forgotten"), ("n", "nonmembers")):
        n = len(after[f"lira_offline_{side}"])
        idx = np.arange(n)
        if n > SAMPLE_SCORES:
            idx = np.sort(np.random.default_rng(seed).choice(n, SAMPLE_SCORES, replace=False))
        block: dict[str, list[float | None]] = {}
        for name in ("lira_offline", "rmia"):
            for when, src in (("before", before), ("after", after)):
                v = np.asarray(src[f"{name}_{side}"], dtype=np.float64)[idx]
                block[f"{name}_{when}"] = [
                    round(float(x), 3) if np.isfinite(x) else None for x in v
                ]
        out[label] = block
    return out


def forgetting(
    candidate: Predictor,
    baseline: Predictor,
    refs: SisaEnsemble | None,
    forget: TabularData,
    test: TabularData,
    *,
    margin: float,
    exact: bool,
    seed: int = 0,
    retained: TabularData | None = None,
) -> Check:
    """Attack the candidate on the forget set against test non-members, and compare with
    the out-references, after measuring the attack's power on the baseline.

    Power before verdict, with a band (`verdict`): each gating attack (the population
    attack against the references' AUC, offline LiRA with four or more references per
    row, RMIA against 0.5) is run with the baseline (which still holds the forget set)
    in the candidate's place and with the candidate, and measured against two bars in
    null standard errors of its AUC counted in people: EVIDENCE_SE (2) and POWER_SE (3),
    each never below `margin`. The candidate fails when an attack beats the evidence bar
    on the baseline and still beats it on the candidate; it passes when none does and
    some attack beats the power bar on the baseline; otherwise the check is
    `inconclusive` (the decision then rests on the lineage proof for exact methods, or
    falls back to exact retraining for approximate ones,
    `app.verification.service.decide`). A no-op thus fails whenever the baseline shows
    membership at 2 SE, instead of flipping with the seed around a single threshold.

    Without out-references (or when every reference trained on the forget rows) the
    attack cannot be calibrated: `inconclusive` too.

    The report keeps the population attack (candidate, references, baseline), the
    per-example attacks (offline and online LiRA, RMIA: AUC and TPR at 1% and 0.1% FPR)
    on the candidate and on the baseline, a paired sample of per-example statistics, and
    a sample of the member scores of each population (`score_samples`)."""
    attacked = attack_rows(len(test), forget, seed)  # drawn before the forget rows are capped
    test = test if attacked is None else test.take(attacked)
    forget = _cap(forget, seed)
    threshold = {
        "margin": margin,
        "rule": "candidate AUC <= reference AUC + margin",
        "power_rule": POWER_RULE,
    }
    if len(forget) == 0 or len(test) == 0:
        return Check.inconclusive(
            {"note": "no forget or test rows"},
            threshold,
            reason="no forget rows or no non-member (test) rows to attack",
        )
    cand_f = member_scores(candidate.predict_proba(forget.columns), forget.labels)
    cand_n = member_scores(candidate.predict_proba(test.columns), test.labels)
    base_f = member_scores(baseline.predict_proba(forget.columns), forget.labels)
    base_n = member_scores(baseline.predict_proba(test.columns), test.labels)
    before = attack(base_f, base_n)
    populations = {"forgotten": cand_f, "forgotten_before": base_f, "nonmembers": cand_n}
    if retained is not None and len(retained):
        # Only a sample is reported, so only a sample is scored.
        if len(retained) > SAMPLE_SCORES:
            rng = np.random.default_rng(seed + 2)
            retained = retained.take(np.sort(rng.choice(len(retained), SAMPLE_SCORES, False)))
        populations["retained"] = member_scores(
            candidate.predict_proba(retained.columns), retained.labels
        )
    metrics: dict[str, Any] = {
        "forget_rows": len(forget),
        "nonmember_rows": len(test),
        # Independent units (people) behind the rows: the attack's resolution.
        "forget_subjects": _units(forget),
        "nonmember_subjects": _units(test),
        "score_samples": score_samples(populations, seed),
    }
    if refs is None or len(refs.shards) < 2:
        # No model that provably never saw these rows: the attack is reported but the
        # check cannot calibrate it; exact methods still have the lineage proof.
        cand = attack(cand_f, cand_n)
        metrics |= {
            "candidate": cand.to_dict(),
            "baseline": before.to_dict(),
            "note": "no out-reference models available",
            "power": {"has_power": None, "rule": POWER_RULE},
        }
        return Check.inconclusive(
            metrics,
            threshold,
            reason="no out-reference models: the attack cannot be calibrated",
        )
    out_f, out_n = _out_masks(refs, forget), _out_masks(refs, test)
    usable = out_f.any(axis=0)  # rows every reference trained on cannot be calibrated
    if not usable.any():
        cand = attack(cand_f, cand_n)
        metrics |= {
            "candidate": cand.to_dict(),
            "baseline": before.to_dict(),
            "note": "every reference trained on the forget rows",
            "power": {"has_power": None, "rule": POWER_RULE},
        }
        return Check.inconclusive(
            metrics,
            threshold,
            reason="every reference model trained on the forget rows: none can calibrate",
        )
    usable = np.asarray(usable, dtype=bool)
    if not usable.all():  # (a new row set: the references' outputs on it are new too)
        forget, cand_f, base_f, out_f = (
            forget.take(usable),
            cand_f[usable],
            base_f[usable],
            out_f[:, usable],
        )
    k_use = references_per_row(out_f, out_n)
    stacked_f, stacked_n = _ref_probas(refs, forget), _ref_probas(refs, test)
    all_f, all_n = _all_scores(stacked_f, forget.labels), _all_scores(stacked_n, test.labels)
    ref_f, per_ref_f = _out_reference(stacked_f, forget, out_f, k_use, all_f)
    ref_n, per_ref_n = _out_reference(stacked_n, test, out_n, k_use, all_n)
    kw: dict[str, Any] = {
        "margin": margin,
        "out_refs_forget": per_ref_f,
        "out_refs_nonmember": per_ref_n,
        "forget_units": _units(forget),
        "nonmember_units": _units(test),
    }
    result = forgetting_check(cand_f, cand_n, ref_f, ref_n, **kw)
    power = forgetting_check(base_f, base_n, ref_f, ref_n, **kw)
    metrics |= result.to_dict()
    metrics.pop("passed", None)
    # The forgotten records as models that never saw them score them.
    metrics["score_samples"] |= score_samples({"forgotten_reference": ref_f}, seed + 3)
    metrics["baseline"] = before.to_dict()
    metrics["references"] = len(refs.shards)
    priors = (rmia_prior(per_ref_f), rmia_prior(per_ref_n))
    suite_after, flat_after = _attack_suite(
        cand_f, cand_n, per_ref_f, per_ref_n, all_f, all_n, ~out_f, ~out_n, *priors
    )
    suite_before, flat_before = _attack_suite(
        base_f, base_n, per_ref_f, per_ref_n, all_f, all_n, ~out_f, ~out_n, *priors
    )
    metrics["attacks"] = {"candidate": suite_after, "baseline": suite_before}
    metrics["per_example"] = _per_example(flat_after, flat_before, seed + 4)
    # Each gating attack: its power on the baseline, then its verdict on the candidate,
    # against two bars in units of the AUC's null standard error (counted in people):
    # EVIDENCE_SE (the candidate still shows the forget set; the baseline shows some
    # membership) and POWER_SE (the baseline clearly shows it: a pass can mean something).
    # A model that never saw the rows gives a per-example AUC of 0.5 (each row against
    # its own out-references); the population attack's null is the references' AUC.
    n_units_f = min(len(forget), _units(forget) or len(forget))
    n_units_n = min(len(test), _units(test) or len(test))
    se0 = auc_null_se(n_units_f, n_units_n)
    bars = (max(margin, EVIDENCE_SE * se0), max(margin, POWER_SE * se0))
    gates: dict[str, dict[str, Any]] = {
        "population": _gate(power.candidate.auc, result.candidate.auc, result.reference.auc, *bars),
        "rmia": _gate(suite_before["rmia"]["auc"], suite_after["rmia"]["auc"], 0.5, *bars),
    }
    if power.lira_auc is not None and result.lira_auc is not None:
        gates["lira_offline"] = _gate(power.lira_auc, result.lira_auc, 0.5, *bars)
    status, failing, with_power = verdict(gates)
    has_power = bool(with_power)
    metrics["power"] = {
        "has_power": has_power,
        "rule": POWER_RULE,
        "attacks": gates,
        "null_se": _num(se0),
        "evidence_se": EVIDENCE_SE,
        "power_se": POWER_SE,
        "baseline_auc": _num(power.candidate.auc),
        "reference_auc": _num(power.reference.auc),
        "allowed_margin": _num(bars[1]),
        "baseline_lira_auc": _num(power.lira_auc),
        "lira_threshold": _num(0.5 + bars[1]) if power.lira_auc is not None else None,
        "baseline_rmia_auc": _num(suite_before["rmia"]["auc"]),
        "references_per_row": k_use,
    }
    if status == "fail":
        return Check(
            False,
            metrics,
            threshold,
            reason=(
                "the candidate still treats the forget set as members "
                f"({', '.join(failing)}: beyond {EVIDENCE_SE:g} null standard errors on the "
                "baseline and still on the candidate)"
            ),
        )
    if status == "inconclusive":
        said = "; ".join(
            f"{name} {g['baseline']:.3f} <= {g['threshold']:.3f}"
            for name, g in gates.items()
            if g["baseline"] is not None and g["threshold"] is not None
        )
        return Check.inconclusive(
            metrics,
            threshold,
            reason=(
                "the attack has no power: on the baseline, which still holds the forget "
                f"set, no attack beats its power bar of {POWER_SE:g} null standard errors "
                f"({said}); a pass would prove nothing"
            ),
        )
    return Check(
        True,
        metrics,
        threshold,
        reason=(
            f"the attacks with power on the baseline ({', '.join(with_power)}) no longer find "
            "the forget set in the candidate"
        ),
    )


def verdict(gates: dict[str, dict[str, Any]]) -> tuple[str, list[str], list[str]]:
    """The check's status from its gating attacks (`_gate`), with the attacks that fail
    it and those with power. Fail: an attack that finds the forget set in the baseline
    (beyond the evidence bar) still finds it in the candidate; a no-op is such a
    candidate whenever the baseline shows membership at all, so its verdict does not
    hang on the power bar. Pass: no such attack, and at least one has power (beyond the
    power bar on the baseline). Inconclusive: neither."""
    failing = [n for n, g in gates.items() if g["evidence"] and not g["passed"]]
    with_power = [n for n, g in gates.items() if g["has_power"]]
    if failing:
        return "fail", failing, with_power
    return ("pass" if with_power else "inconclusive"), failing, with_power


def _gate(
    baseline: float | None,
    candidate: float | None,
    null: float | None,
    evidence_bar: float,
    power_bar: float,
) -> dict[str, Any]:
    """One attack: its power on the baseline (it beats the null by the power bar), the
    evidence it finds there (beyond the lower evidence bar), and whether the candidate
    stays within the evidence bar (`passed`)."""
    b, c, z = _num(baseline), _num(candidate), _num(null)
    if z is None:
        return {
            "baseline": b,
            "candidate": c,
            "threshold": None,
            "evidence_threshold": None,
            "has_power": False,
            "evidence": False,
            "passed": True,
        }
    return {
        "baseline": b,
        "candidate": c,
        "threshold": _num(z + power_bar),
        "evidence_threshold": _num(z + evidence_bar),
        "has_power": b is not None and b > z + power_bar,
        "evidence": b is not None and b > z + evidence_bar,
        "passed": c is None or c <= z + evidence_bar,
    }


def _num(v: float | None) -> float | None:
    return None if v is None or not np.isfinite(v) else float(v)
