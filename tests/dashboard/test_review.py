"""Review through the dashboard on real state: a model trained and a request unlearned by
the task bodies in-process (as the worker calls them), held in `needs_review` because the
model asks for approval. Actions go through the request service: audit, state checks and
the promotion all apply."""

from __future__ import annotations

import json
import re
from typing import Any

import pytest
from fastapi.testclient import TestClient
from sqlalchemy import func, select, update

from app.core.db import session_scope
from app.core.storage import get_store
from app.models import AuditEvent, Certificate, DeletionRequest, Job, MLModel
from app.pipeline import training, unlearning
from app.requests import lifecycle
from app.requests.lifecycle import EVENTS
from tests.dashboard.helpers import csrf_token, login
from tests.support.app_env import AppEnv
from tests.support.factories import auth, make_csv, upload_dataset

CHART_DATA = re.compile(r'<script type="application/json" id="chart-data">(.*?)</script>', re.S)


@pytest.fixture(scope="module")
def model(env: AppEnv, keys: dict[str, str]) -> str:
    h = auth(keys["admin"])
    ds = upload_dataset(env.client, keys["admin"], "people", make_csv(n_subjects=40))
    r = env.client.post(
        "/v1/models",
        headers=h,
        json={
            "name": "m",
            "dataset_id": ds["id"],
            "training": {"epochs": 2, "batch_size": 32},
            "unlearning": {"mode": "sisa", "shards": 2, "slices": 2},
            "group_columns": ["colour"],
            "verification": {
                "utility_max_drop": 1.0,
                "require_approval": True,
                "min_group_size": 5,
            },
        },
    )
    assert r.status_code == 202, r.text
    training.run_training(r.json()["job_id"])
    return "m"


_next_subject = iter(range(1, 40))


def in_review(env: AppEnv, keys: dict[str, str], model: str) -> str:
    """A new subject request, planned and unlearned: it waits in needs_review."""
    h = auth(keys["admin"])
    rid = env.client.post(
        "/v1/deletion-requests",
        headers=h,
        json={"kind": "subject", "subject_id": f"subj-{next(_next_subject):04d}"},
    ).json()["id"]
    with session_scope() as s:
        lifecycle.plan(s, rid)
    job_id = env.client.get(f"/v1/deletion-requests/{rid}", headers=h).json()["models"][0]["job_id"]
    unlearning.run_unlearning(job_id, EVENTS)
    assert _status(rid) == "needs_review"
    return str(rid)


def _status(rid: str) -> str:
    with session_scope() as s:
        req = s.get(DeletionRequest, rid)
        assert req is not None
        return req.status


def _production() -> int | None:
    with session_scope() as s:
        return s.scalars(select(MLModel.production_version).where(MLModel.name == "m")).one()


def _events() -> int:
    with session_scope() as s:
        return int(s.scalar(select(func.count()).select_from(AuditEvent)) or 0)


def _charts(html: str) -> dict[str, Any]:
    m = CHART_DATA.search(html)
    assert m is not None
    data: dict[str, Any] = json.loads(m.group(1))
    return data


@pytest.fixture(scope="module")
def admin(env: AppEnv, keys: dict[str, str]) -> TestClient:
    return login(env, keys["admin"])


