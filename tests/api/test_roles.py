"""Every `/v1` route refuses a missing or bad key (401) and roles it does not admit (403),
except the public ones (`PUBLIC`), which answer without a key.

The table below is the contract (API.md). A route served under `/v1` without an entry
fails `test_every_v1_route_has_an_entry`, so a new endpoint cannot ship unreviewed.
"""

from __future__ import annotations

import re
from collections.abc import Iterable, Iterator

import pytest
from fastapi.routing import APIRoute
from starlette.routing import BaseRoute

from app.main import create_app
from tests.support.app_env import AppEnv
from tests.support.factories import assert_error, auth

ADMIN = frozenset({"admin"})
READERS = frozenset({"admin", "auditor"})
PORTAL = frozenset({"admin", "portal"})
EVERYONE = frozenset({"admin", "portal", "auditor"})
# No key needed at all (API.md lists the route without a role).
PUBLIC = frozenset({"admin", "portal", "auditor", "anonymous"})

# (method, path) -> roles admitted. Entries for contract routes that are not served yet
# are fine; a served route missing here is a failure.
EXPECTED: dict[tuple[str, str], frozenset[str]] = {
    ("POST", "/v1/datasets"): ADMIN,
    ("GET", "/v1/datasets/{dataset_id}"): READERS,
    ("POST", "/v1/models"): ADMIN,
    ("GET", "/v1/models/{name}"): READERS,
    # Beyond API.md: change a model's batching policy.
    ("PATCH", "/v1/models/{name}"): ADMIN,
    ("POST", "/v1/models/{name}/predict"): ADMIN,
    ("POST", "/v1/models/{name}/versions/{version}/promote"): ADMIN,
    # Beyond API.md: on-demand fallback retraining changes models, so admin only.
    ("POST", "/v1/models/{name}/retrain"): ADMIN,
    # Beyond API.md (issue 14): registering a model trained elsewhere.
    ("POST", "/v1/model-imports"): ADMIN,
    ("POST", "/v1/deletion-requests"): PORTAL,
    ("GET", "/v1/deletion-requests"): EVERYONE,
    ("GET", "/v1/deletion-requests/{request_id}"): EVERYONE,
    ("POST", "/v1/deletion-requests/{request_id}/cancel"): PORTAL,
    ("POST", "/v1/deletion-requests/{request_id}/extend"): ADMIN,
    ("POST", "/v1/deletion-requests/{request_id}/review"): ADMIN,
    ("POST", "/v1/deletion-requests/{request_id}/retry"): ADMIN,
    ("GET", "/v1/deletion-requests/{request_id}/certificate"): EVERYONE,
    ("GET", "/v1/jobs/{job_id}"): READERS,
    ("GET", "/v1/reports/{report_id}"): READERS,
    ("GET", "/v1/subjects/{subject_id}/lineage"): READERS,
    ("GET", "/v1/audit"): READERS,
    ("GET", "/v1/audit/verify"): READERS,
    # Public: whoever holds a certificate must be able to fetch the key that checks it.
    ("GET", "/v1/signing-key"): PUBLIC,
    ("POST", "/v1/webhooks"): ADMIN,
    ("GET", "/v1/webhooks"): ADMIN,
    ("DELETE", "/v1/webhooks/{webhook_id}"): ADMIN,
    ("GET", "/v1/webhooks/{webhook_id}/deliveries"): ADMIN,
    ("POST", "/v1/webhooks/{webhook_id}/deliveries/{delivery_id}/redeliver"): ADMIN,
    ("POST", "/v1/webhooks/{webhook_id}/rotate-secret"): ADMIN,
    ("POST", "/v1/webhooks/{webhook_id}/enable"): ADMIN,
    ("GET", "/v1/keys"): ADMIN,
    ("POST", "/v1/keys"): ADMIN,
    ("POST", "/v1/keys/{key_id}/revoke"): ADMIN,
}


def _walk(routes: Iterable[BaseRoute], prefix: str = "") -> Iterator[tuple[str, str]]:
    for route in routes:
        if isinstance(route, APIRoute):
            for method in sorted(route.methods - {"HEAD", "OPTIONS"}):
                yield method, prefix + route.path
        # FastAPI >= 0.165 keeps included routers as branches instead of copying routes.
        inner = getattr(route, "original_router", None)
        if inner is not None:
            extra = getattr(getattr(route, "include_context", None), "prefix", "") or ""
            yield from _walk(inner.routes, prefix + extra)
        elif getattr(route, "routes", None) and not isinstance(route, APIRoute):
            yield from _walk(route.routes, prefix + getattr(route, "path", ""))


def served_routes() -> list[tuple[str, str]]:
    app = create_app()
    walked = set(_walk(app.routes))
    # The OpenAPI document is a second, independent listing of the same routes.
    documented = {(m.upper(), p) for p, ops in app.openapi()["paths"].items() for m in ops}
    return sorted(r for r in walked | documented if r[1].startswith("/v1"))


ROUTES = served_routes()


def concrete(path: str) -> str:
    # Integers fit every path parameter type (`version: int` as well as string ids).
    return re.sub(r"\{[^}]+\}", "1", path)


def call(env: AppEnv, method: str, path: str, headers: dict[str, str]):  # type: ignore[no-untyped-def]
    kwargs = {"json": {}} if method in ("POST", "PUT", "PATCH") else {}
    return env.client.request(method, concrete(path), headers=headers, **kwargs)


def test_every_v1_route_has_an_entry() -> None:
    assert ROUTES, "no /v1 routes found"
    missing = [r for r in ROUTES if r not in EXPECTED]
    assert not missing, f"routes without an entry in the role table: {missing}"


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_missing_or_bad_key_is_401(env: AppEnv, method: str, path: str) -> None:
    public = EXPECTED.get((method, path)) == PUBLIC
    for headers in (
        {},
        {"Authorization": "Bearer plm_not-a-real-key"},
        {"Authorization": "Basic YWRtaW46YWRtaW4="},
        {"Authorization": "Bearer "},
    ):
        resp = call(env, method, path, headers)
        if public:
            # A public route ignores credentials, good or bad.
            assert resp.status_code == 200, (headers, resp.text)
        else:
            assert_error(resp, 401, "unauthorized")


@pytest.mark.parametrize(("method", "path"), ROUTES)
def test_roles(env: AppEnv, keys: dict[str, str], method: str, path: str) -> None:
    allowed = EXPECTED.get((method, path))
    if allowed is None:
        pytest.fail(f"{method} {path} has no entry in the role table")
    for role in ("admin", "portal", "auditor"):
        resp = call(env, method, path, auth(keys[role]))
        if role in allowed:
            # Admitted: whatever the outcome for this dummy id/body, it is not an auth error.
            assert resp.status_code not in (401, 403), (role, resp.text)
            assert resp.status_code < 500, (role, resp.status_code, resp.text)
        else:
            assert_error(resp, 403, "forbidden")


def test_revoked_key_is_401(env: AppEnv) -> None:
    from sqlalchemy import select

    from app.core.db import session_scope
    from app.models import ApiKey
    from app.models.base import utcnow
    from tests.support.factories import create_key

    raw = create_key("admin", "to-revoke")
    assert env.client.get("/v1/audit", headers=auth(raw)).status_code == 200
    with session_scope() as s:
        key = s.scalars(select(ApiKey).where(ApiKey.name == "to-revoke")).one()
        key.revoked_at = utcnow()
    assert_error(env.client.get("/v1/audit", headers=auth(raw)), 401, "unauthorized")
