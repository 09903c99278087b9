"""Power before verdict: the forgetting check on real SISA ensembles.

An overfit SISA model (noisy labels, wide shards trained long) memorises its records, so
the attack finds a forget set in the baseline; exact SISA unlearning then passes and a
no-op "unlearning" (the baseline served again) fails. A model that memorises nothing (a
few epochs of logistic regression) gives the attack no power: the check is
`inconclusive`, never `pass`.
"""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch

from app.ml.checkpoints import FsspecCheckpointStore
from app.ml.config import ArchitectureConfig, FeatureSpec, SisaConfig, TrainingConfig
from app.ml.data import TabularData
from app.ml.sharding import assign_shards, assign_slices
from app.ml.sisa import SisaEnsemble, SisaManifest, train_sisa, unlearn_sisa
from app.verification.forgetting import (
    EVIDENCE_SE,
    MAX_ROWS,
    MIN_NONMEMBERS,
    NONMEMBERS_PER_UNIT,
    POWER_SE,
    _gate,
    attack_rows,
    forgetting,
    nonmember_count,
    verdict,
)

CPU = torch.device("cpu")
D = 8
SPEC = FeatureSpec(numeric=tuple(f"x{i}" for i in range(D)), categorical=())
SISA = SisaConfig(shards=6, slices=1, sharding="subject")
OVERFIT = (
    ArchitectureConfig(kind="mlp", hidden=(256,)),
    TrainingConfig(epochs=150, batch_size=16, lr=0.01, weight_decay=0.0, seed=3),
)
SMOOTH = (
    ArchitectureConfig(kind="logreg"),
    TrainingConfig(epochs=2, batch_size=64, lr=0.01, weight_decay=1e-3, seed=3),
)


@pytest.fixture(autouse=True)
def one_thread() -> Iterator[None]:
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def make(n: int, seed: int, offset: int) -> TabularData:
    """A noisy linear task (25% of labels flipped: fitting them means memorising); one
    record per subject."""
    rng = np.random.default_rng(seed)
    x = rng.normal(size=(n, D))
    y = (x @ np.linspace(-1, 1, D) > 0).astype(np.int64)
    y = np.where(rng.random(n) < 0.25, 1 - y, y)
    ids = np.arange(offset, offset + n, dtype=np.int64)
    return TabularData(
        record_ids=ids,
        columns={f"x{i}": x[:, i] for i in range(D)},
        labels=y,
        subjects=np.array([f"s{i}" for i in ids], dtype=object),
        sources=np.array(["src"] * n, dtype=object),
    )


def _train(
    data: TabularData, store: FsspecCheckpointStore, arch: ArchitectureConfig, tr: TrainingConfig
) -> tuple[SisaManifest, np.ndarray, np.ndarray]:
    shard_of = assign_shards(data, SISA, seed=1)
    slice_of = assign_slices(data.record_ids, SISA.slices, seed=1)
    manifest = train_sisa(
        data,
        shard_of,
        slice_of,
        feature_spec=SPEC,
        arch=arch,
        training=tr,
        sisa=SISA,
        n_classes=2,
        model_key=f"power-{arch.kind}",
        store=store,
        device=CPU,
    )
    return manifest, shard_of, slice_of