def test_detail_and_review_pages_show_the_report_beside_the_buttons(
    env: AppEnv, keys: dict[str, str], model: str, admin: TestClient
) -> None:
    rid = in_review(env, keys, model)
    html = admin.get(f"/admin/requests/{rid}").text
    for action in ("approve", "reject", "mitigate"):
        assert re.search(
            rf'<form[^>]*action="/admin/requests/{rid}/review"[^>]*data-action="{action}"', html
        )
    figures = _charts(html)
    assert {"chart-fairness", "chart-mia", "chart-utility"} <= set(figures)
    mia = figures["chart-mia"]["data"]
    assert {t["name"] for t in mia} >= {"forgotten records (after)", "reference non-members"}
    assert all(t["x"] for t in mia)
    assert 'data-testid="checks"' in html and 'id="chart-fairness"' in html
    assert re.search(r'data-testid="request-status"[^>]*>needs_review<', html)
    assert re.search(r'data-testid="request-models".*href="/admin/reports/\w+"', html, re.S)
    assert re.search(r'data-testid="timeline".*<li data-event="request.received"', html, re.S)
    review = admin.get("/admin/review").text
    assert f'data-request-id="{rid}"' in review
    assert any(k.startswith("chart-fairness-") for k in _charts(review))
    report_id = re.search(r'href="/admin/reports/(\w+)"', html)
    assert report_id is not None
    report = admin.get(f"/admin/reports/{report_id.group(1)}")
    assert report.status_code == 200 and 'data-testid="checks"' in report.text
    assert {"chart-fairness", "chart-mia", "chart-utility"} <= set(_charts(report.text))
    assert admin.get("/admin/reports/nope").status_code == 404


def test_auditor_cannot_decide(env: AppEnv, keys: dict[str, str], model: str) -> None:
    rid = in_review(env, keys, model)
    auditor = login(env, keys["auditor"])
    html = auditor.get(f"/admin/requests/{rid}").text
    assert not re.search(r"<form[^>]*data-action", html)
    assert "chart-fairness" in _charts(html)  # auditors see everything
    before = (_production(), _events())
    token = csrf_token(auditor, f"/admin/requests/{rid}")
    r = auditor.post(
        f"/admin/requests/{rid}/review", data={"csrf_token": token, "action": "approve"}
    )
    assert r.status_code == 403
    assert _status(rid) == "needs_review" and (_production(), _events()) == before


def test_admin_approve_promotes_then_the_certificate_verifies(
    env: AppEnv, keys: dict[str, str], model: str, admin: TestClient
) -> None:
    rid = in_review(env, keys, model)
    production = _production()
    token = csrf_token(admin, f"/admin/requests/{rid}")
    r = admin.post(
        f"/admin/requests/{rid}/review",
        data={"csrf_token": token, "action": "approve", "note": "checked the report"},
    )
    assert r.status_code == 303 and r.headers["location"] == f"/admin/requests/{rid}?done=approve"
    assert _status(rid) == "erasing"
    assert _production() is not None and _production() != production
    with session_scope() as s:
        ev = s.scalars(
            select(AuditEvent).where(
                AuditEvent.entity_id == rid, AuditEvent.action == "request.reviewed"
            )
        ).one()
        assert ev.actor == "key:test-admin" and ev.data["note"] == "checked the report"
    page = admin.get(r.headers["location"]).text
    assert 'data-testid="flash"' in page
    assert re.search(r'data-testid="certificate-status"[^>]*>none yet<', page)
    # A second decision is refused by the service's state check, and says why.
    again = admin.post(
        f"/admin/requests/{rid}/review", data={"csrf_token": token, "action": "reject"}
    )
    assert again.status_code == 409 and 'data-testid="flash-error"' in again.text
    # Erasure completes it; the certificate is signed, verified and downloadable.
    with session_scope() as s:
        lifecycle.erase(s, get_store(), rid)
    page = admin.get(f"/admin/requests/{rid}").text
    assert re.search(r'data-testid="certificate-status"[^>]*>verified<', page)
    cert = admin.get(f"/admin/requests/{rid}/certificate")
    assert cert.status_code == 200 and "attachment" in cert.headers["content-disposition"]
    assert cert.json()["certificate"]["request"]["id"] == rid
    with session_scope() as s:
        row = s.get(Certificate, rid)
        assert row is not None
        body = json.loads(json.dumps(row.body))
        body["certificate"]["models"][0]["to_version"] = 99
        row.body = body
    page = admin.get(f"/admin/requests/{rid}").text
    assert re.search(r'data-testid="certificate-status"[^>]*>invalid<', page)


