"""Log-in with an API key into a signed, HTTP-only session cookie; everything else in
/admin needs that session, re-checked against the key table on every request."""

from __future__ import annotations

import re
import time

import pytest
from sqlalchemy import select

from app.core.db import session_scope
from app.core.settings import get_settings
from app.dashboard.auth import COOKIE, SessionCodec
from app.models import ApiKey, AuditEvent
from app.models.base import utcnow
from tests.dashboard.helpers import browser, csrf_token, login
from tests.support.app_env import AppEnv
from tests.support.factories import create_key

PAGES = [
    "/admin",
    "/admin/requests",
    "/admin/review",
    "/admin/jobs",
    "/admin/models",
    "/admin/audit",
    "/admin/webhooks",
    "/admin/jobs.json",
    "/admin/requests/abc",
]


def _set_cookie(resp: object) -> str:
    headers = resp.headers  # type: ignore[attr-defined]
    return str(headers.get("set-cookie", ""))


def test_login_form_is_a_password_field(env: AppEnv) -> None:
    r = browser(env).get("/admin/login")
    assert r.status_code == 200
    assert '<form id="login"' in r.text
    assert re.search(r'<input[^>]*type="password"[^>]*name="key"', r.text)
    assert "default-src 'self'" in r.headers["content-security-policy"]


@pytest.mark.parametrize("role", ["admin", "auditor"])
def test_admin_and_auditor_keys_log_in(env: AppEnv, keys: dict[str, str], role: str) -> None:
    client = browser(env)
    r = client.post("/admin/login", data={"key": keys[role]})
    assert r.status_code == 303 and r.headers["location"] == "/admin"
    cookie = _set_cookie(r)
    assert cookie.startswith(f"{COOKIE}=")
    assert "HttpOnly" in cookie
    assert "samesite=strict" in cookie.lower()
    assert "Path=/admin" in cookie
    assert "Secure" not in cookie  # plain http to the test server
    assert keys[role] not in cookie  # the key itself never goes to the browser
    page = client.get("/admin")
    assert page.status_code == 200
    who = re.search(r'data-testid="whoami"[^>]*>([^<]*)<', page.text)
    assert who is not None and role in who.group(1)


def test_cookie_is_secure_over_https(env: AppEnv, keys: dict[str, str]) -> None:
    r = browser(env, base_url="https://testserver").post(
        "/admin/login", data={"key": keys["admin"]}
    )
    assert r.status_code == 303
    assert "Secure" in _set_cookie(r)


def test_login_is_audited(env: AppEnv, keys: dict[str, str]) -> None:
    login(env, keys["auditor"])
    with session_scope() as s:
        ev = s.scalars(
            select(AuditEvent)
            .where(AuditEvent.action == "dashboard.login")
            .order_by(AuditEvent.id.desc())
        ).first()
        assert ev is not None and ev.actor == "key:dash-auditor"


@pytest.mark.parametrize("key", ["portal", "bad", "", "x" * 5000])
def test_other_keys_are_refused(env: AppEnv, keys: dict[str, str], key: str) -> None:
    raw = keys.get(key, key)
    r = browser(env).post("/admin/login", data={"key": raw})
    if len(raw) > 1000:
        assert r.status_code == 400  # the form field's own limit
        return
    assert r.status_code == 401
    assert 'data-testid="login-error"' in r.text
    assert COOKIE not in _set_cookie(r)


def test_revoked_key_stops_working_at_once(env: AppEnv) -> None:
    raw = create_key("admin", "soon-revoked")
    client = login(env, raw)
    assert client.get("/admin").status_code == 200
    with session_scope() as s:
        key = s.scalars(select(ApiKey).where(ApiKey.name == "soon-revoked")).one()
        key.revoked_at = utcnow()
    r = client.get("/admin")
    assert r.status_code == 303 and r.headers["location"] == "/admin/login"
    assert browser(env).post("/admin/login", data={"key": raw}).status_code == 401


@pytest.mark.parametrize("path", PAGES)
def test_pages_redirect_to_login_without_a_session(env: AppEnv, path: str) -> None:
    r = browser(env).get(path)
    assert r.status_code == 303 and r.headers["location"] == "/admin/login"


def test_forged_expired_and_foreign_cookies_are_refused(env: AppEnv, keys: dict[str, str]) -> None:
    client = login(env, keys["admin"])
    good = client.cookies.get(COOKIE)
    assert good
    body, mac = good.split(".")
    codec = SessionCodec(get_settings())
    with session_scope() as s:
        admin_id = s.scalars(select(ApiKey.id).where(ApiKey.name == "dash-admin")).one()
    expired, _ = codec.encode(admin_id, "admin", now=time.time() - 9 * 3600)
    other_secret = SessionCodec(
        get_settings().model_copy(update={"dashboard_session_secret": "other-secret"})
    )
    foreign, _ = other_secret.encode(admin_id, "admin")
    for value in (f"{body}.{mac[:-2]}AA", f"{body}x.{mac}", "garbage", expired, foreign):
        c = browser(env)
        c.cookies.set(COOKIE, value, path="/admin")
        r = c.get("/admin")
        assert r.status_code == 303, value


