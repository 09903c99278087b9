"""Tree ensembles as SISA shard models: exact unlearning by refitting the affected shard,
deterministic seeds, skops storage (no pickle)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from app.ml.config import ArchitectureConfig, SisaConfig, TrainingConfig
from app.ml.sharding import assign_shards, assign_slices
from app.ml.sisa import SisaEnsemble, train_shard, train_sisa, unlearn_sisa
from app.ml.trees import TreeEnsemble, validate
from tests.ml.test_sisa import SPEC, make_data, store_at

CPU = torch.device("cpu")
SISA = SisaConfig(shards=3, slices=1, sharding="subject")
TRAIN = TrainingConfig(seed=5)
KINDS = {
    "gbdt": ArchitectureConfig(kind="gbdt", params={"max_iter": 20}),
    "random_forest": ArchitectureConfig(kind="random_forest", params={"n_estimators": 10}),
}


@pytest.mark.parametrize("kind", sorted(KINDS))
def test_tree_sisa_unlearning_equals_a_shard_refitted_from_scratch(
    tmp_path: Path, kind: str
) -> None:
    arch = KINDS[kind]
    data = make_data(n_subjects=150, seed=2)
    store = store_at(tmp_path / "ckpt")
    common = {"feature_spec": SPEC, "arch": arch, "training": TRAIN, "sisa": SISA}
    manifest = train_sisa(
        data,
        assign_shards(data, SISA, seed=1),
        assign_slices(data.record_ids, 1, seed=1),
        n_classes=2,
        model_key="t1",
        store=store,
        device=CPU,
        **common,
    )
    before = SisaEnsemble.load(manifest, store, CPU)
    assert float((before.predict_proba(data.columns).argmax(1).numpy() == data.labels).mean()) > 0.8

    ids = data.record_ids[data.subjects == data.subjects[7]]
    retained = data.without(ids)
    shard_of = assign_shards(retained, SISA, seed=1)
    new, stats = unlearn_sisa(
        manifest,
        retained,
        shard_of,
        assign_slices(retained.record_ids, 1, seed=1),
        ids,
        store=store,
        device=CPU,
    )
    assert len(stats.affected_shards) == 1
    shard = stats.affected_shards[0]
    untouched = [e.shard for e in manifest.entries if e.shard != shard]
    for s in untouched:
        assert new.entry(s).final_key == manifest.entry(s).final_key

    rows = np.flatnonzero(shard_of == shard)
    scratch = store_at(tmp_path / "scratch")
    res = train_shard(
        retained.take(rows),
        np.zeros(len(rows), dtype=np.int64),
        shard=shard,
        n_classes=2,
        model_key="t1",
        store=scratch,
        device=CPU,
        **common,
    )
    assert res.final_key == new.entry(shard).final_key
    after = SisaEnsemble.load(new, store, CPU)
    fresh = SisaEnsemble(
        new, {shard: _load(scratch, res.final_key, arch, res)}, {shard: res.preprocessor}, CPU
    )
    p_new = after.shard_proba(data.columns, shard)
    p_fresh = fresh.shard_proba(data.columns, shard)
    assert torch.equal(p_new, p_fresh)
    # Beyond the data: the same function on arbitrary inputs (skops bytes embed object
    # ids, so equal models need not be equal bytes; their predictions are).
    probe = torch.randn(500, res.preprocessor.n_inputs, generator=torch.Generator().manual_seed(0))
    assert torch.equal(after.models[shard](probe), fresh.models[shard](probe))
    # The forgotten records changed the shard's model (the test could fail).
    assert not torch.equal(p_new, before.shard_proba(data.columns, shard))


def _load(store: object, key: str, arch: ArchitectureConfig, res: object) -> TreeEnsemble:
    from app.ml.architectures import build_model

    model = build_model(arch, res.preprocessor.n_inputs, 2)  # type: ignore[attr-defined]
    tensors, _ = store.load(key)  # type: ignore[attr-defined]
    model.load_state_dict(tensors)
    assert isinstance(model, TreeEnsemble)
    return model


def test_tree_checkpoints_are_skops_and_refuse_foreign_types(tmp_path: Path) -> None:
    import skops.io as sio

    model = TreeEnsemble("gbdt", 2, 3, {"max_iter": 3})
    x = torch.randn(60, 2)
    y = torch.arange(60) % 3
    model.fit_tree(x, y, seed=1)
    blob = bytes(model.state_dict()["skops"].numpy().tobytes())
    assert sio.loads(blob, trusted=sio.get_untrusted_types(data=blob)).n_iter_ == 3
    other = TreeEnsemble("gbdt", 2, 3, {"max_iter": 3})
    other.load_state_dict(model.state_dict())
    assert torch.equal(other(x), model(x))
    assert other(x).shape == (60, 3)
    evil = sio.dumps({"f": Path("/etc/passwd")})
    with pytest.raises(ValueError, match="outside scikit-learn"):
        other.load_state_dict({"skops": torch.frombuffer(bytearray(evil), dtype=torch.uint8)})


def test_a_shard_with_one_class_predicts_it_and_bad_params_are_refused() -> None:
    model = TreeEnsemble("random_forest", 2, 2, {})
    model.fit_tree(torch.randn(5, 2), torch.ones(5, dtype=torch.int64), seed=0)
    p = torch.sigmoid(model(torch.randn(4, 2)))
    assert bool((p > 0.99).all())
    with pytest.raises(ValueError, match="unknown gbdt parameters"):
        validate("gbdt", {"n_estimators": 3})
    with pytest.raises((ValueError, TypeError)):
        validate("random_forest", {"n_estimators": -1})