def test_reject_retrains_and_the_job_shows_live(
    env: AppEnv, keys: dict[str, str], model: str, admin: TestClient
) -> None:
    rid = in_review(env, keys, model)
    token = csrf_token(admin, f"/admin/requests/{rid}")
    r = admin.post(f"/admin/requests/{rid}/review", data={"csrf_token": token, "action": "reject"})
    assert r.status_code == 303 and _status(rid) == "retraining"
    with session_scope() as s:
        job = s.scalars(select(Job).where(Job.kind == "retrain", Job.status == "pending")).one()
        job_id = job.id
    jobs = admin.get("/admin/jobs").text
    assert re.search(rf'<progress data-job-id="{job_id}" data-status="pending"', jobs)
    assert admin.get("/admin/jobs.json").json()["jobs"][0]["id"] == job_id
    overview = admin.get("/admin").text
    assert re.search(rf'data-testid="running-jobs".*data-job-id="{job_id}"', overview, re.S)
    with session_scope() as s:  # the job fails, as a worker would record it
        s.execute(
            update(Job).where(Job.id == job_id).values(status="failed", error="boom: CUDA OOM")
        )
    detail = admin.get(f"/admin/jobs/{job_id}").text
    assert re.search(r'data-testid="job-error"[^>]*>boom: CUDA OOM<', detail)
    assert 'data-testid="job-error"' in admin.get("/admin/jobs?status=failed").text
    assert admin.get("/admin/jobs?status=weird").status_code == 400
    assert admin.get("/admin/jobs/nope").status_code == 404


def test_a_refusal_midway_leaves_no_partial_writes(
    env: AppEnv, keys: dict[str, str], model: str, admin: TestClient
) -> None:
    """The service writes its audit event, then finds the model busy: the savepoint undoes
    the event, and the page says why with the service's 409."""
    rid = in_review(env, keys, model)
    with session_scope() as s:
        s.execute(update(MLModel).where(MLModel.name == "m").values(locked_by_job="someone"))
    try:
        before = _events()
        token = csrf_token(admin, f"/admin/requests/{rid}")
        r = admin.post(
            f"/admin/requests/{rid}/review", data={"csrf_token": token, "action": "mitigate"}
        )
        assert r.status_code == 409 and "a job is running" in r.text
        assert _events() == before and _status(rid) == "needs_review"
    finally:
        with session_scope() as s:
            s.execute(update(MLModel).where(MLModel.name == "m").values(locked_by_job=None))


def test_the_job_page_shows_where_the_time_went(
    env: AppEnv, keys: dict[str, str], model: str, admin: TestClient
) -> None:
    rid = in_review(env, keys, model)
    h = auth(keys["admin"])
    job_id = env.client.get(f"/v1/deletion-requests/{rid}", headers=h).json()["models"][0]["job_id"]
    job = env.client.get(f"/v1/jobs/{job_id}", headers=h).json()
    phases = job["result"]["phases"]
    names = set(phases["seconds"])
    # Loading, the computation, every check that ran and concluding are each timed.
    assert {"load", "compute", "conclude", "verify.utility", "verify.fairness"} <= names
    assert {"verify.lineage", "verify.forgetting"} <= names
    assert all(v >= 0 for v in phases["seconds"].values())
    # The dataset is read once per job, whatever the checks need: from storage, or
    # from the warm copy the worker kept from the job before.
    assert phases["parquet_reads"] + phases["warm_reads"] == 1
    page = admin.get(f"/admin/jobs/{job_id}").text
    section = page.split('data-testid="job-phases"', 1)[1].split("</section>", 1)[0]
    for name in ("load", "compute", "verify.forgetting", "conclude"):
        assert f'<td class="mono">{name}</td>' in section
    if phases["warm_reads"]:
        assert "Dataset reads: 0 (rows from the worker's warm copy: 1)" in section
    else:
        assert "Dataset reads: 1" in section
