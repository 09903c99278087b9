"""Two `palimpsest worker` processes share one job, on PostgreSQL + Redis.

A source withdrawal reaches every shard of a SISA model, so its job fans out as a Celery
chord of `palimpsest.sisa_shard` tasks on the `gpu` queue. Run by two workers, each
trains some of the shards (the job's result names the worker, host:pid, that trained
each shard); run by one worker, it trains them all. Both runs start from the same state,
a copy of one trained service (database and artifact folder: the same model id, hence
the same seeds), and the versions they promote are bit-identical: the same manifest and
the same checkpoint bytes for every shard.
"""

from __future__ import annotations

import json
import os
import shutil
import uuid
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest
from sqlalchemy import create_engine, text

from app.ml.checkpoints import FsspecCheckpointStore
from app.stack import LocalStack
from tests.integration.conftest import _drop_postgres_database, _reachable, _unavailable
from tests.integration.flows import TERMINAL, ingest, make_csv, train, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.timeout(600)]

MODEL = {
    "name": "shared",
    "architecture": {"kind": "mlp", "hidden": [16]},
    "training": {"epochs": 3, "batch_size": 64, "lr": 0.01, "seed": 5},
    "unlearning": {"mode": "sisa", "shards": 4, "slices": 3, "sharding": "subject"},
    "verification": {"utility_max_drop": 0.2},
}
ENV = {
    "PALIMPSEST_DEVICE": "cpu",
    "PALIMPSEST_TORCH_THREADS": "1",
    "PALIMPSEST_API_WORKERS": "1",
    # Each shard sleeps after its progress writes, so a shard outlasts the moment the
    # other worker needs to take the next one off the queue (bits are unaffected).
    "PALIMPSEST_TEST_SLOW_UNLEARNING_SECONDS": "0.5",
}


def _plain(url: str) -> str:
    return url.replace("postgresql+psycopg://", "postgresql://")


def _env(pg: str, db: str, redis_url: str) -> dict[str, str]:
    broker = f"{redis_url.rstrip('/')}/{1 + uuid.uuid4().int % 15}"
    return {
        **ENV,
        "PALIMPSEST_DATABASE_URL": f"{pg.rsplit('/', 1)[0]}/{db}",
        # A server database is production: it refuses to start without secrets.
        "PALIMPSEST_SUBJECT_PEPPER": f"test-pepper-{uuid.uuid4().hex}",
        "PALIMPSEST_DASHBOARD_SESSION_SECRET": f"test-session-{uuid.uuid4().hex}",
        "PALIMPSEST_BROKER_URL": broker,
        "PALIMPSEST_RESULT_BACKEND": broker,
    }


def _withdraw(stack: LocalStack, admin_key: str) -> dict[str, Any]:
    """Withdraw source `north`; the promoted version's manifest and the job."""
    with httpx.Client(
        base_url=stack.base_url, headers={"Authorization": f"Bearer {admin_key}"}, timeout=30
    ) as admin:
        r = admin.post("/v1/deletion-requests", json={"kind": "source", "source": "north"})
        assert r.status_code == 202, r.text
        rid = r.json()["id"]
        done = wait_for(
            lambda: admin.get(f"/v1/deletion-requests/{rid}").json(),
            lambda d: d["status"] in TERMINAL,
            timeout=400,
        )
        assert done["status"] == "completed", (done, stack.tail())
        (m,) = done["models"]
        assert m["status"] == "promoted" and m["to_version"] == 2, m
        job: dict[str, Any] = admin.get(f"/v1/jobs/{m['job_id']}").json()
    engine = create_engine(stack.env["PALIMPSEST_DATABASE_URL"])
    try:
        with engine.connect() as conn:
            model_id, rel = conn.execute(
                text(
                    "SELECT v.model_id, v.manifest_path FROM model_versions v"
                    " JOIN models m ON m.id = v.model_id WHERE m.name = :n AND v.version = 2"
                ),
                {"n": MODEL["name"]},
            ).one()
    finally:
        engine.dispose()
    artifacts = Path(stack.env["PALIMPSEST_ARTIFACT_ROOT"])
    manifest = json.loads((artifacts / rel).read_text())
    store = FsspecCheckpointStore.local(str(artifacts / "models" / model_id / "checkpoints"))
    weights = {
        key: store.read_bytes(key) for e in manifest["entries"] for key in e["checkpoint_keys"]
    }
    return {"job": job, "manifest": manifest, "weights": weights}


def test_two_workers_share_a_fanned_out_job_bit_identically(tmp_path: Path) -> None:
    pg = os.environ.get("PALIMPSEST_TEST_POSTGRES_URL", "")
    redis_url = os.environ.get("PALIMPSEST_TEST_REDIS_URL", "")
    if not pg or not _reachable(pg, 5432):
        _unavailable(f"PostgreSQL not reachable at {pg or '(PALIMPSEST_TEST_POSTGRES_URL unset)'}")
    if not redis_url or not _reachable(redis_url, 6379):
        _unavailable(f"Redis not reachable at {redis_url or '(PALIMPSEST_TEST_REDIS_URL unset)'}")
    one_db, two_db = (f"palimpsest_it_{uuid.uuid4().hex[:10]}" for _ in range(2))
    with psycopg.connect(_plain(pg), autocommit=True) as conn:
        conn.execute(f'CREATE DATABASE "{one_db}"')
    try:
        # One trained service, stopped, then copied: database (as a template) and folder.
        one = LocalStack(tmp_path / "one", env=_env(pg, one_db, redis_url))
        one.start()
        try:
            admin_key = one.create_key("admin", "two-workers")
            with httpx.Client(
                base_url=one.base_url, headers={"Authorization": f"Bearer {admin_key}"}
            ) as admin:
                ds = ingest(admin, "districts", make_csv())
                train(admin, {**MODEL, "dataset_id": ds["id"]})
        finally:
            one.stop()
        with psycopg.connect(_plain(pg), autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{two_db}" TEMPLATE "{one_db}"')
        shutil.copytree(tmp_path / "one", tmp_path / "two")
        two = LocalStack(tmp_path / "two", env=_env(pg, two_db, redis_url))

        one.start()  # one worker
        try:
            alone = _withdraw(one, admin_key)
        finally:
            one.stop()
        # A second worker beside the stack's own (one beat for the stack), started first
        # so that it is up before the job fans out.
        two.start_worker(name="worker-2", beat=False)
        try:
            two.start()
            shared = _withdraw(two, admin_key)
        finally:
            two.stop()
    finally:
        _drop_postgres_database(pg, one_db)
        _drop_postgres_database(pg, two_db)

    for run in (alone, shared):
        un = run["job"]["result"]["unlearning"]
        assert un["parallelism"] == "celery_chord" and un["affected_shards"] == [0, 1, 2, 3], un
        assert sorted(un["shard_workers"]) == ["0", "1", "2", "3"], un
    by_one = set(alone["job"]["result"]["unlearning"]["shard_workers"].values())
    by_two = set(shared["job"]["result"]["unlearning"]["shard_workers"].values())
    assert len(by_one) == 1, by_one
    assert len(by_two) == 2, by_two  # each worker trained at least one shard
    # Bit-identical: the same manifest (record ids, checkpoint chain keys, runtime) and
    # the same bytes behind every checkpoint key.
    assert shared["manifest"] == alone["manifest"]
    assert shared["weights"].keys() == alone["weights"].keys()
    for key, blob in alone["weights"].items():
        assert shared["weights"][key] == blob, key
