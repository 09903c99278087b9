"""Benchmark B6: is the forgetting check calibrated on held-out truth?

Run with `python -m bench.b6_verification` (`--quick` for a smoke run, `--erasures 200`
for the issue's full count of single-subject erasures). The check under test is the
service's own (`app.verification.forgetting.forgetting`: power on the baseline first,
then population AUC, offline LiRA and RMIA against out-references).

* Data: seeded synthetic tabular task, 12 numeric features, labels from a noisy linear
  rule (20% flipped, so fitting them means memorising), 1-4 records per subject; 2,400
  training rows and 600 test rows (non-members).
* (a) False alarms: a SISA MLP (6 shards, 1 slice, hidden 128, 60 epochs) and N
  single-subject exact SISA erasures (default 40 on 2 cores; the issue asks for 200:
  `--erasures 200`). Exact unlearning cannot remember, so every `fail` is a false alarm;
  `inconclusive` (no power on the baseline: one subject is a few rows) is counted apart,
  since the decision then rests on the lineage proof.
* (b) Detection: a monolithic MLP of the same shape with K = 6 half-data reference
  models; 20 requests of 40 random training records each, through (1) a no-op
  "unlearning" (the model served as it was) and (2) a deliberately under-trained
  approximate method (NegGrad+ for one step at a tenth of its learning rate). Detected =
  the check does not pass (`fail`, or `inconclusive`, which sends an approximate method
  to exact retraining). Target: no-op detected >= 95%; false alarms <= 5%.
* (c) The NeurIPS-2023 machine-unlearning challenge's estimate: for each forget example,
  the outputs (logit confidence) of M models unlearned by a strategy (different seeds)
  against M models retrained from scratch without the forget set; per example, epsilon
  is the largest log ratio over thresholds of (1 - delta - FPR) / FNR and
  (1 - delta - FNR) / FPR (delta = 0.01, clipped rates), and the score is the mean of
  2^(-epsilon / epsilon_max) over examples (1: indistinguishable from retraining). M is
  stated in the output (default 6 each side on 2 cores).
* (a') The same check on exact erasures it can see: 20 batches of 40 records of one
  shard each; every `fail` is a false alarm here too.
* Verdict flip rate: the same requests (10 of (a), 10 of (b)'s no-op and under-trained;
  5 with --quick)
  verified under 5 training seeds of the model; per check, the share of requests whose
  verdict is not the same under every seed; and the decision flip rate, the share whose
  decision (promote or not: exact methods promote on pass or inconclusive, approximate
  ones only on pass) is not the same.
"""

from __future__ import annotations

import argparse
import copy
import json
import math
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import torch

from app.ml.approximate import run_strategy
from app.ml.checkpoints import FsspecCheckpointStore
from app.ml.config import ArchitectureConfig, FeatureSpec, SisaConfig, TrainingConfig
from app.ml.data import TabularData
from app.ml.metrics import accuracy
from app.ml.preprocess import PreprocessorState
from app.ml.sharding import assign_shards, assign_slices
from app.ml.sisa import (
    ShardEntry,
    SisaEnsemble,
    SisaManifest,
    train_shard,
    train_sisa,
    unlearn_sisa,
)
from app.ml.verify.membership import member_scores
from app.verification.forgetting import forgetting

SEED = 2026
THREADS = 1
D = 12
CPU = torch.device("cpu")
SPEC = FeatureSpec(numeric=tuple(f"x{i}" for i in range(D)), categorical=())
ARCH = ArchitectureConfig(kind="mlp", hidden=(128,))
RESULTS = Path(__file__).resolve().parent / "results" / "b6.json"
TARGET_FALSE_ALARMS = 0.05
TARGET_DETECTION = 0.95


def training(seed: int, epochs: int) -> TrainingConfig:
    return TrainingConfig(epochs=epochs, batch_size=32, lr=0.01, weight_decay=0.0, seed=seed)


