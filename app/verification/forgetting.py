"""The forgetting check: a membership-inference attack on the forget set, calibrated by
reference models that never saw it.

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
from app.ml.device import derive_seed
from app.ml.sisa import SisaEnsemble
from app.ml.verify.membership import attack, forgetting_check, member_scores
from app.registry.artifacts import Predictor
from app.verification.service import Check

MAX_ROWS = 5000  # enough for a stable AUC; bounds the cost of verification
# Scores kept per population in the report, for the dashboard's distribution chart:
# enough to draw a histogram, small enough to keep the report JSON compact.
SAMPLE_SCORES = 200


def _units(data: TabularData) -> int | None:
    """Distinct subjects behind the rows (None when the rows carry no subject keys)."""
    subjects = np.asarray(data.subjects, dtype=object)
    keys = subjects[subjects.astype(bool)] if len(subjects) else subjects
    return len(set(keys.tolist())) if len(keys) else None


def cap_index(n: int, seed: int) -> np.ndarray | None:
    """The rows the attack uses of `n` (a seeded sample of MAX_ROWS; None: all)."""
    if n <= MAX_ROWS:
        return None
    rng = np.random.default_rng(seed)
    return np.sort(rng.choice(n, MAX_ROWS, replace=False))


def _cap(data: TabularData, seed: int) -> TabularData:
    index = cap_index(len(data), seed)
    return data if index is None else data.take(index)


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


_OUT_SALT = np.uint64(derive_seed("out-reference") % 2**63)


def _pick(out: np.ndarray, record_ids: np.ndarray, k_use: int) -> np.ndarray:
    """(k_use, N): for each row, `k_use` of the references that did not train on it, the
    ones with the smallest hash of (record id, reference): a fixed pseudo-random choice
    per record, made for all rows at once."""
    k = out.shape[0]
    with np.errstate(over="ignore"):
        z = np.asarray(record_ids, dtype=np.uint64)[None, :] * np.uint64(k + 1)
        z = z + np.arange(k, dtype=np.uint64)[:, None] + _OUT_SALT
        # splitmix64's finaliser: every bit of the input moves every bit of the output.
        z = (z ^ (z >> np.uint64(30))) * np.uint64(0xBF58476D1CE4E5B9)
        z = (z ^ (z >> np.uint64(27))) * np.uint64(0x94D049BB133111EB)
        z = z ^ (z >> np.uint64(31))
    z = np.where(out, z, np.uint64(np.iinfo(np.uint64).max))
    return np.argsort(z, axis=0, kind="stable")[:k_use].astype(np.int64)


def _out_reference(
    refs: SisaEnsemble, data: TabularData, out: np.ndarray, k_use: int
) -> tuple[np.ndarray, np.ndarray]:
    """Scores of each row under `k_use` of the references that did not train on it (the
    same number for every row, picked by a hash of the record id so both sides of the
    attack average alike): the score of their mean probability (N,), and the
    per-reference scores (k_use, N) for the likelihood-ratio test."""
    shards = refs.shards
    probas = refs.shard_probas(data.columns)
    stacked = np.stack([probas[s].numpy() for s in shards])  # (K, N, C)
    n = len(data)
    chosen = _pick(out, data.record_ids, k_use)
    cols = np.arange(n)
    picked = stacked[chosen, cols[None, :]]  # (k_use, N, C)
    per_ref = np.stack([member_scores(picked[j], data.labels) for j in range(k_use)])
    return member_scores(picked.mean(axis=0), data.labels), per_ref


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
    the out-references. Also reports the attack on the baseline (before unlearning), and
    a sample of the member scores of each population (`score_samples`: the forgotten
    records before and after, the non-members, and the retained members when `retained`
    rows are given).

    Without out-references the attack cannot be calibrated: an exact method still passes
    (its lineage check is the proof), an approximate one does not (forgetting is then
    unshown, and the decision falls back to exact retraining)."""
    forget = _cap(forget, seed)
    test = _cap(test, seed + 1)
    threshold = {"margin": margin, "rule": "candidate AUC <= reference AUC + margin"}
    if len(forget) == 0 or len(test) == 0:
        return Check(True, {"note": "no forget or test rows"}, threshold)
    cand_f = member_scores(candidate.predict_proba(forget.columns), forget.labels)
    cand_n = member_scores(candidate.predict_proba(test.columns), test.labels)
    base_f = member_scores(baseline.predict_proba(forget.columns), forget.labels)
    before = attack(base_f, cand_n)
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
        }
        return Check(exact, metrics, threshold)
    out_f, out_n = _out_masks(refs, forget), _out_masks(refs, test)
    usable = out_f.any(axis=0)  # rows every reference trained on cannot be calibrated
    if not usable.any():
        cand = attack(cand_f, cand_n)
        metrics |= {
            "candidate": cand.to_dict(),
            "baseline": before.to_dict(),
            "note": "every reference trained on the forget rows",
        }
        return Check(exact, metrics, threshold)
    usable = np.asarray(usable, dtype=bool)
    if not usable.all():  # (a new row set: the references' outputs on it are new too)
        forget, cand_f, out_f = forget.take(usable), cand_f[usable], out_f[:, usable]
    k_use = int(min(out_f.sum(axis=0).min(), out_n.sum(axis=0).min()))
    ref_f, per_ref_f = _out_reference(refs, forget, out_f, k_use)
    ref_n, per_ref_n = _out_reference(refs, test, out_n, k_use)
    result = forgetting_check(
        cand_f,
        cand_n,
        ref_f,
        ref_n,
        margin=margin,
        out_refs_forget=per_ref_f,
        out_refs_nonmember=per_ref_n,
        forget_units=_units(forget),
        nonmember_units=_units(test),
    )
    metrics |= result.to_dict()
    # The forgotten records as models that never saw them score them.
    metrics["score_samples"] |= score_samples({"forgotten_reference": ref_f}, seed + 3)
    metrics["baseline"] = before.to_dict()
    metrics["references"] = len(refs.shards)
    return Check(result.passed, metrics, threshold)
