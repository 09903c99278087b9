"""The engine on a CUDA device (`pytest -m cuda`; `bench/gpu.sh` runs these on a GPU
machine). Without CUDA every test here skips with the reason (tests/conftest.py).

Bit-exactness on CUDA rests on deterministic kernels (`enable_determinism`, cuBLAS's
fixed workspace) and a fixed device: the same code on the same GPU gives the same bits.
Across devices (CUDA against CPU) only the predictions agree, within float rounding.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from app.ml.checkpoints import FsspecCheckpointStore
from app.ml.data import TabularData
from app.ml.device import enable_determinism
from app.ml.sharding import assign_shards, assign_slices
from app.ml.sisa import SisaEnsemble, SisaManifest, train_shard, train_sisa, unlearn_sisa
from tests.ml.test_sisa import ARCH, SISA, SPEC, TRAIN, assert_same_weights, make_data, store_at

pytestmark = pytest.mark.cuda


@pytest.fixture(scope="module")
def cuda() -> torch.device:
    enable_determinism()
    return torch.device("cuda")


def _train(
    data: TabularData, tmp: Path, name: str, device: torch.device
) -> tuple[FsspecCheckpointStore, SisaManifest]:
    store = store_at(tmp / name)
    manifest = train_sisa(
        data,
        assign_shards(data, SISA, seed=1),
        assign_slices(data.record_ids, SISA.slices, seed=1),
        feature_spec=SPEC,
        arch=ARCH,
        training=TRAIN,
        sisa=SISA,
        n_classes=2,
        model_key="m1",
        store=store,
        device=device,
    )
    return store, manifest


def test_sisa_training_on_cuda_is_deterministic_run_to_run(
    cuda: torch.device, tmp_path: Path
) -> None:
    data = make_data()
    store_a, a = _train(data, tmp_path, "a", cuda)
    store_b, b = _train(data, tmp_path, "b", cuda)
    assert a.runtime["device"].startswith("cuda")
    for ea, eb in zip(a.entries, b.entries, strict=True):
        assert ea.checkpoint_keys == eb.checkpoint_keys
        assert_same_weights(store_a, ea.final_key, store_b, eb.final_key)


def test_unlearned_shard_on_cuda_equals_the_shard_retrained_on_cuda(
    cuda: torch.device, tmp_path: Path
) -> None:
    data = make_data()
    store, manifest = _train(data, tmp_path, "ckpt", cuda)
    ids = data.record_ids[data.subjects == data.subjects[5]]
    retained = data.without(ids)
    new, stats = unlearn_sisa(
        manifest,
        retained,
        assign_shards(retained, SISA, seed=1),
        assign_slices(retained.record_ids, SISA.slices, seed=1),
        ids,
        store=store,
        device=cuda,
    )
    (shard,) = stats.affected_shards
    # The same shard trained from nothing, on CUDA, on the retained rows only.
    scratch = store_at(tmp_path / "scratch")
    rows = np.flatnonzero(assign_shards(retained, SISA, seed=1) == shard)
    res = train_shard(
        retained.take(rows),
        assign_slices(retained.record_ids[rows], SISA.slices, seed=1),
        shard=shard,
        feature_spec=SPEC,
        arch=ARCH,
        training=TRAIN,
        sisa=SISA,
        n_classes=2,
        model_key="m1",
        store=scratch,
        device=cuda,
    )
    assert res.slices_trained == SISA.slices
    assert new.entry(shard).final_key == res.final_key
    assert_same_weights(store, new.entry(shard).final_key, scratch, res.final_key)


def test_predictions_on_cuda_and_cpu_agree(cuda: torch.device, tmp_path: Path) -> None:
    data = make_data()
    store, manifest = _train(data, tmp_path, "ckpt", cuda)
    on_gpu = SisaEnsemble.load(manifest, store, cuda).predict_proba(data.columns)
    on_cpu = SisaEnsemble.load(manifest, store, torch.device("cpu")).predict_proba(data.columns)
    a, b = on_gpu.cpu().numpy(), on_cpu.cpu().numpy()
    assert a.shape == b.shape == (len(data.record_ids), 2)
    np.testing.assert_allclose(a, b, atol=1e-5, rtol=0)
    assert (a.argmax(1) == b.argmax(1)).mean() > 0.999