def make_data(n_subjects: int, seed: int, offset: int) -> TabularData:
    rng = np.random.default_rng(seed)
    per = rng.integers(1, 5, size=n_subjects)
    subjects = np.repeat([f"s{offset + i}" for i in range(n_subjects)], per).astype(object)
    n = len(subjects)
    x = rng.normal(size=(n, D))
    y = (x @ np.linspace(-1, 1, D) > 0).astype(np.int64)
    y = np.where(rng.random(n) < 0.2, 1 - y, y)
    return TabularData(
        record_ids=np.arange(offset, offset + n, dtype=np.int64),
        columns={f"x{i}": x[:, i] for i in range(D)},
        labels=y,
        subjects=subjects,
        sources=np.array(["src"] * n, dtype=object),
    )


def _check(
    cand: Any,
    base: Any,
    refs: SisaEnsemble | None,
    forget: TabularData,
    test: TabularData,
    exact: bool,
) -> str:
    c = forgetting(cand, base, refs, forget, test, margin=0.05, exact=exact, seed=0)
    return c.status


# -- (a) exact SISA erasures ----------------------------------------------------------


def sisa_world(
    train: TabularData, store: FsspecCheckpointStore, seed: int, epochs: int
) -> tuple[SisaManifest, np.ndarray, np.ndarray]:
    sisa = SisaConfig(shards=6, slices=1, sharding="subject")
    shard_of = assign_shards(train, sisa, seed=seed)
    slice_of = assign_slices(train.record_ids, 1, seed=seed)
    manifest = train_sisa(
        train,
        shard_of,
        slice_of,
        feature_spec=SPEC,
        arch=ARCH,
        training=training(seed, epochs),
        sisa=sisa,
        n_classes=2,
        model_key=f"b6-sisa-{seed}",
        store=store,
        device=CPU,
    )
    return manifest, shard_of, slice_of


def erase_rows(
    manifest: SisaManifest,
    train: TabularData,
    shard_of: np.ndarray,
    slice_of: np.ndarray,
    rows: np.ndarray,
    store: FsspecCheckpointStore,
    test: TabularData,
) -> str:
    forget = train.take(np.sort(rows))
    unlearned, _ = unlearn_sisa(
        manifest, train, shard_of, slice_of, forget.record_ids, store=store, device=CPU
    )
    base = SisaEnsemble.load(manifest, store, CPU)
    cand = SisaEnsemble.load(unlearned, store, CPU)
    return _check(cand, base, base, forget, test, exact=True)


def erase_subject(
    manifest: SisaManifest,
    train: TabularData,
    shard_of: np.ndarray,
    slice_of: np.ndarray,
    subject: str,
    store: FsspecCheckpointStore,
    test: TabularData,
) -> str:
    rows = np.flatnonzero(train.subjects == subject)
    forget = train.take(rows)
    unlearned, _ = unlearn_sisa(
        manifest, train, shard_of, slice_of, forget.record_ids, store=store, device=CPU
    )
    base = SisaEnsemble.load(manifest, store, CPU)
    cand = SisaEnsemble.load(unlearned, store, CPU)
    return _check(cand, base, base, forget, test, exact=True)


# -- (b) monolithic model, references, approximate methods ------------------------------


def mono_world(
    train: TabularData, store: FsspecCheckpointStore, seed: int, epochs: int, k: int
) -> tuple[SisaEnsemble, SisaEnsemble | None]:
    """The model (one shard trained on everything) and K half-data references."""
    tr = training(seed, epochs)

    def one(data: TabularData, j: int, key: str, shards: int) -> ShardEntry:
        res = train_shard(
            data,
            np.zeros(len(data), dtype=np.int64),
            shard=j,
            feature_spec=SPEC,
            arch=ARCH,
            training=tr,
            sisa=SisaConfig(shards=shards, slices=1, sharding="random"),
            n_classes=2,
            model_key=key,
            store=store,
            device=CPU,
        )
        return ShardEntry.from_result(res)

    def manifest(entries: list[ShardEntry], key: str, shards: int) -> SisaManifest:
        return SisaManifest(
            model_key=key,
            arch=ARCH,
            training=tr,
            sisa=SisaConfig(shards=shards, slices=1, sharding="random"),
            feature_spec=SPEC,
            n_classes=2,
            entries=entries,
            runtime={},
        )

    model = SisaEnsemble.load(
        manifest([one(train, 0, f"b6-mono-{seed}", 1)], f"b6-mono-{seed}", 1), store, CPU
    )
    if k == 0:
        return model, None
    rng = np.random.default_rng(seed + 1)
    halves = [train.take(np.flatnonzero(rng.random(len(train)) < 0.5)) for _ in range(k)]
    refs = SisaEnsemble.load(
        manifest(
            [one(h, j, f"b6-ref-{seed}", k) for j, h in enumerate(halves)], f"b6-ref-{seed}", k
        ),
        store,
        CPU,
    )
    return model, refs


