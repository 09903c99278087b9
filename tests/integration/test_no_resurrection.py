"""Nothing resurrected: once a subject's request completes, the values that only that
subject's records held appear in no database table and no file under the artifact root,
and no version trained on them can be promoted again. Real API and worker processes, on
both deployment shapes."""

from __future__ import annotations

import io
import json
import struct
from pathlib import Path
from typing import Any

import httpx
import numpy as np
import pyarrow.parquet as pq
from sqlalchemy import create_engine, inspect, text

from app.stack import LocalStack
from tests.integration.flows import erase, train

TARGET = "p0007"


def _dataset() -> tuple[bytes, list[str], list[float]]:
    """People with a unique reference per record; the target's scores are values no one
    else has (many decimals), so finding one anywhere means the target's data is there."""
    rng = np.random.default_rng(3)
    lines = ["person,record_ref,district,age,score,home_language,track,passed"]
    refs: list[str] = []
    scores: list[float] = []
    for s in range(200):
        person = f"p{s:04d}"
        for j in range(4):
            ref = f"ref-{rng.integers(1 << 48):012x}"
            score = round(float(rng.normal()), 4)
            if person == TARGET:
                score = round(0.31830988618 + j / 7.0, 9)  # not on the 4-decimal grid
                refs.append(ref)
                scores.append(score)
            track = rng.choice(["a", "b"])
            logit = 1.5 * score + (0.8 if track == "a" else -0.4) + rng.normal(scale=0.5)
            lines.append(
                f"{person},{ref},{['north', 'south', 'east', 'west'][s % 4]},"
                f"{rng.integers(15, 19)},{score!r},{rng.choice(['en', 'es'])},{track},"
                f"{int(logit > 0)}"
            )
    return ("\n".join(lines) + "\n").encode(), refs, scores


def _database_hits(url: str, needles: list[str]) -> list[str]:
    """Every (table, needle) where some column of some row holds the needle as text."""
    engine = create_engine(url)
    hits = []
    try:
        with engine.connect() as conn:
            for table in inspect(conn).get_table_names():
                for row in conn.execute(text(f'SELECT * FROM "{table}"')):
                    blob = json.dumps([str(v) for v in row])
                    hits += [f"{table}: {n}" for n in needles if n in blob]
    finally:
        engine.dispose()
    return hits


def _file_hits(root: Path, needles: list[str], numbers: list[float]) -> list[str]:
    """Every file under a local artifact root, searched by `blob_hits`."""
    hits = []
    for f in sorted(p for p in root.rglob("*") if p.is_file()):
        hits += blob_hits(f.name, f.read_bytes(), needles, numbers)
    return hits


def blob_hits(
    name: str,
    data: bytes,
    needles: list[str],
    numbers: list[float],
    media: list[bytes] | None = None,
) -> list[str]:
    """Parquet files are read (their pages are compressed); every other file is searched
    byte for byte, for the text, for the IEEE-754 doubles of the numbers and for the
    media files' bytes (`media`: images, audio)."""
    hits = []
    media = media or []
    if name.endswith(".parquet"):
        for row in pq.read_table(io.BytesIO(data)).to_pylist():
            values = [str(v) for v in row.values()]
            hits += [f"{name}: {n}" for n in needles if n in values]
            hits += [f"{name}: {x}" for x in numbers if x in row.values()]
            hits += [f"{name}: media file" for m in media if m in row.values()]
        return hits
    hits += [f"{name}: media file ({len(m)} bytes)" for m in media if m in data]
    hits += [f"{name}: {n}" for n in needles if n.encode() in data]
    hits += [f"{name}: {x} (text)" for x in numbers if repr(x).encode() in data]
    hits += [f"{name}: {x} (double)" for x in numbers if struct.pack("<d", x) in data]
    return hits


def test_erased_values_appear_nowhere(stack: LocalStack) -> None:
    admin = httpx.Client(
        base_url=stack.base_url,
        headers={"Authorization": f"Bearer {stack.create_key('admin', 'ops')}"},
        timeout=30,
    )
    data, refs, scores = _dataset()
    spec = {
        "name": "people",
        "subject_column": "person",
        "record_id_column": "record_ref",
        "label_column": "passed",
        "source_column": "district",
        "group_columns": ["home_language"],
    }
    r = admin.post(
        "/v1/datasets",
        files={"file": ("people.csv", io.BytesIO(data), "text/csv")},
        data={"spec": json.dumps(spec)},
    )
    assert r.status_code == 201, r.text
    model = train(
        admin,
        {
            "name": "m",
            "dataset_id": r.json()["id"],
            "architecture": {"kind": "mlp", "hidden": [8]},
            "training": {"epochs": 2, "batch_size": 64, "seed": 1},
            "unlearning": {"mode": "sisa", "shards": 3, "slices": 2},
            "verification": {"utility_max_drop": 0.2},
        },
    )
    assert model["production_version"] == 1
    db_url = stack.env["PALIMPSEST_DATABASE_URL"]
    root = Path(stack.env["PALIMPSEST_ARTIFACT_ROOT"])
    # The scan can fail: before erasure it finds the target's values where they live.
    before = _database_hits(db_url, refs) + _file_hits(root, refs, scores)
    assert any(h.startswith("records:") for h in before), before
    assert any(".parquet" in h for h in before), before
    assert all(TARGET not in h for h in _database_hits(db_url, [TARGET]))  # only HMACs kept

    done = erase(admin, {"kind": "subject", "subject_id": TARGET, "reason": "Art. 17"})
    assert done["status"] == "completed", done
    after = _database_hits(db_url, [*refs, TARGET]) + _file_hits(root, [*refs, TARGET], scores)
    assert after == [], after
    # The version trained on the erased records lost its artifacts and cannot come back.
    versions: dict[int, Any] = {
        v["version"]: v for v in admin.get("/v1/models/m").json()["versions"]
    }
    assert versions[1]["status"] == "purged" and versions[2]["status"] == "production"
    refused = admin.post("/v1/models/m/versions/1/promote")
    assert refused.status_code == 409, refused.text
    assert admin.get("/v1/models/m").json()["production_version"] == 2
