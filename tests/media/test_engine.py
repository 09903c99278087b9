"""Media models in the engine: SISA unlearning of text, image and audio models is
bit-identical to training the shard from scratch; encoders are deterministic; the
tokenizer's blocked words leave every score exactly unchanged."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
import torch

from app.ml.architectures import build_model
from app.ml.config import ArchitectureConfig, FeatureSpec, SisaConfig, TrainingConfig
from app.ml.data import TabularData
from app.ml.encoders import MediaModel, resolve, tokenize
from app.ml.preprocess import fit_preprocessor
from app.ml.sharding import assign_shards, assign_slices
from app.ml.sisa import train_shard, train_sisa, unlearn_sisa
from app.ml.training import fit, init_model_, predict_proba
from tests.media import gen
from tests.ml.test_sisa import assert_same_weights, store_at

CPU = torch.device("cpu")
SISA = SisaConfig(shards=2, slices=2, sharding="subject")
TRAIN = TrainingConfig(epochs=2, batch_size=16, lr=0.02, seed=3, schedule="per_record")
SMALL = {
    "text": {"buckets": 512, "dim": 8},
    "image": {"size": 16, "width": 4},
    "audio": {"n_mels": 16, "seconds": 0.5, "width": 4},
}


def media_data(kind: str, n_subjects: int = 16) -> TabularData:
    recs = gen.rows(kind, n_subjects=n_subjects, seed=5)
    cells = np.empty(len(recs), dtype=object)
    cells[:] = [r["media"] for r in recs]
    return TabularData(
        record_ids=np.arange(10, 10 + len(recs), dtype=np.int64),
        columns={"age": np.array([r["age"] for r in recs]), "media": cells},
        labels=np.array([r["label"] == "yes" for r in recs], dtype=np.int64),
        subjects=np.array([r["subject"] for r in recs], dtype=object),
        sources=np.array([r["source"] for r in recs], dtype=object),
    )


def specs(kind: str) -> tuple[FeatureSpec, ArchitectureConfig]:
    enc = resolve("media", kind, SMALL[kind])
    return (
        FeatureSpec(numeric=("age",), media=(enc,)),
        ArchitectureConfig(kind="mlp", hidden=(8,), encoders=(enc,)),
    )


@pytest.mark.parametrize("kind", ["text", "image", "audio"])
def test_sisa_unlearning_is_bit_identical_to_retraining_the_shard(
    kind: str, tmp_path: Path
) -> None:
    data = media_data(kind)
    spec, arch = specs(kind)
    store = store_at(tmp_path / "ckpt")
    common = {
        "feature_spec": spec,
        "arch": arch,
        "training": TRAIN,
        "sisa": SISA,
        "n_classes": 2,
        "model_key": f"m-{kind}",
        "device": CPU,
    }
    manifest = train_sisa(
        data,
        assign_shards(data, SISA, seed=1),
        assign_slices(data.record_ids, 2, seed=1),
        store=store,
        **common,
    )
    ids = data.record_ids[data.subjects == data.subjects[3]]
    retained = data.without(ids)
    r_shard = assign_shards(retained, SISA, seed=1)
    r_slice = assign_slices(retained.record_ids, 2, seed=1)
    new, stats = unlearn_sisa(manifest, retained, r_shard, r_slice, ids, store=store, device=CPU)
    (shard,) = stats.affected_shards
    scratch = store_at(tmp_path / "scratch")
    rows = np.flatnonzero(r_shard == shard)
    res = train_shard(retained.take(rows), r_slice[rows], shard=shard, store=scratch, **common)
    assert new.entry(shard).final_key == res.final_key
    assert_same_weights(store, new.entry(shard).final_key, scratch, res.final_key)
    # The unlearned ensemble still scores media it never saw.
    assert not set(ids.tolist()) & set(new.entry(shard).record_ids)


@pytest.mark.parametrize("kind", ["text", "image", "audio"])
def test_encoders_train_deterministically(kind: str) -> None:
    data = media_data(kind, n_subjects=8)
    spec, arch = specs(kind)
    prep = fit_preprocessor(spec, data.columns)
    x = prep.transform(data.columns)
    y = torch.from_numpy(data.labels)
    weights = []
    for _ in range(2):
        model = init_model_(build_model(arch, prep.n_inputs, 2), seed=11)
        assert isinstance(model, MediaModel)
        fit(model, x, y, TRAIN, seed=4)
        weights.append({k: v.clone() for k, v in model.state_dict().items()})
    for k in weights[0]:
        assert torch.equal(weights[0][k], weights[1][k]), k


def test_tokenizer_drops_blocked_words_whole_and_case_insensitively() -> None:
    assert tokenize("Driving LICENCE; licenced driver", ["licence"]) == [
        "driving",
        "licenced",
        "driver",
    ]


def test_blocked_tokens_make_scores_exactly_invariant() -> None:
    data = media_data("text", n_subjects=12)
    spec, arch = specs("text")
    prep = fit_preprocessor(spec, data.columns)
    model = init_model_(build_model(arch, prep.n_inputs, 2), seed=2)
    fit(model, prep.transform(data.columns), torch.from_numpy(data.labels), TRAIN, seed=1)
    words = ["driving", "licence"]
    texts = [str(t).replace("driving licence", "") for t in data.columns["media"]]
    inserted = [f"{t} Driving Licence driving" for t in texts]

    def scores(p: object, col: list[str]) -> torch.Tensor:
        cells = np.empty(len(col), dtype=object)
        cells[:] = col
        return predict_proba(model, p.transform({**data.columns, "media": cells}))[:, 1]  # type: ignore[attr-defined]

    blind = prep.with_media(tuple(e.with_blocked(words) for e in prep.media))
    assert torch.equal(scores(blind, texts), scores(blind, inserted))
    # Without blocking (the uncorrected model), the words do move scores.
    assert not torch.equal(scores(prep, texts), scores(prep, inserted))


@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device here")
@pytest.mark.parametrize("kind", ["text", "image", "audio"])
def test_media_models_train_on_cuda(kind: str) -> None:
    data = media_data(kind, n_subjects=8)
    spec, arch = specs(kind)
    prep = fit_preprocessor(spec, data.columns)
    dev = torch.device("cuda")
    x = prep.transform(data.columns).to(dev)
    model = init_model_(build_model(arch, prep.n_inputs, 2), seed=1).to(dev)
    fit(model, x, torch.from_numpy(data.labels).to(dev), TRAIN, seed=2)
    cpu_model = init_model_(build_model(arch, prep.n_inputs, 2), seed=1)
    fit(cpu_model, x.cpu(), torch.from_numpy(data.labels), TRAIN, seed=2)
    got = predict_proba(model, x).cpu()
    want = predict_proba(cpu_model, x.cpu())
    assert torch.allclose(got, want, atol=1e-3), (got - want).abs().max()
