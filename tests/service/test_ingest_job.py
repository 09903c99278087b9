"""Uploads above the inline size: `POST /v1/datasets` answers 202 and an `ingest` job
(its task body run in-process here, as the worker would) parses, checks and stores the
file in batches, with progress; refusals fail the job and the dataset with the reason
and leave nothing; redelivery and takeover are safe. Uploads over the maximum are 413,
counted while streaming, with nothing left behind."""

from __future__ import annotations

from collections.abc import Iterator
from datetime import timedelta
from typing import Any

import pyarrow as pa
import pytest
from sqlalchemy import event, select

from app.core.db import get_engine, session_scope
from app.core.settings import get_settings
from app.core.storage import get_store
from app.datasets import service as datasets
from app.datasets import streaming
from app.models import AuditEvent, Dataset, Job, Record, Source, Subject
from app.models.base import utcnow
from app.pipeline import ingest
from tests.support.app_env import AppEnv
from tests.support.factories import (
    MODEL_DEFAULTS,
    assert_error,
    auth,
    create_key,
    create_model,
    dataset_spec,
    make_csv,
    make_parquet,
    make_rows,
    post_dataset,
)

INLINE = 16 * 1024
ROWS = make_rows(n_subjects=1500, rows_per_subject=2, seed=7)  # about 120 KB of CSV
BIG_CSV = make_csv(ROWS)


@pytest.fixture
def sizes(monkeypatch: pytest.MonkeyPatch) -> Iterator[None]:
    """A small inline size, and small CSV blocks so that a file of 120 KB is read in
    many batches (the shape of a large upload, at a test's scale)."""
    monkeypatch.setenv("PALIMPSEST_INLINE_INGEST_BYTES", str(INLINE))
    monkeypatch.setattr(streaming, "CSV_BLOCK_BYTES", 16 * 1024)
    monkeypatch.setattr(streaming, "PARQUET_BATCH_ROWS", 500)
    get_settings.cache_clear()
    yield
    get_settings.cache_clear()


@pytest.fixture
def admin(env: AppEnv) -> str:
    return create_key("admin")


def counts(env: AppEnv) -> dict[str, int]:
    return {m.__name__: env.count(m) for m in (Dataset, Record, Subject, Source)}


def stage(env: AppEnv, admin: str, data: bytes, name: str, **spec: Any) -> dict[str, Any]:
    resp = post_dataset(env.client, admin, data, dataset_spec(name, **spec))
    assert resp.status_code == 202, resp.text
    body: dict[str, Any] = resp.json()
    assert set(body) == {"id", "name", "status", "job_id"}
    assert body["name"] == name and body["status"] == "ingesting"
    return body


def comparable(table: pa.Table) -> list[dict[str, Any]]:
    """A partition's rows without the record id (ids differ between two datasets)."""
    rows = table.drop_columns([datasets.RID]).to_pylist()
    return sorted(rows, key=lambda r: (r[datasets.SKEY], r["age"], r["score"]))


def stored(ds_id: str) -> pa.Table:
    with session_scope() as s:
        ds = datasets.get(s, ds_id)
        s.expunge(ds)
    return datasets.read_partitions(get_store(), ds)