def _xy(prep: PreprocessorState, data: TabularData) -> tuple[torch.Tensor, torch.Tensor]:
    return prep.transform(data.columns), torch.from_numpy(np.asarray(data.labels))


def approximate(
    model: SisaEnsemble,
    retained: TabularData,
    forget: TabularData,
    seed: int,
    strategy: str,
    params: dict[str, Any],
) -> SisaEnsemble:
    prep = model.preprocessors[0]
    net = copy.deepcopy(model.models[0])
    run_strategy(strategy, net, _xy(prep, forget), _xy(prep, retained), params=params, seed=seed)
    net.eval()
    return SisaEnsemble(model.manifest, {0: net}, {0: prep}, CPU)


UNDERTRAINED = ("neggrad_plus", {"epochs": 1, "lr": 1e-4})


# -- (c) the challenge's epsilon --------------------------------------------------------


def per_example_epsilon(
    unlearned: np.ndarray, retrained: np.ndarray, delta: float = 0.01
) -> np.ndarray:
    """(M, N) scores of each side -> epsilon per example (threshold attacks both ways)."""
    m = unlearned.shape[0]
    eps = np.zeros(unlearned.shape[1])
    clip = 1.0 / (2 * m)
    for i in range(unlearned.shape[1]):
        u, r = unlearned[:, i], retrained[:, i]
        best = 0.0
        for t in np.unique(np.concatenate([u, r])):
            fpr = min(max(float(np.mean(r >= t)), clip), 1 - clip)
            fnr = min(max(float(np.mean(u < t)), clip), 1 - clip)
            for a, b in ((fpr, fnr), (fnr, fpr)):
                if 1 - delta - a > 0:
                    best = max(best, math.log((1 - delta - a) / b))
        eps[i] = best
    return eps


def challenge_score(eps: np.ndarray, m: int, delta: float = 0.01) -> float:
    eps_max = math.log((1 - delta - 1 / (2 * m)) / (1 / (2 * m)))
    return float(np.mean(2.0 ** (-eps / eps_max)))


