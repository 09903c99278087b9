"""Media models with real API and worker processes, as a client that reads only
API.md: a zip of WAV recordings trains a source-sharded SISA model, a district
withdraws, the report's fairness check covers the accent groups and a certificate is
signed, and none of the district's audio bytes remain under the artifact root; free-text
CVs train a model that forgets two words, and the feature check shows exactly 0."""

from __future__ import annotations

import io
import json
from pathlib import Path
from typing import Any

import httpx

from app.stack import LocalStack
from tests.integration.flows import erase, train
from tests.integration.test_no_resurrection import blob_hits
from tests.media import gen
from tests.media.test_tokens import cv_rows


def _client(stack: LocalStack) -> httpx.Client:
    return httpx.Client(
        base_url=stack.base_url,
        headers={"Authorization": f"Bearer {stack.create_key('admin', 'ops')}"},
        timeout=60,
    )


def _upload(admin: httpx.Client, data: bytes, filename: str, spec: dict[str, Any]) -> str:
    r = admin.post(
        "/v1/datasets",
        files={"file": (filename, io.BytesIO(data), "application/octet-stream")},
        data={"spec": json.dumps(spec)},
    )
    assert r.status_code == 201, r.text
    return str(r.json()["id"])


def test_audio_and_text_models_end_to_end(stack: LocalStack) -> None:
    admin = _client(stack)
    root = Path(stack.env["PALIMPSEST_ARTIFACT_ROOT"])

    # Speech: WAV files named by a manifest; districts are sources, groups are accents.
    recs = gen.rows("audio", n_subjects=24, seed=21)
    ds = _upload(admin, gen.zip_bytes(recs, "audio"), "answers.zip", gen.spec("speech", "audio"))
    model = train(
        admin,
        {
            "name": "esl",
            "dataset_id": ds,
            "architecture": {
                "kind": "mlp",
                "hidden": [8],
                "encoders": {"media": {"n_mels": 16, "seconds": 0.5, "width": 4}},
            },
            "training": {"epochs": 2, "batch_size": 16, "seed": 1},
            "unlearning": {"mode": "sisa", "shards": 3, "slices": 2, "sharding": "source"},
            "verification": {"utility_max_drop": 1.0, "min_group_size": 1},
        },
    )
    assert model["production_version"] == 1
    district = [r["media"] for r in recs if r["source"] == "district1"]
    assert any(
        hits
        for f in root.rglob("*")
        if f.is_file()
        for hits in [blob_hits(f.name, f.read_bytes(), [], [], district)]
    )
    done = erase(admin, {"kind": "source", "source": "district1", "reason": "withdrawn"})
    assert done["status"] in ("completed", "needs_review"), done
    (m,) = done["models"]
    report = admin.get(f"/v1/reports/{m['report_id']}").json()
    fairness = report["checks"]["fairness"]
    assert "group" in json.dumps(fairness["metrics"]), fairness
    if done["status"] == "completed":
        cert = admin.get(f"/v1/deletion-requests/{done['id']}/certificate")
        assert cert.status_code == 200, cert.text
        left = [
            h
            for f in sorted(root.rglob("*"))
            if f.is_file()
            for h in blob_hits(f.name, f.read_bytes(), [], [], district)
        ]
        assert left == [], left

    # Text: CVs in a Parquet file; the model forgets two words.
    import pyarrow as pa
    import pyarrow.parquet as pq

    rows = cv_rows(n=80, seed=5)
    buf = io.BytesIO()
    pq.write_table(pa.table({k: [r[k] for r in rows] for k in rows[0]}), buf)
    ds = _upload(admin, buf.getvalue(), "cvs.parquet", gen.spec("cvs", "text"))
    train(
        admin,
        {
            "name": "cv-ranker",
            "dataset_id": ds,
            "architecture": {"kind": "mlp", "hidden": [8], "encoders": {"media": {"dim": 8}}},
            "training": {"epochs": 3, "batch_size": 16, "seed": 1},
            "unlearning": {"mode": "sisa", "shards": 2, "slices": 2},
            "verification": {"utility_max_drop": 1.0},
        },
    )
    done = erase(
        admin,
        {
            "kind": "feature",
            "feature": "media",
            "model": "cv-ranker",
            "tokens": ["driving", "licence"],
        },
    )
    assert done["status"] == "completed", done
    (m,) = done["models"]
    check = admin.get(f"/v1/reports/{m['report_id']}").json()["checks"]["feature"]
    assert check["metrics"]["after"]["max_abs_change"] == 0.0, check
    assert check["metrics"]["before"]["max_abs_change"] > 0.0, check