def test_large_upload_is_202_then_ready_like_an_inline_one(
    env: AppEnv, admin: str, sizes: None, monkeypatch: pytest.MonkeyPatch
) -> None:
    h = auth(admin)
    body = stage(env, admin, BIG_CSV, "big")
    ds_id, job_id = body["id"], body["job_id"]
    view = env.client.get(f"/v1/datasets/{ds_id}", headers=h).json()
    assert (view["status"], view["job_id"], view["n_records"]) == ("ingesting", job_id, 0)
    staged = [f for f in env.artifact_files() if f.startswith("uploads/")]
    assert len(staged) == 1 and (env.artifact_root / staged[0]).stat().st_size == len(BIG_CSV)
    # A model needs the dataset's records: not before they are there.
    resp = env.client.post(
        "/v1/models", headers=h, json={"name": "early", "dataset_id": ds_id, **MODEL_DEFAULTS}
    )
    assert_error(resp, 409, "dataset_not_ready")

    progress: list[float] = []

    def seen(conn: Any, cursor: Any, statement: str, params: Any, *_: Any) -> None:
        if statement.startswith("UPDATE jobs SET progress"):
            # SQLite binds by position, psycopg by name.
            progress.append(float(params["progress"] if isinstance(params, dict) else params[0]))

    event.listen(get_engine(), "before_cursor_execute", seen)
    # Every progress step written (a small upload is ingested within one interval).
    monkeypatch.setenv("PALIMPSEST_PROGRESS_INTERVAL_SECONDS", "0")
    get_settings.cache_clear()
    try:
        ingest.run_ingest(job_id)
    finally:
        event.remove(get_engine(), "before_cursor_execute", seen)

    # Progress was reported along the way, rising, before the job finished.
    assert progress and all(0 < p < 1 for p in progress), progress
    assert progress == sorted(progress) and len(progress) >= 2
    job = env.client.get(f"/v1/jobs/{job_id}", headers=h).json()
    assert (job["kind"], job["status"], job["progress"]) == ("ingest", "succeeded", 1.0)
    assert job["dataset_id"] == ds_id and job["result"]["records"] == len(ROWS)

    ready = env.client.get(f"/v1/datasets/{ds_id}", headers=h).json()
    assert ready["status"] == "ready" and ready["job_id"] == job_id
    # The same file ingested inline gives the same dataset, byte for byte in its rows.
    get_settings().inline_ingest_bytes = 10 * len(BIG_CSV)
    resp = post_dataset(env.client, admin, BIG_CSV, dataset_spec("inline"))
    assert resp.status_code == 201, resp.text
    inline = resp.json()
    skip = {"id", "name", "job_id", "created_at"}
    assert {k: v for k, v in ready.items() if k not in skip} == {
        k: v for k, v in inline.items() if k not in skip
    }
    assert ready["n_records"] == len(ROWS) and ready["n_subjects"] == 1500
    big, small = stored(ds_id), stored(inline["id"])
    assert big.schema == small.schema
    assert comparable(big) == comparable(small)
    # The upload is gone once ingested; the partitions are all that is stored.
    assert not [f for f in env.artifact_files() if f.startswith("uploads/")]
    assert all(
        f.endswith(".parquet") for f in env.artifact_files() if f.startswith(f"datasets/{ds_id}")
    )
    with session_scope() as s:
        statuses = set(s.scalars(select(Record.status).where(Record.dataset_id == ds_id)))
    assert statuses == {"active"}
    # And it trains.
    create_model(env.client, admin, ds_id, "on-big")


def test_large_parquet_upload(env: AppEnv, admin: str, sizes: None) -> None:
    rows = make_rows(n_subjects=800, rows_per_subject=3, seed=8, subject_prefix="pq")
    body = stage(env, admin, make_parquet(rows), "big-pq")
    ingest.run_ingest(body["job_id"])
    view = env.client.get(f"/v1/datasets/{body['id']}", headers=auth(admin)).json()
    assert view["status"] == "ready" and view["n_records"] == len(rows)
    assert view["label_classes"] == ["no", "yes"]
    assert sorted(view["categorical_columns"]) == ["colour", "region"]


def test_redelivered_ingest_does_nothing(env: AppEnv, admin: str, sizes: None) -> None:
    body = stage(env, admin, BIG_CSV, "twice")
    ingest.run_ingest(body["job_id"])
    before = counts(env), env.count(AuditEvent), env.artifact_files()
    ingest.run_ingest(body["job_id"])
    assert (counts(env), env.count(AuditEvent), env.artifact_files()) == before


def test_an_ingest_whose_worker_died_is_taken_over_and_redone_cleanly(
    env: AppEnv, admin: str, sizes: None
) -> None:
    """A dead worker's attempt left staged records and a partial partition file: the
    next delivery takes the stale job over, removes both, and ingests the file once."""
    body = stage(env, admin, BIG_CSV, "crashed")
    ds_id, job_id = body["id"], body["job_id"]
    leftover = f"datasets/{ds_id}/part-0003.parquet.tmp-1"
    get_store().write_bytes(leftover, b"PAR1 half a file")
    with session_scope() as s:
        job = s.get(Job, job_id)
        assert job is not None
        job.status, job.attempts, job.worker = "running", 1, "gone-host:1"
        job.started_at = job.heartbeat_at = utcnow() - timedelta(hours=1)
        subject = Subject(subject_key="f" * 64)
        source = Source(name="half-done")
        s.add_all([subject, source])
        s.flush()
        s.add_all(
            Record(
                dataset_id=ds_id,
                external_id=str(i),
                subject_id=subject.id,
                source_id=source.id,
                partition=3,
                status="staged",
            )
            for i in range(40)
        )
    ingest.run_ingest(job_id)
    view = env.client.get(f"/v1/datasets/{ds_id}", headers=auth(admin)).json()
    assert view["status"] == "ready" and view["n_records"] == len(ROWS)
    assert "half-done" not in view["sources"]
    assert leftover not in env.artifact_files()
    job_view = env.client.get(f"/v1/jobs/{job_id}", headers=auth(admin)).json()
    assert job_view["status"] == "succeeded" and job_view["attempts"] == 2
    assert job_view["result"]["takeovers"]
    assert stored(ds_id).num_rows == len(ROWS)


