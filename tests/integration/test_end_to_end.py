"""Ingest -> train a SISA model -> erase a subject and a source, through real HTTP and a
real Celery worker process, on both deployment shapes."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path
from typing import Any

import httpx
import pyarrow.parquet as pq
from sqlalchemy import create_engine, text

from app.core.security import subject_key
from app.stack import LocalStack
from tests.integration.flows import erase, ingest, make_csv, train


def _parquet_rows(root: Path) -> tuple[list[str], list[str]]:
    keys: list[str] = []
    sources: list[str] = []
    for f in sorted(root.rglob("*.parquet")):
        t = pq.read_table(f)
        keys += t.column("__subject_key").to_pylist()
        sources += t.column("__source").to_pylist()
    return keys, sources


def _verify_cli(stack: LocalStack, *args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run(
        [sys.executable, "-m", "app.cli", "verify-certificate", *args],
        env=stack.env,
        cwd=stack.folder,
        capture_output=True,
        text=True,
        timeout=120,
    )


def _check_certificate(stack: LocalStack, portal: httpx.Client, rid: str, key: str) -> None:
    """The completed request's certificate, fetched over HTTP, verifies offline with the
    published key; one flipped byte makes the command refuse it."""
    resp = portal.get(f"/v1/deletion-requests/{rid}/certificate")
    assert resp.status_code == 200, resp.text
    signed: dict[str, Any] = resp.json()
    cert = signed["certificate"]
    assert cert["request"]["id"] == rid and cert["subject"] == {"subject_key": key}
    assert "p0007" not in resp.text
    (m,) = cert["models"]
    assert (m["from_version"], m["to_version"], m["method"], m["exactness"]) == (
        1,
        2,
        "sisa",
        "exact",
    )
    assert m["report"]["passed"] and m["report"]["checks"]["lineage"] is True
    assert m["artifacts"]["manifest"]["sha256"] and all(
        d for sh in m["artifacts"]["shards"] for d in sh["checkpoints"].values()
    )
    assert cert["erasure"]["records_erased"] == 5
    published = httpx.get(f"{stack.base_url}/v1/signing-key", timeout=30).json()  # no key
    assert published["key_id"] == signed["signature"]["key_id"]
    pem = stack.folder / "published-key.pem"
    pem.write_text(published["public_key_pem"])
    cert_file = stack.folder / "certificate.json"
    cert_file.write_text(resp.text)
    ok = _verify_cli(stack, str(cert_file), "--public-key", str(pem))
    assert ok.returncode == 0 and ok.stdout.strip() == "valid", ok.stderr
    assert _verify_cli(stack, str(cert_file)).returncode == 0  # the configured key file
    # Flip one byte inside the signed content (a digit of the subject key).
    blob = bytearray(resp.content)
    at = blob.index(key.encode()) + 10
    blob[at] = ord("0") if blob[at] != ord("0") else ord("1")
    cert_file.write_bytes(bytes(blob))
    json.loads(cert_file.read_bytes())  # still JSON: it is the signature that refuses it
    bad = _verify_cli(stack, str(cert_file), "--public-key", str(pem))
    assert bad.returncode == 1 and bad.stdout.strip() != "valid", (bad.stdout, bad.stderr)


def test_erase_subject_and_source_end_to_end(stack: LocalStack) -> None:
    admin = httpx.Client(
        base_url=stack.base_url,
        headers={"Authorization": f"Bearer {stack.create_key('admin', 'ops')}"},
        timeout=30,
    )
    portal = httpx.Client(
        base_url=stack.base_url,
        headers={"Authorization": f"Bearer {stack.create_key('portal', 'dpo')}"},
        timeout=30,
    )
    ds = ingest(admin, "districts", make_csv())
    assert ds["n_records"] == 1500 and ds["n_subjects"] == 300
    assert sorted(ds["sources"]) == ["east", "north", "south", "west"]
    model = train(
        admin,
        {
            "name": "pass-predictor",
            "dataset_id": ds["id"],
            "architecture": {"kind": "mlp", "hidden": [16]},
            "training": {"epochs": 3, "batch_size": 64, "lr": 0.01, "seed": 1},
            "unlearning": {"mode": "sisa", "shards": 4, "slices": 3, "sharding": "subject"},
            # ~220 test rows: one row is 0.45 points, so the default 2-point gate is noise here.
            "verification": {"utility_max_drop": 0.06},
        },
    )
    assert model["production_version"] == 1
    assert model["versions"][0]["metrics"]["test_accuracy"] > 0.7

    key = subject_key("p0007", stack.pepper)
    lineage = admin.get("/v1/subjects/p0007/lineage").json()
    assert lineage["records"] == 5 and lineage["models"][0]["versions"] == [1]
    assert len(lineage["models"][0]["shards"]) == 1  # subject sharding: one shard per person

    done = erase(portal, {"kind": "subject", "subject_id": "p0007", "reason": "Art. 17"})
    assert done["status"] == "completed", done
    (m,) = done["models"]
    assert (m["model"], m["status"], m["from_version"], m["to_version"], m["method"]) == (
        "pass-predictor",
        "promoted",
        1,
        2,
        "sisa",
    )
    job = admin.get(f"/v1/jobs/{m['job_id']}").json()
    assert job["status"] == "succeeded" and job["progress"] == 1.0
    assert (
        job["result"]["unlearning"]["affected_shards"]
        and len(job["result"]["unlearning"]["affected_shards"]) == 1
    )
    report = admin.get(f"/v1/reports/{m['report_id']}").json()
    assert report["passed"] and report["decision"] == "promote"
    assert report["checks"]["lineage"]["metrics"]["present_in_manifests"] == 0

    done_src = erase(portal, {"kind": "source", "source": "north"})
    assert done_src["status"] == "completed", done_src
    # A district spans every subject-sharded shard: they retrain as one Celery task each.
    src_job = admin.get(f"/v1/jobs/{done_src['models'][0]['job_id']}").json()
    un = src_job["result"]["unlearning"]
    assert un["parallelism"] == "celery_chord" and un["affected_shards"] == [0, 1, 2, 3]
    assert len(un["shard_seconds"]) == 4 and src_job["progress"] == 1.0
    src_report = admin.get(f"/v1/reports/{done_src['models'][0]['report_id']}").json()
    assert src_report["checks"]["lineage"]["passed"]
    after = admin.get("/v1/models/pass-predictor").json()
    assert after["production_version"] == 3
    statuses = {v["version"]: v["status"] for v in after["versions"]}
    assert statuses == {1: "purged", 2: "purged", 3: "production"}

    # Physically gone: database rows and Parquet bytes.
    engine = create_engine(stack.env["PALIMPSEST_DATABASE_URL"])
    with engine.connect() as conn:
        n_subject = conn.execute(
            text("SELECT count(*) FROM subjects WHERE subject_key = :k"), {"k": key}
        ).scalar()
        n_north = conn.execute(
            text(
                "SELECT count(*) FROM records r JOIN sources s ON s.id = r.source_id"
                " WHERE s.name = 'north'"
            )
        ).scalar()
        n_left = conn.execute(text("SELECT count(*) FROM records")).scalar()
    engine.dispose()
    assert n_subject == 0 and n_north == 0 and n_left == 1500 - 5 - 375
    keys, sources = _parquet_rows(Path(stack.env["PALIMPSEST_ARTIFACT_ROOT"]))
    assert key not in keys and "north" not in sources and len(keys) == n_left
    assert portal.get(f"/v1/deletion-requests/{done['id']}").json()["completed_at"]
    _check_certificate(stack, portal, done["id"], key)
    assert admin.get("/v1/audit/verify").json()["intact"] is True
    # The erased subject is unknown now: a clear 404, not a silent success.
    again = portal.post("/v1/deletion-requests", json={"kind": "subject", "subject_id": "p0007"})
    assert again.status_code == 404 and again.json()["error"]["code"] == "subject_not_found"
    pred = admin.post(
        "/v1/models/pass-predictor/predict",
        json={"records": [{"age": 16, "score": 1.2, "home_language": "en", "track": "a"}]},
    )
    assert pred.status_code == 200 and pred.json()["version"] == 3
