"""How reliably the ESL speech story's fairness check flags the `vi` accent group.

The story's data (`esl_speech_rows`) and model (`speech_model`) trained and unlearned in
the engine as the service does (test split by record id, source-packed shards, district
A's shard retrained without it, the fairness check on the test rows outside A), once per
instance pepper: the pepper decides the subject keys (so how district A's students are
split, if it is) and, through the model's key, every training seed; record ids start at
a different offset per run, as they do in a service that holds other datasets.

    python -m bench.esl_accent [--runs 5]

Prints one JSON line per run: per-group test accuracy before and after the withdrawal,
the flagged groups with their McNemar z and the Bonferroni bar.
"""

from __future__ import annotations

import argparse
import hashlib
import json
import tempfile
import time

import numpy as np
import torch

from app.demo_media import DISTRICT_A, WORDS, esl_speech_rows, speech_model
from app.ml.checkpoints import FsspecCheckpointStore
from app.ml.config import ArchitectureConfig, FeatureSpec, SisaConfig, TrainingConfig
from app.ml.data import TabularData
from app.ml.encoders import resolve
from app.ml.sharding import assign_shards, assign_slices
from app.ml.sisa import SisaEnsemble, train_sisa
from app.ml.verify.fairness import fairness_check
from app.pipeline.start import test_split


def run_once(rows: list[dict[str, object]], pepper: str, offset: int) -> dict[str, object]:
    body = speech_model("bench")
    cells = np.empty(len(rows), dtype=object)
    cells[:] = [r["wav"] for r in rows]
    subjects = [hashlib.sha256(f"{pepper}:{r['student']}".encode()).hexdigest() for r in rows]
    data = TabularData(
        record_ids=np.arange(offset, offset + len(rows), dtype=np.int64),
        columns={
            "answer": cells,
            "home_language": np.array([r["home_language"] for r in rows], dtype=object),
        },
        labels=np.array([WORDS.index(str(r["word"])) for r in rows], dtype=np.int64),
        subjects=np.array(subjects, dtype=object),
        sources=np.array([r["district"] for r in rows], dtype=object),
    )
    enc = resolve("answer", "audio", body["architecture"]["encoders"]["answer"])
    training = TrainingConfig.from_dict(body["training"])
    sisa = SisaConfig.from_dict(body["unlearning"])
    held = test_split(data.record_ids, training.seed, float(body["test_fraction"]))
    train, test = data.take(np.flatnonzero(~held)), data.take(np.flatnonzero(held))
    shard_of = assign_shards(train, sisa, training.seed)
    slice_of = assign_slices(train.record_ids, sisa.slices, training.seed)
    store = FsspecCheckpointStore.local(tempfile.mkdtemp(prefix="esl-accent-"))
    common = {
        "feature_spec": FeatureSpec(media=(enc,)),
        "arch": ArchitectureConfig(
            kind="mlp", hidden=tuple(body["architecture"]["hidden"]), encoders=(enc,)
        ),
        "training": training,
        "sisa": sisa,
        "n_classes": len(WORDS),
        "model_key": f"esl-{pepper}",
        "store": store,
        "device": torch.device("cpu"),
    }
    t0 = time.perf_counter()
    before = train_sisa(train, shard_of, slice_of, **common)
    keep = np.flatnonzero(train.sources != DISTRICT_A)
    affected = {int(s) for s in np.unique(shard_of[train.sources == DISTRICT_A])}
    after = train_sisa(
        train.take(keep),
        shard_of[keep],
        slice_of[keep],
        shards_to_train=affected,
        previous=before,
        **common,
    )
    judged = test.take(np.flatnonzero(test.sources != DISTRICT_A))

    def predict(manifest: object) -> np.ndarray:
        ens = SisaEnsemble.load(manifest, store, torch.device("cpu"))  # type: ignore[arg-type]
        return np.asarray(ens.predict_proba(judged.columns).numpy().argmax(axis=1))

    check = fairness_check(
        predict(before),
        predict(after),
        judged.labels,
        {"home_language": judged.columns["home_language"].astype(str)},
        threshold=0.05,
        min_group_size=int(body["verification"]["min_group_size"]),
    )
    acc_after = {g.group: round(g.accuracy, 3) for g in check.after}
    return {
        "pepper": pepper,
        "seconds": round(time.perf_counter() - t0, 1),
        "shards_retrained": sorted(affected),
        "groups": {g.group: [g.n, round(g.accuracy, 3), acc_after[g.group]] for g in check.before},
        "z_required": round(check.z_required, 2),
        "flagged": [(f["group"], f["metric"], round(f["z"], 2)) for f in check.flagged],
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=5)
    args = parser.parse_args()
    torch.set_num_threads(2)
    rows = esl_speech_rows()
    for i in range(args.runs):
        out = run_once(rows, pepper=f"pepper-{i}", offset=1 + 7919 * i)
        print(json.dumps(out), flush=True)


if __name__ == "__main__":
    main()
