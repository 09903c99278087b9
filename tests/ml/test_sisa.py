"""SISA engine: exact unlearning is bit-identical to training from scratch."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from app.ml.checkpoints import FsspecCheckpointStore
from app.ml.config import ArchitectureConfig, FeatureSpec, SisaConfig, TrainingConfig
from app.ml.data import TabularData
from app.ml.metrics import accuracy
from app.ml.preprocess import fit_preprocessor
from app.ml.sharding import assign_shards, assign_slices
from app.ml.sisa import (
    SisaEnsemble,
    SisaManifest,
    UnlearnStats,
    train_shard,
    train_sisa,
    unlearn_sisa,
)

CPU = torch.device("cpu")
SPEC = FeatureSpec(numeric=("x0", "x1", "x2"), categorical=("colour",))
ARCH = ArchitectureConfig(kind="mlp", hidden=(8,))
TRAIN = TrainingConfig(epochs=3, batch_size=32, lr=0.02, seed=7)
# The same body read as passes per record: stages (1, 0, 1, 1) at R=4, so one stage
# trains no epoch at all (its checkpoint is the stage before's weights).
PER_RECORD = TrainingConfig(epochs=2, batch_size=32, lr=0.02, seed=7, schedule="per_record")
SISA = SisaConfig(shards=3, slices=4, sharding="subject")


def make_data(n_subjects: int = 120, seed: int = 0) -> TabularData:
    """A learnable binary task; 1-4 records per subject; ids deliberately unsorted."""
    rng = np.random.default_rng(seed)
    per = rng.integers(1, 5, size=n_subjects)
    subjects = np.repeat([f"subj-{i}" for i in range(n_subjects)], per).astype(object)
    n = len(subjects)
    x = rng.normal(size=(n, 3))
    colour = rng.choice(np.array(["red", "green", "blue"], dtype=object), size=n)
    logit = 2.0 * x[:, 0] - 1.5 * x[:, 1] + np.where(colour == "red", 1.0, -0.5)
    labels = (logit + 0.3 * rng.normal(size=n) > 0).astype(np.int64)
    ids = rng.permutation(np.arange(1000, 1000 + 3 * n, 3)).astype(np.int64)
    return TabularData(
        record_ids=ids,
        columns={"x0": x[:, 0], "x1": x[:, 1], "x2": x[:, 2], "colour": colour},
        labels=labels,
        subjects=subjects,
        sources=np.array([f"src-{i % 3}" for i in range(n)], dtype=object),
    )


def store_at(path: Path) -> FsspecCheckpointStore:
    return FsspecCheckpointStore.local(str(path))


def train_all(
    data: TabularData, store: FsspecCheckpointStore, training: TrainingConfig = TRAIN
) -> SisaManifest:
    shard_of = assign_shards(data, SISA, seed=1)
    slice_of = assign_slices(data.record_ids, SISA.slices, seed=1)
    return train_sisa(
        data,
        shard_of,
        slice_of,
        feature_spec=SPEC,
        arch=ARCH,
        training=training,
        sisa=SISA,
        n_classes=2,
        model_key="m1",
        store=store,
        device=CPU,
    )


def assert_same_weights(
    a: FsspecCheckpointStore, ka: str, b: FsspecCheckpointStore, kb: str
) -> None:
    ta, _ = a.load(ka)
    tb, _ = b.load(kb)
    assert ta.keys() == tb.keys()
    for k in ta:
        assert torch.equal(ta[k], tb[k]), k
    assert a.read_bytes(ka) == b.read_bytes(kb)


def from_scratch(
    data: TabularData,
    shard: int,
    tmp: Path,
    spec: FeatureSpec = SPEC,
    training: TrainingConfig = TRAIN,
) -> tuple[FsspecCheckpointStore, str, int]:
    """Train one shard on the given retained records in a brand-new store."""
    store = store_at(tmp / f"scratch-{shard}")
    shard_of = assign_shards(data, SISA, seed=1)
    rows = np.flatnonzero(shard_of == shard)
    res = train_shard(
        data.take(rows),
        assign_slices(data.record_ids[rows], SISA.slices, seed=1),
        shard=shard,
        feature_spec=spec,
        arch=ARCH,
        training=training,
        sisa=SISA,
        n_classes=2,
        model_key="m1",
        store=store,
        device=CPU,
    )
    assert res.slices_trained == SISA.slices
    return store, res.final_key, res.n_records


def forget(
    manifest: SisaManifest, data: TabularData, ids: np.ndarray, store: FsspecCheckpointStore
) -> tuple[SisaManifest, UnlearnStats, TabularData]:
    # The layout is persisted at first training; here it is recomputed from the same
    # stable hashes, which is the same thing for records that remain.
    retained = data.without(ids)
    new, stats = unlearn_sisa(
        manifest,
        retained,
        assign_shards(retained, SISA, seed=1),
        assign_slices(retained.record_ids, SISA.slices, seed=1),
        ids,
        store=store,
        device=CPU,
    )
    return new, stats, retained


def test_unlearning_a_subject_is_bit_identical_to_training_from_scratch(tmp_path: Path) -> None:
    data = make_data()
    store = store_at(tmp_path / "ckpt")
    manifest = train_all(data, store)
    subject = data.subjects[5]
    ids = data.record_ids[data.subjects == subject]
    new, stats, retained = forget(manifest, data, ids, store)

    assert stats.affected_shards == sorted(manifest.shards_containing(ids.tolist()))
    assert len(stats.affected_shards) == 1
    shard = stats.affected_shards[0]
    assert not set(ids.tolist()) & set(new.entry(shard).record_ids)
    scratch, key, n = from_scratch(retained, shard, tmp_path)
    assert new.entry(shard).n_records == n
    assert new.entry(shard).final_key == key
    assert_same_weights(store, new.entry(shard).final_key, scratch, key)


@pytest.mark.parametrize("training", [TRAIN, PER_RECORD], ids=["per_stage", "per_record"])
def test_training_is_deterministic_across_runs(tmp_path: Path, training: TrainingConfig) -> None:
    data = make_data(n_subjects=60, seed=3)
    m1 = train_all(data, store_at(tmp_path / "a"), training)
    m2 = train_all(data.take(np.arange(len(data))[::-1]), store_at(tmp_path / "b"), training)
    assert m1.to_dict() == m2.to_dict()
    for e in m1.entries:
        for k in e.checkpoint_keys:
            assert_same_weights(store_at(tmp_path / "a"), k, store_at(tmp_path / "b"), k)


def test_only_affected_shards_change_and_earlier_slices_are_reused(tmp_path: Path) -> None:
    data = make_data()
    store = store_at(tmp_path / "ckpt")
    manifest = train_all(data, store)
    before = {e.final_key: store.read_bytes(e.final_key) for e in manifest.entries}
    slice_of = assign_slices(data.record_ids, SISA.slices, seed=1)
    # One record from the last slice, so slices 0..R-2 must all be reused.
    target = int(data.record_ids[np.flatnonzero(slice_of == SISA.slices - 1)[0]])
    new, stats, retained = forget(manifest, data, np.array([target]), store)

    (shard,) = stats.affected_shards
    assert stats.total_shards == SISA.shards
    assert stats.earliest_affected_slice == {shard: SISA.slices - 1}
    assert stats.slices_retrained == {shard: 1}
    old_e, new_e = manifest.entry(shard), new.entry(shard)
    assert old_e.checkpoint_keys[:-1] == new_e.checkpoint_keys[:-1]
    assert old_e.checkpoint_keys[-1] != new_e.checkpoint_keys[-1]
    for e in new.entries:
        if e.shard != shard:
            assert e == manifest.entry(e.shard)
            assert store.read_bytes(e.final_key) == before[e.final_key]
    scratch, key, _ = from_scratch(retained, shard, tmp_path)
    assert_same_weights(store, new_e.final_key, scratch, key)

    # Slice k in general: R - k stages recomputed, provided the shard's preprocessor is
    # unchanged (quantised scaling makes that the common case; pick such a record).
    r_shard = assign_shards(retained, SISA, seed=1)
    r_slice = assign_slices(retained.record_ids, SISA.slices, seed=1)
    for k in range(SISA.slices - 1):
        in_shard = np.flatnonzero(r_shard == shard)
        prep = fit_preprocessor(SPEC, retained.take(in_shard).columns)
        victim = next(
            retained.record_ids[[r]]
            for r in in_shard
            if r_slice[r] == k
            and fit_preprocessor(SPEC, retained.take(in_shard[in_shard != r]).columns) == prep
        )
        _, st, _ = forget(new, retained, victim, store)
        (s2,) = st.affected_shards
        assert st.earliest_affected_slice[s2] == k
        assert st.slices_retrained[s2] == SISA.slices - k

    # Idempotent: the same request again recomputes nothing and gives the same manifest.
    again, st2, _ = forget(manifest, data, np.array([target]), store)
    assert again.to_dict() == new.to_dict()
    assert st2.slices_retrained == {shard: 0}


def test_preprocessor_never_sees_forgotten_records(tmp_path: Path) -> None:
    data = make_data()
    # Give one subject a category nobody else has.
    subject = data.subjects[10]
    mine = data.subjects == subject
    colour = data.columns["colour"].copy()
    colour[mine] = "ultraviolet"
    data = TabularData(
        data.record_ids,
        {**data.columns, "colour": colour},
        data.labels,
        data.subjects,
        data.sources,
    )
    store = store_at(tmp_path / "ckpt")
    manifest = train_all(data, store)
    ids = data.record_ids[mine]
    (shard,) = manifest.shards_containing(ids.tolist())
    assert "ultraviolet" in dict(manifest.entry(shard).preprocessor["categorical"])["colour"]

    new, stats, retained = forget(manifest, data, ids, store)
    vocab = dict(new.entry(shard).preprocessor["categorical"])["colour"]
    assert "ultraviolet" not in vocab
    # A changed preprocessor invalidates every stage: the shard restarts from slice 0.
    assert stats.earliest_affected_slice == {shard: 0}
    assert stats.slices_retrained == {shard: SISA.slices}
    scratch, key, _ = from_scratch(retained, shard, tmp_path)
    assert_same_weights(store, new.entry(shard).final_key, scratch, key)


def test_ensemble_learns_and_manifest_round_trips(tmp_path: Path) -> None:
    train = make_data(n_subjects=400, seed=11)
    test = make_data(n_subjects=150, seed=12)
    store = store_at(tmp_path / "ckpt")
    manifest = train_all(train, store)
    ens = SisaEnsemble.load(manifest, store, CPU)
    proba = ens.predict_proba(test.columns)
    assert proba.shape == (len(test), 2)
    assert torch.allclose(proba.sum(dim=1), torch.ones(len(test)))
    assert accuracy(proba, test.labels) > 0.8
    for s in ens.shards:
        assert accuracy(ens.shard_proba(test.columns, s), test.labels) > 0.7
    # Restricting to shards equals the mean of those shards alone.
    sub = ens.predict_proba(test.columns, shards=[0, 1])
    assert torch.allclose(
        sub, (ens.shard_proba(test.columns, 0) + ens.shard_proba(test.columns, 1)) / 2
    )

    import json

    back = SisaManifest.from_dict(json.loads(json.dumps(manifest.to_dict())))
    assert back == manifest
    voting = SisaManifest.from_dict(
        {**manifest.to_dict(), "sisa": {**SISA.to_dict(), "aggregation": "vote"}}
    )
    votes = SisaEnsemble.load(voting, store, CPU).predict_proba(test.columns)
    assert set(np.unique(votes.numpy() * 3).round(4)) <= {0.0, 1.0, 2.0, 3.0}
    assert accuracy(votes, test.labels) > 0.8


def test_train_subset_of_shards_reuses_previous_entries(tmp_path: Path) -> None:
    data = make_data(n_subjects=60, seed=5)
    store = store_at(tmp_path / "ckpt")
    manifest = train_all(data, store)
    shard_of = assign_shards(data, SISA, seed=1)
    slice_of = assign_slices(data.record_ids, SISA.slices, seed=1)
    seen: list[float] = []
    again = train_sisa(
        data,
        shard_of,
        slice_of,
        feature_spec=SPEC,
        arch=ARCH,
        training=TRAIN,
        sisa=SISA,
        n_classes=2,
        model_key="m1",
        store=store,
        device=CPU,
        shards_to_train={1},
        previous=manifest,
        progress=seen.append,
    )
    assert again == manifest
    assert seen and seen[-1] == 1.0 and seen == sorted(seen)
    with pytest.raises(ValueError):
        train_sisa(
            data,
            shard_of,
            slice_of,
            feature_spec=SPEC,
            arch=ARCH,
            training=TRAIN,
            sisa=SISA,
            n_classes=2,
            model_key="m1",
            store=store,
            device=CPU,
            shards_to_train={1},
        )


@pytest.mark.parametrize("training", [TRAIN, PER_RECORD], ids=["per_stage", "per_record"])
def test_unlearning_is_bit_identical_to_retraining_under_either_schedule(
    tmp_path: Path, training: TrainingConfig
) -> None:
    data = make_data()
    store = store_at(tmp_path / "ckpt")
    manifest = train_all(data, store, training)
    assert manifest.training == training
    slice_of = assign_slices(data.record_ids, SISA.slices, seed=1)
    shard_of = assign_shards(data, SISA, seed=1)
    # Records of slices 1 and 2 of one shard whose removal leaves the preprocessor as it
    # was, so the earlier stages are reused (stage 1 trains 0 epochs per record).
    in_shard = np.flatnonzero(shard_of == 0)
    prep = fit_preprocessor(SPEC, data.take(in_shard).columns)
    for k in (1, 2):
        target = next(
            data.record_ids[[r]]
            for r in in_shard
            if slice_of[r] == k
            and fit_preprocessor(SPEC, data.take(in_shard[in_shard != r]).columns) == prep
        )
        new, stats, retained = forget(manifest, data, target, store)
        assert stats.affected_shards == [0]
        assert stats.earliest_affected_slice == {0: k}
        assert stats.slices_retrained == {0: SISA.slices - k}
        assert new.entry(0).checkpoint_keys[:k] == manifest.entry(0).checkpoint_keys[:k]
        scratch, key, _ = from_scratch(retained, 0, tmp_path / f"k{k}", training=training)
        assert new.entry(0).final_key == key
        # Every stage, reused or retrained, is the from-scratch stage byte for byte.
        for stage_key in new.entry(0).checkpoint_keys:
            assert_same_weights(store, stage_key, scratch, stage_key)


def test_each_stage_trains_the_epochs_of_its_schedule(tmp_path: Path) -> None:
    """Stage by stage, a shard's checkpoints are the plain training loop run for the
    schedule's epochs: `epochs` for a legacy config (what every stored model trained
    with), the per-record stages for a new one. The two never share a checkpoint."""
    from test_training import plain_fit

    from app.ml.architectures import build_model
    from app.ml.device import derive_seed
    from app.ml.schedule import stage_epochs
    from app.ml.training import init_model_

    data = make_data(n_subjects=80, seed=2)
    store = store_at(tmp_path / "ckpt")
    keys: dict[str, set[str]] = {}
    for training in (TRAIN, PER_RECORD):
        manifest = train_all(data, store, training)
        keys[training.schedule] = {k for e in manifest.entries for k in e.checkpoint_keys}
        shard_of = assign_shards(data, SISA, seed=1)
        part = data.take(np.flatnonzero(shard_of == 1)).sorted_by_id()
        slice_of = assign_slices(part.record_ids, SISA.slices, seed=1)
        prep = fit_preprocessor(SPEC, part.columns)
        x, y = prep.transform(part.columns), torch.from_numpy(part.labels)
        model = build_model(ARCH, prep.n_inputs, 2)
        init_model_(model, derive_seed(training.seed, "m1", 1, "init"))
        epochs = stage_epochs(training, SISA.slices)
        assert epochs == ((3, 3, 3, 3) if training is TRAIN else (1, 0, 1, 1))
        for i, key in enumerate(manifest.entry(1).checkpoint_keys):
            rows = torch.from_numpy(np.flatnonzero(slice_of <= i))
            seed = derive_seed(training.seed, "m1", 1, i)
            plain_fit(model, x[rows], y[rows], training, seed, epochs=epochs[i])
            tensors, meta = store.load(key)
            assert meta["training"] == training.to_dict()
            for name, value in model.state_dict().items():
                assert torch.equal(tensors[name], value), (training.schedule, i, name)
    assert not keys["per_stage"] & keys["per_record"]
