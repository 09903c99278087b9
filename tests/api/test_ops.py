"""Health, readiness, metrics and the OpenAPI document."""

from __future__ import annotations

from tests.support.app_env import AppEnv


def test_healthz(env: AppEnv) -> None:
    resp = env.client.get("/healthz")
    assert resp.status_code == 200
    assert resp.json() == {"status": "ok"}


def test_readyz_checks_the_database(env: AppEnv) -> None:
    resp = env.client.get("/readyz")
    assert resp.status_code == 200, resp.text
    assert resp.json() == {"status": "ready"}


def test_metrics_are_prometheus_text(env: AppEnv) -> None:
    env.client.get("/healthz")
    resp = env.client.get("/metrics")
    assert resp.status_code == 200
    assert resp.headers["content-type"].startswith("text/plain")
    lines = [ln for ln in resp.text.splitlines() if ln and not ln.startswith("#")]
    assert lines, "no samples exported"
    assert all(len(ln.rsplit(" ", 1)) == 2 for ln in lines)


CONTRACT = {
    ("post", "/v1/datasets"),
    ("get", "/v1/datasets/{dataset_id}"),
    ("post", "/v1/models"),
    ("get", "/v1/models/{name}"),
    ("post", "/v1/models/{name}/predict"),
    ("post", "/v1/models/{name}/versions/{version}/promote"),
    ("post", "/v1/deletion-requests"),
    ("get", "/v1/deletion-requests"),
    ("get", "/v1/deletion-requests/{request_id}"),
    ("post", "/v1/deletion-requests/{request_id}/cancel"),
    ("post", "/v1/deletion-requests/{request_id}/extend"),
    ("get", "/v1/deletion-requests/{request_id}/certificate"),
    ("get", "/v1/jobs/{job_id}"),
    ("get", "/v1/reports/{report_id}"),
    ("get", "/v1/subjects/{subject_id}/lineage"),
    ("get", "/v1/audit"),
    ("get", "/v1/audit/verify"),
    ("get", "/healthz"),
    ("get", "/readyz"),
    ("get", "/metrics"),
}


def test_openapi_lists_the_contract(env: AppEnv) -> None:
    resp = env.client.get("/openapi.json")
    assert resp.status_code == 200
    doc = resp.json()
    assert doc["openapi"].startswith("3.")
    assert doc["info"]["title"] == "Palimpsest"
    served = {(m, p) for p, ops in doc["paths"].items() for m in ops}
    assert served >= CONTRACT, sorted(CONTRACT - served)


def test_unknown_path_is_a_json_404(env: AppEnv) -> None:
    resp = env.client.get("/v1/nothing-here")
    assert resp.status_code == 404
    assert resp.json()["error"]["code"] == "not_found"


def test_database_backend_is_the_one_asked_for(env: AppEnv) -> None:
    from tests.support.database import postgres_admin_url

    expected = "postgresql" if postgres_admin_url() else "sqlite"
    assert env.database_url.startswith(expected), env.database_url
