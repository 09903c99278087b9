"""A busy database is a JSON 503 with Retry-After, never a plain-text 500: real
concurrency against a real API process on SQLite.

First the write lock is held from outside (as a long transaction of another process
would) while requests arrive: each waits out SQLite's busy timeout or the connection
pool's, and must answer 503 in the error shape. Then many concurrent POSTs with one
Idempotency-Key: every answer is 2xx or that 503, and exactly one request exists.
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.stack import LocalStack
from tests.support.factories import dataset_spec, make_csv, make_rows

pytestmark = pytest.mark.integration


@pytest.fixture
def embedded(tmp_path: Path) -> Iterator[LocalStack]:
    # A short wait for the lock (the setting, 30 s by default): the answers are the same
    # 503s, sooner.
    st = LocalStack(
        tmp_path / "stack",
        env={"PALIMPSEST_DEVICE": "cpu", "PALIMPSEST_DATABASE_BUSY_TIMEOUT_SECONDS": "3"},
    )
    st.start()
    try:
        yield st
    finally:
        st.stop()


def _post_all(stack: LocalStack, key: str, n: int, body: dict[str, Any]) -> list[httpx.Response]:
    def one(_: int) -> httpx.Response:
        with httpx.Client(base_url=stack.base_url, timeout=180) as c:
            return c.post(
                "/v1/deletion-requests",
                json=body,
                headers={"Authorization": f"Bearer {key}", "Idempotency-Key": "one-key"},
            )

    with ThreadPoolExecutor(max_workers=n) as pool:
        return list(pool.map(one, range(n)))


def _is_busy(r: httpx.Response) -> bool:
    if r.status_code != 503 or not r.headers.get("content-type", "").startswith("application/json"):
        return False
    err = r.json()["error"]
    return err["code"] == "busy" and int(r.headers["retry-after"]) > 0


def test_a_locked_database_answers_503_and_one_key_makes_one_request(
    embedded: LocalStack,
) -> None:
    stack = embedded
    key = stack.create_key("admin", "ops")
    h = {"Authorization": f"Bearer {key}"}
    rows = make_rows(n_subjects=8, seed=3)
    r = httpx.post(
        f"{stack.base_url}/v1/datasets",
        headers=h,
        files={"file": ("d.csv", make_csv(rows), "text/csv")},
        data={"spec": json.dumps(dataset_spec("busy"))},
        timeout=60,
    )
    assert r.status_code == 201, r.text
    body = {"kind": "subject", "subject_id": rows[0]["subject"]}

    # Another process holds the write lock past every timeout.
    lock = sqlite3.connect(stack.folder / "palimpsest.sqlite", isolation_level=None, timeout=60)
    try:
        lock.execute("BEGIN IMMEDIATE")
        answers = _post_all(stack, key, 24, body)
    finally:
        lock.execute("ROLLBACK")
        lock.close()
    bad = [(a.status_code, a.text[:200]) for a in answers if not _is_busy(a)]
    assert not bad, bad

    answers = _post_all(stack, key, 100, body)
    bad = [(a.status_code, a.text[:200]) for a in answers if not (a.is_success or _is_busy(a))]
    assert not bad, bad
    ids = {a.json()["id"] for a in answers if a.is_success}
    assert len(ids) == 1, ids
    listed = httpx.get(f"{stack.base_url}/v1/deletion-requests", headers=h, timeout=60).json()
    assert [i["id"] for i in listed["items"]] == list(ids)
