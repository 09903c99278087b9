"""Benchmark B5: media models. One text and one audio dataset, in the same process:

* ingest: the upload (Parquet with a text column; a zip of WAV files with a manifest)
  read, every file decoded and checked, rows and media written (SQLite database, local
  artifact store, as `POST /v1/datasets` does inline): records per second;
* training: a SISA ensemble (subject sharding) and a monolithic model of the same
  network and `training` body (epochs are passes per record in both);
* unlearning one subject: SISA (`unlearn_sisa`: the affected shard from its checkpoint)
  vs retraining the monolithic model on the retained rows, and their ratio;
* accuracy of both on a held-out split; the share of the unlearning job spent in
  feature extraction (tokenising, decoding, log-mel spectrograms in `transform`).

Sizes: 20,000 CVs and 3,000 recordings (`--quick`: 2,000 and 300). Audio is
synthesised tones with noise (two pitch bands per class), so the run needs no
espeak-ng. One CPU thread for every measurement.
"""

from __future__ import annotations

import argparse
import io
import json
import math
import os
import tempfile
import time
import wave
import zipfile
from pathlib import Path
from typing import Any

import numpy as np
import pyarrow as pa
import pyarrow.parquet as pq
import torch

RESULTS = Path(__file__).resolve().parent / "results" / "b5.json"
THREADS = 1


def _texts(n: int) -> bytes:
    from app.demo_media import cv_text_rows

    rows = cv_text_rows(n=n, seed=5)
    buf = io.BytesIO()
    pq.write_table(pa.table({k: [r[k] for r in rows] for k in rows[0]}), buf)
    return buf.getvalue()


def _wav(freq: float, rng: np.random.Generator, rate: int = 8000, seconds: float = 1.0) -> bytes:
    t = np.arange(int(rate * seconds)) / rate
    x = 0.4 * np.sin(2 * math.pi * freq * t) + 0.2 * np.sin(2 * math.pi * 1.5 * freq * t)
    x = x * np.hanning(len(t)) + 0.1 * rng.normal(size=len(t))
    buf = io.BytesIO()
    with wave.open(buf, "wb") as wf:
        wf.setnchannels(1)
        wf.setsampwidth(2)
        wf.setframerate(rate)
        wf.writeframes((np.clip(x, -1, 1) * 32000).astype("<i2").tobytes())
    return buf.getvalue()


def _audio(n: int) -> bytes:
    rng = np.random.default_rng(3)
    buf = io.BytesIO()
    lines = ["student,district,group,answer,label"]
    with zipfile.ZipFile(buf, "w", zipfile.ZIP_STORED) as zf:
        for i in range(n):
            student = i // 2
            label = int(rng.integers(0, 2))
            group = ["a", "b", "c"][student % 3]
            base = (250 if label else 700) * (1.0 + 0.15 * (student % 3))
            name = f"audio/{i:05d}.wav"
            zf.writestr(name, _wav(base * float(rng.uniform(0.9, 1.1)), rng))
            lines.append(f"st{student:05d},d{student % 5},{group},{name},{label}")
        zf.writestr("manifest.csv", "\n".join(lines) + "\n")
    return buf.getvalue()


def _environment(folder: Path) -> None:
    os.environ.update(
        {
            "PALIMPSEST_DATABASE_URL": f"sqlite:///{folder / 'b5.sqlite'}",
            "PALIMPSEST_ARTIFACT_ROOT": str(folder / "artifacts"),
            "PALIMPSEST_BROKER_URL": "memory://",
            "PALIMPSEST_RESULT_BACKEND": "cache+memory://",
            "PALIMPSEST_ENVIRONMENT": "test",
            "PALIMPSEST_SUBJECT_PEPPER": "bench-b5",
            "PALIMPSEST_SIGNING_KEY_FILE": str(folder / "signing-key.pem"),
        }
    )
    from app.cli import upgrade_database
    from app.core.settings import get_settings

    get_settings.cache_clear()
    upgrade_database(os.environ["PALIMPSEST_DATABASE_URL"])


def _ingest(data: bytes, filename: str, spec_body: dict[str, Any]) -> tuple[Any, float]:
    from app.core.db import session_scope
    from app.core.settings import get_settings
    from app.core.storage import get_store
    from app.datasets import archive, service
    from app.datasets.schemas import DatasetSpec

    settings = get_settings()
    spec = DatasetSpec.model_validate(spec_body)
    t0 = time.perf_counter()
    with session_scope() as s:
        mt = archive.read_upload(data, filename, spec, settings)
        table = archive.check_media(mt, spec, settings)
        out = service.ingest(s, get_store(), settings, spec, table, "bench")
    seconds = time.perf_counter() - t0
    with session_scope() as s:
        ds = service.get(s, out.id)
        parts = service.read_partitions(get_store(), ds)
        data_all = service.to_tabular(ds, parts, store=get_store())
        s.expunge(ds)
    return (ds, data_all), seconds