@pytest.fixture(scope="module")
def world(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    store = FsspecCheckpointStore.local(str(Path(tmp_path_factory.mktemp("power"))))
    train, test = make(900, 0, 0), make(400, 1, 10_000)
    out: dict[str, Any] = {"test": test}
    for name, (arch, tr) in (("overfit", OVERFIT), ("smooth", SMOOTH)):
        manifest, shard_of, slice_of = _train(train, store, arch, tr)
        # The forget set: 60 records of two shards (a batch of single-record requests).
        in_two = np.flatnonzero(np.isin(shard_of, [0, 1]))
        forget_idx = np.random.default_rng(2).choice(in_two, 150, replace=False)
        forget = train.take(np.sort(forget_idx))
        unlearned, _ = unlearn_sisa(
            manifest, train, shard_of, slice_of, forget.record_ids, store=store, device=CPU
        )
        out[name] = {
            "baseline": SisaEnsemble.load(manifest, store, CPU),
            "exact": SisaEnsemble.load(unlearned, store, CPU),
            "forget": forget,
        }
    return out


def _check(world: dict[str, Any], name: str, candidate: str, exact: bool) -> Any:
    w = world[name]
    return forgetting(
        w[candidate],
        w["baseline"],
        w["baseline"],  # a SISA model's own shards are its references
        w["forget"],
        world["test"],
        margin=0.05,
        exact=exact,
        seed=0,
    )


def test_exact_sisa_unlearning_passes_with_power(world: dict[str, Any]) -> None:
    c = _check(world, "overfit", "exact", exact=True)
    assert c.metrics["power"]["has_power"] is True, c.metrics["power"]
    assert c.status == "pass" and c.passed, c.reason
    # The per-example attacks are reported before and after, with the low-FPR points.
    for who in ("candidate", "baseline"):
        for attack_name in ("lira_offline", "lira_online", "rmia"):
            r = c.metrics["attacks"][who][attack_name]
            assert {"auc", "tpr_at_1pct_fpr", "tpr_at_0.1pct_fpr"} <= set(r)
    assert c.metrics["attacks"]["baseline"]["rmia"]["auc"] > 0.6
    assert len(c.metrics["per_example"]["forgotten"]["lira_offline_after"]) == 150


def test_a_no_op_method_fails_the_check(world: dict[str, Any]) -> None:
    c = _check(world, "overfit", "baseline", exact=False)
    assert c.metrics["power"]["has_power"] is True
    assert c.status == "fail" and not c.passed
    assert "members" in c.reason


def test_an_attack_with_no_power_is_inconclusive_not_pass(world: dict[str, Any]) -> None:
    for candidate in ("exact", "baseline"):
        c = _check(world, "smooth", candidate, exact=candidate == "exact")
        assert c.metrics["power"]["has_power"] is False, c.metrics["power"]
        assert c.status == "inconclusive" and not c.passed
        assert "no power" in c.reason


def test_a_no_op_fails_wherever_the_baseline_shows_membership_and_no_power_is_inconclusive() -> (
    None
):
    """The verdict's band, on the numbers alone (no models): with a null standard error
    of 0.05 the evidence bar is 0.5 + 0.10 and the power bar 0.5 + 0.15."""
    se = 0.05
    bars = (max(0.05, EVIDENCE_SE * se), max(0.05, POWER_SE * se))

    def check(baseline: float, candidate: float) -> str:
        return verdict({"rmia": _gate(baseline, candidate, 0.5, *bars)})[0]

    # A no-op (candidate == baseline) with clear power fails, and so does one whose
    # baseline sits inside the band (some evidence, short of the power bar): its verdict
    # no longer hangs on which side of the power bar a seed lands.
    assert check(0.70, 0.70) == "fail"
    assert check(0.62, 0.62) == "fail"
    # A set the attack cannot see even in the baseline: inconclusive, never pass.
    assert check(0.55, 0.55) == "inconclusive"
    assert check(0.55, 0.50) == "inconclusive"
    # Real forgetting with power passes; forgetting to inside the band, with only
    # marginal power, proves nothing; a candidate still beyond the evidence bar fails.
    assert check(0.70, 0.52) == "pass"
    assert check(0.62, 0.52) == "inconclusive"
    assert check(0.70, 0.61) == "fail"


def _people(n_rows: int, n_people: int, offset: int = 50_000) -> TabularData:
    data = make(n_rows, 5, offset)
    data.subjects = np.array([f"p{i % n_people}" for i in range(n_rows)], dtype=object)
    return data


def test_non_members_follow_the_forget_sets_people() -> None:
    """The attack takes 20 non-members per person forgotten, at least 1,000 (a TPR at
    0.1% FPR needs them), at most 5,000; rows without subject keys count as people."""
    assert nonmember_count(_people(3, 1)) == MIN_NONMEMBERS == 1000
    assert nonmember_count(_people(240, 120)) == 120 * NONMEMBERS_PER_UNIT == 2400
    assert nonmember_count(_people(900, 900)) == MAX_ROWS
    no_keys = make(70, 6, 60_000)
    no_keys.subjects = np.array([""] * 70, dtype=object)
    assert nonmember_count(no_keys) == 1400
    # The test rows the pipeline prepares outputs for are the ones the check draws.
    idx = attack_rows(3000, _people(3, 1), seed=7)
    assert idx is not None and len(idx) == 1000 and np.all(np.diff(idx) > 0)
    assert attack_rows(800, _people(3, 1), seed=7) is None  # fewer: all of them


def test_a_one_person_request_is_judged_against_a_thousand_test_rows(
    world: dict[str, Any],
) -> None:
    w = world["overfit"]
    forget = w["forget"].take(np.arange(2))  # two records of two people
    test = make(2500, 9, 20_000)
    c = forgetting(
        w["baseline"], w["baseline"], w["baseline"], forget, test, margin=0.05, exact=False
    )
    assert c.metrics["nonmember_rows"] == 1000 and c.metrics["forget_rows"] == 2
    # Two people cannot give the attack power, whatever it finds.
    assert c.status == "inconclusive" and c.metrics["power"]["has_power"] is False
