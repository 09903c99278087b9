"""Artifacts on an S3 API: the whole request path with the artifact root in a bucket.

moto's standalone server (a real S3 HTTP API, in memory) listens on 127.0.0.1; the API
and worker processes reach it through s3fs with PALIMPSEST_ARTIFACT_ROOT=s3://... and
PALIMPSEST_ARTIFACT_OPTIONS naming the endpoint, as a deployment on S3, MinIO or Ceph
would. Ingest, train, erase, purge and certificate run as usual; nothing lands in the
local folder; then the no-resurrection scan lists and reads every object of the bucket.
"""

from __future__ import annotations

import io
import json
import os
import subprocess
import sys
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.stack import LocalStack, free_port
from tests.integration.conftest import (
    _drop_postgres_database,
    _postgres_database,
    _reachable,
    _unavailable,
)
from tests.integration.flows import erase, train
from tests.integration.test_no_resurrection import TARGET, _database_hits, _dataset, blob_hits

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

CREDENTIALS = {
    "AWS_ACCESS_KEY_ID": "testing",
    "AWS_SECRET_ACCESS_KEY": "testing",
    "AWS_DEFAULT_REGION": "us-east-1",
    # Credentials are given: botocore must never ask an instance-metadata address.
    "AWS_EC2_METADATA_DISABLED": "true",
    "NO_PROXY": "127.0.0.1,localhost",
}


@pytest.fixture
def s3_endpoint() -> Iterator[str]:
    moto_server = pytest.importorskip("moto.server", reason="moto[server] (the dev extra)")
    pytest.importorskip("s3fs", reason="s3fs (the s3 or dev extra)")
    port = free_port()
    server = moto_server.ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    server.start()
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        server.stop()


def _bucket(endpoint: str) -> Any:
    """A fresh s3fs client (no caches) on the server."""
    import s3fs

    return s3fs.S3FileSystem(
        key="testing",
        secret="testing",
        endpoint_url=endpoint,
        use_listings_cache=False,
        skip_instance_cache=True,
    )


def _bucket_hits(endpoint: str, prefix: str, needles: list[str], numbers: list[float]) -> list[str]:
    """Every object under the prefix, listed and read through the S3 API."""
    fs = _bucket(endpoint)
    hits = []
    for key in sorted(fs.find(prefix)):
        hits += blob_hits(key, bytes(fs.cat_file(key)), needles, numbers)
    return hits


@pytest.fixture(params=["embedded", "postgres-redis"])
def s3_stack(
    request: pytest.FixtureRequest, tmp_path: Path, s3_endpoint: str
) -> Iterator[tuple[LocalStack, str]]:
    # moto keeps its state per process, across servers: a bucket of this test's own.
    bucket = f"palimpsest-it-{uuid.uuid4().hex[:8]}"
    prefix = f"{bucket}/deployment"
    env: dict[str, str] = {
        **CREDENTIALS,
        "PALIMPSEST_DEVICE": "cpu",
        "PALIMPSEST_TORCH_THREADS": "1",
        "PALIMPSEST_ARTIFACT_ROOT": f"s3://{prefix}/artifacts",
        "PALIMPSEST_ARTIFACT_OPTIONS": json.dumps({"endpoint_url": s3_endpoint}),
    }
    cleanup = None
    if request.param == "postgres-redis":
        pg = os.environ.get("PALIMPSEST_TEST_POSTGRES_URL", "")
        redis_url = os.environ.get("PALIMPSEST_TEST_REDIS_URL", "")
        if not pg or not _reachable(pg, 5432):
            _unavailable(f"PostgreSQL not reachable at {pg or '(unset)'}")
        if not redis_url or not _reachable(redis_url, 6379):
            _unavailable(f"Redis not reachable at {redis_url or '(unset)'}")
        name = _postgres_database(pg)
        broker = f"{redis_url.rstrip('/')}/{1 + uuid.uuid4().int % 15}"
        env |= {
            "PALIMPSEST_DATABASE_URL": f"{pg.rsplit('/', 1)[0]}/{name}",
            # A server database is production: it refuses to start without secrets.
            "PALIMPSEST_SUBJECT_PEPPER": f"test-pepper-{uuid.uuid4().hex}",
            "PALIMPSEST_DASHBOARD_SESSION_SECRET": f"test-session-{uuid.uuid4().hex}",
            "PALIMPSEST_BROKER_URL": broker,
            "PALIMPSEST_RESULT_BACKEND": broker,
        }

        def cleanup() -> None:
            _drop_postgres_database(pg, name)

    _bucket(s3_endpoint).mkdir(bucket)
    st = LocalStack(tmp_path / "stack", env=env)
    try:
        st.start()
        yield st, prefix
    finally:
        st.stop()
        if cleanup is not None:
            cleanup()


def test_request_path_with_artifacts_on_s3(
    s3_stack: tuple[LocalStack, str], s3_endpoint: str
) -> None:
    stack, prefix = s3_stack
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
    fs = _bucket(s3_endpoint)
    objects = fs.find(prefix)
    assert any(k.endswith(".parquet") for k in objects), objects  # the dataset's partitions
    assert any(k.endswith(".safetensors") for k in objects), objects  # the shards' weights
    assert any("/versions/1/manifest" in k for k in objects), objects
    assert not (stack.folder / "artifacts").exists()  # nothing went to the local folder
    # The scan can fail: before erasure it finds the target's values in the bucket.
    before = _bucket_hits(s3_endpoint, prefix, refs, scores)
    assert any(".parquet" in h for h in before), before

    done = erase(admin, {"kind": "subject", "subject_id": TARGET, "reason": "Art. 17"})
    assert done["status"] == "completed", (done, stack.tail())
    rid = done["id"]

    # Purged: the version trained on the erased records lost its objects for good.
    versions = {v["version"]: v for v in admin.get("/v1/models/m").json()["versions"]}
    assert versions[1]["status"] == "purged" and versions[2]["status"] == "production"
    assert not [k for k in fs.find(prefix) if "/versions/1/" in k]
    assert admin.post("/v1/models/m/versions/1/promote").status_code == 409
    # The served version loads its weights from the bucket.
    pred = admin.post(
        "/v1/models/m/predict",
        json={"records": [{"age": 16, "score": 0.5, "home_language": "en", "track": "a"}]},
    )
    assert pred.status_code == 200 and pred.json()["version"] == 2, pred.text

    # The certificate (its artifact digests read from the bucket) verifies offline.
    cert = admin.get(f"/v1/deletion-requests/{rid}/certificate")
    assert cert.status_code == 200, cert.text
    (m,) = cert.json()["certificate"]["models"]
    assert m["artifacts"]["manifest"]["sha256"]
    cert_file = stack.folder / "certificate.json"
    cert_file.write_text(cert.text)
    ok = subprocess.run(
        [sys.executable, "-m", "app.cli", "verify-certificate", str(cert_file)],
        env=stack.env,
        cwd=stack.folder,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert ok.returncode == 0 and ok.stdout.strip() == "valid", ok.stderr

    # Nothing resurrected: no table row and no object in the bucket holds the target's data.
    after = _database_hits(stack.env["PALIMPSEST_DATABASE_URL"], [*refs, TARGET])
    after += _bucket_hits(s3_endpoint, prefix, [*refs, TARGET], scores)
    assert after == [], after
