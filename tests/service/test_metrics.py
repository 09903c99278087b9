"""/metrics reports the service's state from the database, in Prometheus format."""

from __future__ import annotations

from datetime import timedelta
from pathlib import Path

from prometheus_client.parser import text_string_to_metric_families

from app.core.broker import queue_depth
from app.core.db import session_scope
from app.models import DeletionRequest
from app.models.base import utcnow
from tests.support.app_env import AppEnv
from tests.support.factories import auth, create_key, make_csv, upload_dataset


def _samples(env: AppEnv) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    r = env.client.get("/metrics")
    assert r.status_code == 200
    out = {}
    for family in text_string_to_metric_families(r.text):
        for s in family.samples:
            out[(s.name, tuple(sorted(s.labels.items())))] = s.value
    return out


def test_requests_by_status_and_overdue(env: AppEnv) -> None:
    admin = create_key("admin")
    upload_dataset(env.client, admin, "people", make_csv(n_subjects=5))
    ids = [
        env.client.post(
            "/v1/deletion-requests",
            headers=auth(admin),
            json={"kind": "subject", "subject_id": f"subj-000{i}"},
        ).json()["id"]
        for i in range(2)
    ]
    with session_scope() as s:
        req = s.get(DeletionRequest, ids[0])
        assert req is not None
        req.due_at = utcnow() - timedelta(hours=1)
    m = _samples(env)
    assert m[("palimpsest_requests", (("status", "received"),))] == 2
    assert m[("palimpsest_requests", (("status", "completed"),))] == 0
    assert m[("palimpsest_requests_overdue", ())] == 1
    assert m[("palimpsest_webhook_deliveries", (("status", "failed"),))] == 0


def test_queue_depth_of_the_sqlite_broker(tmp_path: Path) -> None:
    from kombu import Connection

    url = f"sqla+sqlite:///{tmp_path / 'broker.sqlite'}"
    with Connection(url) as conn:
        q = conn.SimpleQueue("gpu")
        for i in range(3):
            q.put({"n": i})
        q.close()
    assert queue_depth(url)["gpu"] == 3