def test_logout_needs_the_token_and_clears_the_cookie(env: AppEnv, keys: dict[str, str]) -> None:
    client = login(env, keys["admin"])
    assert client.post("/admin/logout", data={}).status_code == 403
    token = csrf_token(client)
    r = client.post("/admin/logout", data={"csrf_token": token})
    assert r.status_code == 303 and r.headers["location"] == "/admin/login"
    assert "Max-Age=0" in _set_cookie(r) or "expires" in _set_cookie(r).lower()
    assert client.get("/admin").status_code == 303


def test_cross_site_login_is_refused(env: AppEnv, keys: dict[str, str]) -> None:
    r = browser(env).post(
        "/admin/login", data={"key": keys["admin"]}, headers={"Sec-Fetch-Site": "cross-site"}
    )
    assert r.status_code == 403
    assert COOKIE not in _set_cookie(r)


@pytest.mark.parametrize(
    ("next_url", "expected"),
    [
        ("/admin/jobs", "/admin/jobs"),
        ("//evil.example", "/admin"),
        ("https://evil.example", "/admin"),
    ],
)
def test_login_returns_only_inside_the_dashboard(
    env: AppEnv, keys: dict[str, str], next_url: str, expected: str
) -> None:
    r = browser(env).post("/admin/login", data={"key": keys["admin"], "next": next_url})
    assert r.status_code == 303 and r.headers["location"] == expected


def test_pages_carry_the_csp_and_load_nothing_from_elsewhere(
    env: AppEnv, keys: dict[str, str]
) -> None:
    client = login(env, keys["auditor"])
    for path in PAGES[:-2]:
        r = client.get(path)
        assert r.status_code == 200, path
        csp = r.headers["content-security-policy"]
        assert "script-src 'self'" in csp and "unsafe" not in csp
        assert r.headers["x-frame-options"] == "DENY"
        assert not re.search(r'(src|href)="(https?:)?//', r.text), path
        assert not re.search(r"<script>(?!\s*$)", r.text)  # no inline script
        assert " on" + "click=" not in r.text.lower()


def test_static_files_are_served_locally(env: AppEnv) -> None:
    c = browser(env)
    plotly = c.get("/admin/static/plotly.min.js")
    assert plotly.status_code == 200 and b"plotly.js" in plotly.content[:200]
    for name in ("dashboard.js", "dashboard.css", "plotly.css"):
        assert c.get(f"/admin/static/{name}").status_code == 200
    traversal = c.get("/admin/static/..%2Fauth.py")
    assert traversal.status_code in (303, 404) and b"SessionCodec" not in traversal.content
    assert c.get("/admin/static/nope.js").status_code == 404


def test_a_cookie_forged_from_the_public_development_pepper_is_refused(
    env: AppEnv, keys: dict[str, str]
) -> None:
    """The attack of issue 11: the session key used to be an HMAC of the public
    development pepper, so anyone who read the code and saw an admin key id in
    /v1/audit could sign an admin session."""
    import base64
    import hashlib
    import hmac
    import json

    from app.core.settings import DEV_PEPPER

    with session_scope() as s:
        admin_id = s.scalars(select(ApiKey.id).where(ApiKey.name == "dash-admin")).one()
    old_key = hmac.new(DEV_PEPPER.encode(), b"palimpsest-dashboard-session", hashlib.sha256)
    body = json.dumps(
        {"kid": admin_id, "role": "admin", "sid": "forged", "exp": int(time.time()) + 3600},
        separators=(",", ":"),
    ).encode()
    mac = hmac.new(old_key.digest(), b"session|" + body, hashlib.sha256).digest()

    def b64(raw: bytes) -> str:
        return base64.urlsafe_b64encode(raw).decode().rstrip("=")

    c = browser(env)
    c.cookies.set(COOKIE, f"{b64(body)}.{b64(mac)}", path="/admin")
    assert c.get("/admin").status_code == 303
    # The install's own secret is random, kept owner-only beside the signing key.
    settings = get_settings()
    assert settings.session_secret not in (DEV_PEPPER, old_key.hexdigest())
    assert settings.secrets_path.parent == env.folder / "keys"
    assert settings.secrets_path.stat().st_mode & 0o777 == 0o600