def _blank_subject_late(rows: list[dict[str, Any]]) -> bytes:
    """A file good in its first batches whose last rows have a blank subject id."""
    bad = [dict(r) for r in rows]
    bad[-1]["subject"] = "   "
    return make_csv(bad)


REFUSED = {
    "blank subject in a late batch": (
        _blank_subject_late(ROWS),
        {},
        "column 'subject' has blank subject ids",
    ),
    "a single label class": (
        make_csv(make_rows(n_subjects=1500, rows_per_subject=2, labels=("yes",))),
        {},
        "the label column needs at least two distinct values",
    ),
    "unknown feature column": (
        BIG_CSV,
        {"feature_columns": ["age", "nope"]},
        "feature column 'nope' is not a column of the file",
    ),
    "duplicate record ids": (
        make_csv([{**r, "rid": f"r{i % 2000}"} for i, r in enumerate(ROWS)]),
        {"record_id_column": "rid"},
        "column 'rid' has duplicate ids",
    ),
    "not a CSV at all": (
        b"subject,source,age,label\n" + b'"unterminated,quote\n' * 2000,
        {},
        "could not read the file as CSV",
    ),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_bad_large_upload_fails_the_job_and_the_dataset(
    env: AppEnv, admin: str, sizes: None, case: str
) -> None:
    data, spec, message = REFUSED[case]
    before = counts(env)
    body = stage(env, admin, data, "bad", **spec)
    ingest.run_ingest(body["job_id"])
    h = auth(admin)
    view = env.client.get(f"/v1/datasets/{body['id']}", headers=h).json()
    assert view["status"] == "failed" and message in view["error"], view
    job = env.client.get(f"/v1/jobs/{body['job_id']}", headers=h).json()
    assert job["status"] == "failed" and message in job["error"], job
    assert job["error"].startswith(("invalid_file: ", "invalid_spec: "))
    # Nothing of the upload remains but the failed dataset and its job.
    assert not env.artifact_files()
    assert counts(env) == {**before, "Dataset": before["Dataset"] + 1}
    resp = env.client.post(
        "/v1/models",
        headers=h,
        json={"name": "on-bad", "dataset_id": body["id"], **MODEL_DEFAULTS},
    )
    err = assert_error(resp, 409, "dataset_not_ready")
    assert message in err["message"]
    # A failed upload gives up its name: the corrected file takes it.
    again = stage(env, admin, BIG_CSV, "bad")
    ingest.run_ingest(again["job_id"])
    assert env.client.get(f"/v1/datasets/{again['id']}", headers=h).json()["status"] == "ready"
    assert env.client.get(f"/v1/datasets/{body['id']}", headers=h).status_code == 404


# -- the maximum size ------------------------------------------------------------------


@pytest.fixture
def small_maximum(monkeypatch: pytest.MonkeyPatch) -> Iterator[int]:
    limit = 64 * 1024
    monkeypatch.setenv("PALIMPSEST_MAX_UPLOAD_BYTES", str(limit))
    get_settings.cache_clear()
    yield limit
    get_settings.cache_clear()


def multipart(data: bytes, spec: str, boundary: str = "palimpsest-test-boundary") -> bytes:
    head = (
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="spec"\r\n\r\n'
        f"{spec}\r\n"
        f"--{boundary}\r\n"
        'Content-Disposition: form-data; name="file"; filename="big.csv"\r\n'
        "Content-Type: text/csv\r\n\r\n"
    ).encode()
    return head + data + f"\r\n--{boundary}--\r\n".encode()


def test_oversize_upload_is_413_and_leaves_nothing(
    env: AppEnv, admin: str, small_maximum: int
) -> None:
    import json

    before, files = counts(env), env.artifact_files()
    data = make_csv(make_rows(n_subjects=1200, rows_per_subject=2))
    assert len(data) > small_maximum
    # Declared up front (Content-Length): refused before a byte is read.
    resp = post_dataset(env.client, admin, data, dataset_spec("too-big"))
    err = assert_error(resp, 413, "payload_too_large")
    assert "0.0625 MiB" in err["message"]
    # Streamed without a length: counted as it arrives, refused at the limit, and the
    # part already written is deleted.
    body = multipart(data, json.dumps(dataset_spec("too-big")))

    def chunks() -> Iterator[bytes]:
        for i in range(0, len(body), 8192):
            yield body[i : i + 8192]

    resp = env.client.post(
        "/v1/datasets",
        headers={
            **auth(admin),
            "Content-Type": "multipart/form-data; boundary=palimpsest-test-boundary",
        },
        content=chunks(),
    )
    assert_error(resp, 413, "payload_too_large")
    assert counts(env) == before
    assert env.artifact_files() == files
    # Just under the limit is fine (inline, as it is small).
    ok = make_csv(make_rows(n_subjects=300, rows_per_subject=2))
    assert len(ok) < small_maximum
    streamed = multipart(ok, json.dumps(dataset_spec("fits")))
    resp = env.client.post(
        "/v1/datasets",
        headers={
            **auth(admin),
            "Content-Type": "multipart/form-data; boundary=palimpsest-test-boundary",
        },
        content=iter([streamed[:5000], streamed[5000:]]),
    )
    assert resp.status_code == 201, resp.text
    assert resp.json()["n_records"] == 600


def test_a_refused_spec_on_a_large_upload_leaves_nothing(
    env: AppEnv, admin: str, sizes: None
) -> None:
    before, files = counts(env), env.artifact_files()
    resp = post_dataset(env.client, admin, BIG_CSV, "{not json")
    assert_error(resp, 422, "invalid_spec")
    resp = post_dataset(env.client, admin, BIG_CSV, dataset_spec("dup"))
    assert resp.status_code == 202
    resp = post_dataset(env.client, admin, BIG_CSV, dataset_spec("dup"))
    assert_error(resp, 409, "dataset_exists")
    assert counts(env) == {**before, "Dataset": before["Dataset"] + 1}
    assert len(env.artifact_files() - files) == 1  # the first upload's staged file only


def test_the_resume_sweep_takes_a_stale_ingest_over(env: AppEnv, admin: str, sizes: None) -> None:
    """A running ingest whose worker went silent goes back to pending (no model lock to
    release) and is sent again; the dashboard lists it under its dataset."""
    from app.jobs import recovery
    from tests.dashboard.helpers import login

    body = stage(env, admin, BIG_CSV, "stale")
    with session_scope() as s:
        job = s.get(Job, body["job_id"])
        assert job is not None
        job.status, job.attempts, job.worker = "running", 1, "gone-host:1"
        job.started_at = job.heartbeat_at = utcnow() - timedelta(hours=1)
    with session_scope() as s:
        assert recovery.take_over_stale(s) == [body["job_id"]]
    job_view = env.client.get(f"/v1/jobs/{body['job_id']}", headers=auth(admin)).json()
    assert job_view["status"] == "pending" and job_view["result"]["takeovers"]
    ingest.run_ingest(body["job_id"])
    view = env.client.get(f"/v1/datasets/{body['id']}", headers=auth(admin)).json()
    assert view["status"] == "ready" and view["n_records"] == len(ROWS)
    page = login(env, admin)
    for path in ("/admin/jobs", f"/admin/jobs/{body['job_id']}"):
        resp = page.get(path)
        assert resp.status_code == 200 and body["id"] in resp.text, path


def test_an_ingest_out_of_retries_fails_its_dataset(env: AppEnv, admin: str, sizes: None) -> None:
    """The task's last failure (an error of the service, not of the file) is the job's
    and the dataset's; the staged upload is removed with it."""
    from app.pipeline.conclude import fail_job
    from app.requests.lifecycle import EVENTS

    body = stage(env, admin, BIG_CSV, "unlucky")
    fail_job(body["job_id"], "OperationalError: disk I/O error", EVENTS)
    view = env.client.get(f"/v1/datasets/{body['id']}", headers=auth(admin)).json()
    assert view["status"] == "failed" and "disk I/O error" in view["error"]
    job = env.client.get(f"/v1/jobs/{body['job_id']}", headers=auth(admin)).json()
    assert job["status"] == "failed"
    assert not env.artifact_files()