def main(
    quick: bool = False, erasures: int | None = None, out: Path | None = None
) -> dict[str, Any]:
    torch.set_num_threads(THREADS)
    t0 = time.perf_counter()
    n_subjects = 500 if quick else 960
    epochs = 25 if quick else 60
    n_erasures = erasures if erasures is not None else (8 if quick else 40)
    n_requests = 5 if quick else 20
    m_models = 3 if quick else 6
    n_seeds = 2 if quick else 5
    k_refs = 6
    train, test = make_data(n_subjects, SEED, 0), make_data(n_subjects // 4, SEED + 1, 100_000)
    store = FsspecCheckpointStore.local(tempfile.mkdtemp(prefix="b6-"))
    rng = np.random.default_rng(SEED)
    subjects = rng.choice(np.unique(train.subjects), n_erasures, replace=False)
    # (a)
    manifest, shard_of, slice_of = sisa_world(train, store, SEED, epochs)
    sisa_acc = accuracy(
        SisaEnsemble.load(manifest, store, CPU).predict_proba(test.columns), test.labels
    )
    a = [erase_subject(manifest, train, shard_of, slice_of, str(s), store, test) for s in subjects]
    # (a') exact erasures the attack can see: 40 records of one shard each (a batch).
    batches = []
    for j in range(n_requests):
        in_shard = np.flatnonzero(shard_of == j % 6)
        batches.append(rng.choice(in_shard, 40, replace=False))
    a_batch = [erase_rows(manifest, train, shard_of, slice_of, b, store, test) for b in batches]
    t_a = time.perf_counter()
    # (b)
    model, refs = mono_world(train, store, SEED, epochs, k_refs)
    mono_acc = accuracy(model.predict_proba(test.columns), test.labels)
    requests = [np.sort(rng.choice(len(train), 40, replace=False)) for _ in range(n_requests)]
    noop, under = [], []
    for j, idx in enumerate(requests):
        forget = train.take(idx)
        retained = train.take(np.setdiff1d(np.arange(len(train)), idx))
        noop.append(_check(model, model, refs, forget, test, exact=False))
        cand = approximate(model, retained, forget, j, *UNDERTRAINED)
        under.append(_check(cand, model, refs, forget, test, exact=False))
    t_b = time.perf_counter()
    # (c): one forget set, M unlearned (NegGrad+ defaults, and the under-trained one)
    # against M retrained models, each with a different seed.
    idx = requests[0]
    forget = train.take(idx)
    retained = train.take(np.setdiff1d(np.arange(len(train)), idx))
    retrained_scores, strat_scores = [], {"neggrad_plus": [], "undertrained": []}
    for s in range(m_models):
        r_model, _ = mono_world(retained, store, SEED + 1000 + s, epochs, 0)
        retrained_scores.append(member_scores(r_model.predict_proba(forget.columns), forget.labels))
        m_s, _ = mono_world(train, store, SEED + 2000 + s, epochs, 0)
        for name, (strategy, params) in (
            ("neggrad_plus", ("neggrad_plus", {})),
            ("undertrained", UNDERTRAINED),
        ):
            u = approximate(m_s, retained, forget, s, strategy, params)
            strat_scores[name].append(member_scores(u.predict_proba(forget.columns), forget.labels))
    r_arr = np.stack(retrained_scores)
    challenge = {}
    for name, scores in strat_scores.items():
        eps = per_example_epsilon(np.stack(scores), r_arr)
        challenge[name] = {
            "mean_epsilon": float(eps.mean()),
            "median_epsilon": float(np.median(eps)),
            "score": challenge_score(eps, m_models),
        }
    t_c = time.perf_counter()
    # Flip rates across training seeds, for the same requests.
    flips: dict[str, list[list[str]]] = {"exact_sisa": [], "no_op": [], "undertrained": []}
    n_flip = 5 if quick else 10
    subj5, req5 = subjects[: min(n_flip, len(subjects))], requests[: min(n_flip, len(requests))]
    per_seed: dict[str, list[list[str]]] = {k: [] for k in flips}
    for s in range(n_seeds):
        seed = SEED + 10 * (s + 1)
        man, so, sl = sisa_world(train, store, seed, epochs)
        per_seed["exact_sisa"].append(
            [erase_subject(man, train, so, sl, str(x), store, test) for x in subj5]
        )
        mod, rf = mono_world(train, store, seed, epochs, k_refs)
        row_n, row_u = [], []
        for j, idx in enumerate(req5):
            f = train.take(idx)
            r = train.take(np.setdiff1d(np.arange(len(train)), idx))
            row_n.append(_check(mod, mod, rf, f, test, exact=False))
            row_u.append(
                _check(approximate(mod, r, f, j, *UNDERTRAINED), mod, rf, f, test, exact=False)
            )
        per_seed["no_op"].append(row_n)
        per_seed["undertrained"].append(row_u)
    flip_rate, decision_flip_rate = {}, {}
    # What each verdict decides: exact methods promote on pass or inconclusive (the
    # lineage proof); approximate ones promote only on pass.
    promotes = {"exact_sisa": {"pass", "inconclusive"}, "no_op": {"pass"}, "undertrained": {"pass"}}
    for k, rows in per_seed.items():
        cols = list(zip(*rows, strict=True))  # per request, its verdicts across seeds
        flip_rate[k] = float(np.mean([len(set(c)) > 1 for c in cols])) if cols else 0.0
        decision_flip_rate[k] = (
            float(np.mean([len({v in promotes[k] for v in c}) > 1 for c in cols])) if cols else 0.0
        )
    t_end = time.perf_counter()

    def rate(xs: list[str], what: set[str]) -> float:
        return float(np.mean([x in what for x in xs])) if xs else float("nan")

    result = {
        "sizes": {
            "train_rows": len(train),
            "test_rows": len(test),
            "erasures": n_erasures,
            "requests": n_requests,
            "models_per_side": m_models,
            "seeds": n_seeds,
            "flip_requests": len(req5),
            "references": k_refs,
            "epochs": epochs,
            "threads": THREADS,
        },
        "accuracy": {"sisa": sisa_acc, "monolithic": mono_acc},
        "a_exact_sisa": {
            "false_alarm_rate": rate(a, {"fail"}),
            "inconclusive_rate": rate(a, {"inconclusive"}),
            "pass_rate": rate(a, {"pass"}),
            "target": TARGET_FALSE_ALARMS,
        },
        "a_exact_sisa_batches": {
            "requests": len(a_batch),
            "false_alarm_rate": rate(a_batch, {"fail"}),
            "inconclusive_rate": rate(a_batch, {"inconclusive"}),
            "pass_rate": rate(a_batch, {"pass"}),
        },
        "b_no_op": {
            "detected": rate(noop, {"fail", "inconclusive"}),
            "failed": rate(noop, {"fail"}),
            "target": TARGET_DETECTION,
        },
        "b_undertrained": {
            "detected": rate(under, {"fail", "inconclusive"}),
            "failed": rate(under, {"fail"}),
        },
        "c_challenge": challenge,
        "verdict_flip_rate": flip_rate,
        "decision_flip_rate": decision_flip_rate,
        "seconds": {"a": t_a - t0, "b": t_b - t_a, "c": t_c - t_b, "flips": t_end - t_c},
    }
    result["targets_met"] = bool(
        result["a_exact_sisa"]["false_alarm_rate"] <= TARGET_FALSE_ALARMS
        and result["a_exact_sisa_batches"]["false_alarm_rate"] <= TARGET_FALSE_ALARMS
        and result["b_no_op"]["detected"] >= TARGET_DETECTION
    )
    print("B6 verification calibration")
    print(
        f"  data: {len(train)} train / {len(test)} test rows; SISA acc {sisa_acc:.3f}, "
        f"monolithic acc {mono_acc:.3f}"
    )
    aa = result["a_exact_sisa"]
    print(
        f"  (a) {n_erasures} exact SISA single-subject erasures: false alarms "
        f"{aa['false_alarm_rate']:.1%} (target <= 5%), inconclusive {aa['inconclusive_rate']:.1%},"
        f" pass {aa['pass_rate']:.1%}"
    )
    ab = result["a_exact_sisa_batches"]
    print(
        f"  (a') {len(a_batch)} exact SISA erasures of 40 records (one shard): false alarms "
        f"{ab['false_alarm_rate']:.1%}, inconclusive {ab['inconclusive_rate']:.1%},"
        f" pass {ab['pass_rate']:.1%}"
    )
    bn, bu = result["b_no_op"], result["b_undertrained"]
    print(
        f"  (b) {n_requests} requests of 40 records: no-op detected {bn['detected']:.1%}"
        f" (target >= 95%; fail {bn['failed']:.1%}), under-trained NegGrad+ detected"
        f" {bu['detected']:.1%} (fail {bu['failed']:.1%})"
    )
    for name, c in challenge.items():
        print(
            f"  (c) {name}: challenge score {c['score']:.3f}, mean eps {c['mean_epsilon']:.2f}"
            f" ({m_models} unlearned vs {m_models} retrained models)"
        )
    print(
        f"  verdict flip rate across {n_seeds} seeds ({len(req5)} requests each): "
        + ", ".join(f"{k} {v:.0%}" for k, v in flip_rate.items())
    )
    print(
        "  decision flip rate (promote or not) across seeds: "
        + ", ".join(f"{k} {v:.0%}" for k, v in decision_flip_rate.items())
    )
    print(f"  targets met: {result['targets_met']}")
    path = out or RESULTS
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(result, indent=2))
    return result


if __name__ == "__main__":
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--quick", action="store_true")
    p.add_argument("--erasures", type=int, default=None, help="(a)'s count; the issue: 200")
    args = p.parse_args()
    main(quick=args.quick, erasures=args.erasures)