def _one(kind: str, n: int, folder: Path) -> dict[str, Any]:
    from app.ml.architectures import build_model
    from app.ml.checkpoints import FsspecCheckpointStore
    from app.ml.config import ArchitectureConfig, FeatureSpec, SisaConfig, TrainingConfig
    from app.ml.device import derive_seed
    from app.ml.encoders import resolve
    from app.ml.metrics import accuracy
    from app.ml.preprocess import PreprocessorState, fit_preprocessor
    from app.ml.sharding import assign_shards, assign_slices
    from app.ml.sisa import SisaEnsemble, train_sisa, unlearn_sisa
    from app.ml.training import fit, init_model_, predict_proba

    if kind == "text":
        spec = {
            "name": f"b5-{kind}",
            "subject_column": "candidate",
            "label_column": "hired",
            "source_column": "agency",
            "text_columns": ["cv"],
            "feature_columns": ["cv"],
        }
        (_, data), ingest_s = _ingest(_texts(n), "cvs.parquet", spec)
        enc = resolve("cv", "text", {"dim": 16})
        epochs = 4
    else:
        spec = {
            "name": f"b5-{kind}",
            "subject_column": "student",
            "label_column": "label",
            "source_column": "district",
            "audio_columns": ["answer"],
            "feature_columns": ["answer"],
        }
        (_, data), ingest_s = _ingest(_audio(n), "answers.zip", spec)
        enc = resolve("answer", "audio", {"n_mels": 32, "width": 8})
        epochs = 6
    fspec = FeatureSpec(media=(enc,))
    arch = ArchitectureConfig(kind="mlp", hidden=(16,), encoders=(enc,))
    training = TrainingConfig(epochs=epochs, batch_size=64, lr=0.01, seed=1, schedule="per_record")
    sisa = SisaConfig(shards=8, slices=4, sharding="subject")
    rng = np.random.default_rng(0)
    test_mask = rng.random(len(data)) < 0.2
    train, test = data.take(~test_mask), data.take(test_mask)
    store = FsspecCheckpointStore.local(str(folder / f"ckpt-{kind}"))
    cpu = torch.device("cpu")
    shard_of = assign_shards(train, sisa, seed=1)
    slice_of = assign_slices(train.record_ids, sisa.slices, seed=1)
    common = {
        "feature_spec": fspec,
        "arch": arch,
        "training": training,
        "sisa": sisa,
        "n_classes": 2,
        "model_key": f"b5-{kind}",
        "device": cpu,
    }
    t0 = time.perf_counter()
    manifest = train_sisa(train, shard_of, slice_of, store=store, **common)
    sisa_train_s = time.perf_counter() - t0
    sisa_acc = accuracy(
        SisaEnsemble.load(manifest, store, cpu).predict_proba(test.columns), test.labels
    )

    def mono(rows: Any) -> tuple[torch.nn.Module, PreprocessorState]:
        prep = fit_preprocessor(fspec, rows.columns)
        d = rows.sorted_by_id()
        x = prep.transform(d.columns)
        model = init_model_(build_model(arch, prep.n_inputs, 2), derive_seed(1, "mono"))
        fit(model, x, torch.from_numpy(d.labels), training, derive_seed(1, "mono-fit"))
        return model, prep

    t0 = time.perf_counter()
    model, prep = mono(train)
    mono_train_s = time.perf_counter() - t0
    mono_acc = accuracy(predict_proba(model, prep.transform(test.columns)), test.labels)

    subject = train.subjects[len(train) // 2]
    ids = train.record_ids[train.subjects == subject]
    retained = train.without(ids)
    r_shard = assign_shards(retained, sisa, seed=1)
    r_slice = assign_slices(retained.record_ids, sisa.slices, seed=1)
    # Feature extraction inside the unlearning job: every `transform` call, timed.
    spent = [0.0]
    original = PreprocessorState.transform

    def timed_transform(self: PreprocessorState, columns: Any) -> torch.Tensor:
        t = time.perf_counter()
        try:
            return original(self, columns)
        finally:
            spent[0] += time.perf_counter() - t

    PreprocessorState.transform = timed_transform  # type: ignore[method-assign]
    try:
        t0 = time.perf_counter()
        _, stats = unlearn_sisa(manifest, retained, r_shard, r_slice, ids, store=store, device=cpu)
        unlearn_s = time.perf_counter() - t0
    finally:
        PreprocessorState.transform = original  # type: ignore[method-assign]
    t0 = time.perf_counter()
    mono(retained)
    retrain_s = time.perf_counter() - t0
    return {
        "kind": kind,
        "records": len(data),
        "ingest_seconds": round(ingest_s, 2),
        "ingest_records_per_s": round(len(data) / ingest_s, 1),
        "sisa_train_seconds": round(sisa_train_s, 2),
        "mono_train_seconds": round(mono_train_s, 2),
        "sisa_accuracy": round(float(sisa_acc), 4),
        "mono_accuracy": round(float(mono_acc), 4),
        "unlearn_one_subject_seconds": round(unlearn_s, 3),
        "mono_retrain_seconds": round(retrain_s, 3),
        "speedup": round(retrain_s / unlearn_s, 1),
        "affected_shards": stats.affected_shards,
        "feature_extraction_share": round(spent[0] / unlearn_s, 3),
    }


def main(quick: bool = False) -> None:
    torch.set_num_threads(THREADS)
    n_text, n_audio = (2_000, 300) if quick else (20_000, 3_000)
    with tempfile.TemporaryDirectory(prefix="b5-") as tmp:
        folder = Path(tmp)
        _environment(folder)
        results = [_one("text", n_text, folder), _one("audio", n_audio, folder)]
    print("B5 media models (one CPU thread)")
    keys = list(results[0])
    print(" | ".join(keys))
    for r in results:
        print(" | ".join(str(r[k]) for k in keys))
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps({"quick": quick, "results": results}, indent=2))


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--quick", action="store_true")
    main(quick=parser.parse_args().quick)
