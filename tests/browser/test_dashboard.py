"""The admin dashboard in a real browser, against real seeded state.

Written against /admin's contract: data-testid hooks, `data-status`, `data-request-id`,
`progress[data-job-id]`, plotly chart divs by id, `form[data-action]` for actions.
"""

from __future__ import annotations

import json
import re
import time
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import TYPE_CHECKING, Any
from urllib.parse import urlparse

import httpx
import pytest

from tests.browser.seeding import Seeded, settle, wait_for

if TYPE_CHECKING:
    from playwright.sync_api import Page

pytestmark = pytest.mark.browser

OpenPage = Callable[[str | None], "Page"]

POINTS_JS = """(id) => {
  const el = document.getElementById(id);
  if (!el || !Array.isArray(el.data)) return -1;
  const n = (a) => (Array.isArray(a) || ArrayBuffer.isView(a) ? a.length : 0);
  return el.data.reduce(
    (sum, t) => sum + Math.max(n(t.x), n(t.y), n(t.values), n(t.z)), 0);
}"""


def _path(page: Page) -> str:
    return urlparse(page.url).path.rstrip("/") or "/"


def _api(seeded: Seeded, path: str) -> Any:
    with seeded.client() as admin:
        r = admin.get(path)
        assert r.status_code == 200, r.text
        return r.json()


def _requests(seeded: Seeded) -> list[dict[str, Any]]:
    return list(_api(seeded, "/v1/deletion-requests?limit=200")["items"])


def _report_id(seeded: Seeded, rid: str) -> str:
    (m,) = _api(seeded, f"/v1/deletion-requests/{rid}")["models"]
    return str(m["report_id"])


def _chart(page: Page, chart_id: str) -> int:
    """Waits for plotly to draw `chart_id`; returns its number of traces, asserting that
    the traces hold points."""
    page.wait_for_selector(f"#{chart_id}.js-plotly-plot", state="attached")
    traces = page.evaluate(f"document.getElementById('{chart_id}').data.length")
    assert isinstance(traces, int) and traces > 0, (chart_id, traces)
    points = page.evaluate(POINTS_JS, chart_id)
    assert isinstance(points, int) and points > 0, (chart_id, points)
    return traces


def _post_request(client: httpx.Client, subject: str) -> str:
    r = client.post("/v1/deletion-requests", json={"kind": "subject", "subject_id": subject})
    assert r.status_code == 202, r.text
    return str(r.json()["id"])


def _status_text(page: Page) -> str:
    return page.locator("[data-testid=request-status]").inner_text().strip()


def test_unauthenticated_visitor_is_sent_to_login(open_page: OpenPage, seeded: Seeded) -> None:
    page = open_page(None)
    for path in (
        "/admin",
        "/admin/requests",
        f"/admin/requests/{seeded.in_review}",
        "/admin/jobs",
        "/admin/models",
        "/admin/audit",
        "/admin/webhooks",
    ):
        page.goto(path)
        assert _path(page) == "/admin/login", (path, page.url)
        assert page.locator("form#login input[name=key][type=password]").count() == 1
    raw = page.request.get("/admin/requests", max_redirects=0)
    assert raw.status == 303, raw.status
    assert urlparse(raw.headers["location"]).path == "/admin/login"
    # Nothing of the seeded state leaks to the login page.
    assert seeded.in_review not in page.content()


def test_login_refuses_bad_and_portal_keys_then_admits_an_admin(
    open_page: OpenPage, seeded: Seeded
) -> None:
    page = open_page(None)
    page.goto("/admin/login")
    for bad in ("not-a-key", seeded.portal_key):
        page.fill("form#login input[name=key]", bad)
        with page.expect_response(
            lambda r: r.request.method == "POST" and urlparse(r.url).path == "/admin/login"
        ) as resp:
            page.click("form#login button[type=submit]")
        assert resp.value.status == 401, (bad[:6], resp.value.status)
        assert page.locator("[data-testid=login-error]").is_visible()
        assert not [c for c in page.context.cookies() if c["name"] == "palimpsest_admin"]

    page.fill("form#login input[name=key]", seeded.admin_key)
    page.click("form#login button[type=submit]")
    page.wait_for_url(re.compile(r"/admin/?$"))
    assert "admin" in page.locator("[data-testid=whoami]").inner_text().lower()
    (cookie,) = [c for c in page.context.cookies() if c["name"] == "palimpsest_admin"]
    assert cookie["httpOnly"] and cookie["sameSite"] == "Strict"
    assert seeded.admin_key not in cookie["value"]  # the session is not the key itself
    assert page.locator("nav[data-testid=nav]").is_visible()

    # Logging out ends the session: the pages send us back to the login form.
    page.locator("form[action$='/admin/logout'] [type=submit]").click()
    page.wait_for_url(re.compile(r"/admin/login"))
    page.goto("/admin")
    assert _path(page) == "/admin/login"


def test_a_revoked_key_ends_its_session_at_once(open_page: OpenPage, seeded: Seeded) -> None:
    from sqlalchemy import create_engine, text

    key = seeded.stack.create_key("admin", "short-lived")
    page = open_page(key)
    page.goto("/admin/requests")
    assert _path(page) == "/admin/requests"
    engine = create_engine(seeded.stack.env["PALIMPSEST_DATABASE_URL"])
    try:
        with engine.begin() as conn:
            n = conn.execute(
                text("UPDATE api_keys SET revoked_at = CURRENT_TIMESTAMP WHERE name = :n"),
                {"n": "short-lived"},
            ).rowcount
        assert n == 1
    finally:
        engine.dispose()
    page.goto("/admin/requests")  # the same, still unexpired, cookie
    assert _path(page) == "/admin/login"


def test_overview_shows_the_seeded_requests(open_page: OpenPage, seeded: Seeded) -> None:
    page = open_page(seeded.admin_key)
    counts = Counter(d["status"] for d in _requests(seeded))
    assert sum(counts.values()) >= 5, counts  # what the seeding made (and other tests)
    assert counts["completed"] >= 3 and counts["needs_review"] >= 1, counts
    page.goto("/admin")
    box = page.locator("[data-testid=status-counts]")
    for status, n in counts.items():
        text = box.locator(f"[data-status='{status}']").inner_text()
        assert re.search(rf"(?<!\d){n}(?!\d)", text), (status, n, text)
    # Completions per day: today's completions are in the chart.
    _chart(page, "chart-completions")
    assert page.locator("[data-testid=compute-saved]").is_visible()
    assert page.locator("[data-testid=due-soon]").count() == 1
    assert page.locator("[data-testid=overdue]").count() == 1
    assert page.locator("[data-testid=running-jobs]").count() == 1


def test_requests_list_filters_and_links_to_details(open_page: OpenPage, seeded: Seeded) -> None:
    page = open_page(seeded.admin_key)
    items = _requests(seeded)
    page.goto("/admin/requests")
    table = page.locator("table[data-testid=requests-table]")
    for d in items:
        assert table.locator(f"tr[data-request-id='{d['id']}']").count() == 1, d["id"]
    assert page.locator("form[data-testid=filters]").count() == 1

    def shown(query: str) -> set[str]:
        page.goto(f"/admin/requests?{query}")
        rows = page.locator("table[data-testid=requests-table] tr[data-request-id]")
        return {str(rows.nth(i).get_attribute("data-request-id")) for i in range(rows.count())}

    in_review = {d["id"] for d in items if d["status"] == "needs_review"}
    assert shown("status=needs_review") == in_review
    assert shown("kind=feature") == {seeded.feature_request}
    assert seeded.in_review in shown(f"q={seeded.in_review}")
    assert not set(seeded.completed) & shown(f"q={seeded.in_review}")

    page.goto("/admin/requests")
    page.locator(f"tr[data-request-id='{seeded.completed[0]}'] a").first.click()
    page.wait_for_url(re.compile(rf"/admin/requests/{seeded.completed[0]}$"))
    assert _status_text(page) == "completed"


def test_completed_request_detail(open_page: OpenPage, seeded: Seeded) -> None:
    page = open_page(seeded.admin_key)
    rid = seeded.completed[0]
    page.goto(f"/admin/requests/{rid}")
    assert _status_text(page) == "completed"
    # received, planned, unlearning, verifying, erasing, completed
    assert page.locator("[data-testid=timeline] li").count() >= 5
    models = page.locator("[data-testid=request-models]")
    assert "visit-risk" in models.inner_text()
    report_id = _report_id(seeded, rid)
    assert models.locator(f"a[href$='/admin/reports/{report_id}']").count() >= 1
    assert "verified" in page.locator("[data-testid=certificate-status]").inner_text().lower()
    link = page.locator(f"a[href$='/admin/requests/{rid}/certificate']")
    assert link.count() >= 1
    cert = page.request.get(f"/admin/requests/{rid}/certificate")
    assert cert.status == 200
    body = json.loads(cert.body())
    assert body["certificate"]["request"]["id"] == rid and body["signature"]
    # No review buttons outside needs_review.
    for action in ("approve", "reject", "mitigate"):
        assert page.locator(f"form[data-action='{action}']").count() == 0


def test_report_page_renders_its_charts(open_page: OpenPage, seeded: Seeded) -> None:
    page = open_page(seeded.admin_key)
    report_id = _report_id(seeded, seeded.in_review)
    page.goto(f"/admin/reports/{report_id}")
    for chart in ("chart-fairness", "chart-mia", "chart-utility"):
        _chart(page, chart)
    # MIA: forgotten records, reference non-members and retained members.
    assert _chart(page, "chart-mia") >= 2
    assert page.locator("#chart-feature").count() == 0  # a subject request
    # Chart data travels as JSON, drawn by the static script: no inline code.
    assert page.locator("script#chart-data[type='application/json']").count() == 1
    checks = page.locator("[data-testid=checks]").inner_text().lower()
    for name in ("lineage", "utility", "fairness", "forgetting"):
        assert name in checks, checks

    page.goto(f"/admin/reports/{_report_id(seeded, seeded.feature_request)}")
    _chart(page, "chart-feature")
    assert "feature" in page.locator("[data-testid=checks]").inner_text().lower()


def test_jobs_page_shows_progress_bars_that_poll(open_page: OpenPage, seeded: Seeded) -> None:
    from playwright.sync_api import expect

    page = open_page(seeded.admin_key)
    train_job = seeded.models["visit-risk"]
    page.goto("/admin/jobs")
    bar = page.locator(f"progress[data-job-id='{train_job}']")
    assert bar.count() == 1
    value, top = bar.evaluate("(el) => [el.value, el.max]")
    assert top > 0 and value == pytest.approx(top), (value, top)  # done: a full bar

    # A job held by a batching window: its bar is on the page while it waits, and the
    # page's polling moves it to done without a reload.
    with seeded.client() as admin:
        r = admin.patch(
            "/v1/models/visit-risk",
            json={"batching": {"window_seconds": 6, "max_wait_seconds": 6}},
        )
        assert r.status_code == 200, r.text
        try:
            rid = _post_request(admin, "visit-0020")
            planned = wait_for(
                lambda: dict(admin.get(f"/v1/deletion-requests/{rid}").json()),
                lambda d: bool(d["models"]) and d["models"][0]["job_id"] is not None,
                timeout=30,
            )
            job_id = planned["models"][0]["job_id"]
            with page.expect_response(
                lambda resp: "/admin/jobs.json" in resp.url and job_id in resp.text(),
                timeout=30_000,
            ):
                page.goto("/admin/jobs")
                live = page.locator(f"progress[data-job-id='{job_id}']")
                assert live.count() == 1
                assert live.get_attribute("data-status") in ("pending", "running")
            expect(live).to_have_attribute("data-status", "succeeded", timeout=60_000)
            value, top = live.evaluate("(el) => [el.value, el.max]")
            assert value == pytest.approx(top), (value, top)
            assert settle(admin, rid)["status"] == "completed"
        finally:
            reset = admin.patch("/v1/models/visit-risk", json={"batching": {}})
            assert reset.status_code == 200, reset.text
    state = page.request.get("/admin/jobs.json")
    assert state.status == 200 and job_id in state.text()
    page.goto(f"/admin/jobs/{job_id}")
    assert page.locator(f"progress[data-job-id='{job_id}']").count() == 1
    assert "sisa" in page.content().lower()


def test_models_audit_and_webhooks_pages(open_page: OpenPage, seeded: Seeded) -> None:
    page = open_page(seeded.admin_key)
    page.goto("/admin/models")
    text = page.content()
    for name in seeded.models:
        assert name in text, name
    model = _api(seeded, "/v1/models/visit-risk")
    page.goto("/admin/models/visit-risk")
    marker_row = page.locator("tr", has=page.locator("[data-testid=production-marker]"))
    assert marker_row.count() == 1
    assert re.search(rf"(?<!\d){model['production_version']}(?!\d)", marker_row.inner_text())
    assert page.locator("[data-testid=shard-map]").is_visible()

    page.goto("/admin/audit")
    assert "verified" in page.locator("[data-testid=chain-status]").inner_text().lower()
    assert "request.received" in page.content()

    page.goto("/admin/webhooks")
    endpoints = page.locator("[data-testid=webhook-endpoints]").inner_text()
    assert "127.0.0.1:9/palimpsest-hook" in endpoints
    assert page.locator("[data-testid=webhook-deliveries]").count() == 1


def test_dataset_pages_show_a_media_datasets_column_kinds(
    open_page: OpenPage, seeded: Seeded
) -> None:
    page = open_page(seeded.auditor_key)
    page.goto("/admin/datasets")
    page.click("[data-testid=datasets-table] a:text-is('scans')")
    assert _path(page) == f"/admin/datasets/{seeded.media_dataset}"
    kinds = {
        row.get_attribute("data-column"): row.get_attribute("data-kind")
        for row in page.locator("[data-testid=dataset-columns] tbody tr").all()
    }
    assert kinds == {
        "subject": "subject",
        "label": "label",
        "source": "source",
        "media": "image",
        "age": "numeric",
        "group": "categorical",  # a feature that the fairness check also groups by
    }, kinds
    assert "feature, group" in page.locator("tr[data-column=group]").inner_text()
    assert "image" in page.locator("tr[data-column=media]").inner_text()
    assert "files" in page.locator("[data-testid=media-usage]").inner_text()
    # The tabular dataset's page links to its model, and the model page back to it.
    page.goto("/admin/datasets")
    page.click("[data-testid=datasets-table] a:text-is('clinic-visits')")
    page.click("[data-testid=dataset-models] a:text-is('visit-risk')")
    assert _path(page) == "/admin/models/visit-risk"
    page.click("[data-testid=model-dataset] a")
    assert page.locator("h1").inner_text().startswith("clinic-visits")


def test_admin_approves_a_request_in_review(open_page: OpenPage, seeded: Seeded) -> None:
    rid = seeded.to_approve
    assert _api(seeded, f"/v1/deletion-requests/{rid}")["status"] == "needs_review"
    assert _api(seeded, "/v1/models/referral-triage")["production_version"] == 1
    page = open_page(seeded.admin_key)
    page.on("dialog", lambda d: d.accept())
    page.goto(f"/admin/requests/{rid}")
    assert _status_text(page) == "needs_review"
    for action in ("approve", "reject", "mitigate"):
        assert page.locator(f"form[data-action='{action}']").count() == 1, action
    # The report's charts stand beside the buttons.
    _chart(page, "chart-fairness")

    with page.expect_navigation():
        page.locator("form[data-action='approve'] [type=submit]").click()
    assert _path(page) == f"/admin/requests/{rid}"
    assert page.locator("[data-testid=flash]").is_visible()
    assert page.locator("[data-testid=flash-error]").count() == 0
    deadline = time.monotonic() + 60
    while _status_text(page) != "completed":
        assert time.monotonic() < deadline, f"still {_status_text(page)}"
        time.sleep(0.5)
        page.reload()
    assert page.locator("form[data-action='approve']").count() == 0
    assert _api(seeded, f"/v1/deletion-requests/{rid}")["status"] == "completed"
    assert _api(seeded, "/v1/models/referral-triage")["production_version"] == 2
    audit = _api(seeded, "/v1/audit?limit=200")["items"]
    reviewed = [e for e in audit if e["action"] == "request.reviewed"]
    assert reviewed, [e["action"] for e in audit]


def _csrf_token(page: Page) -> str:
    """The session's own token, from any form that carries one (the logout form)."""
    tokens = page.locator("input[name=csrf_token]")
    assert tokens.count() >= 1, "no form carries a csrf_token (the logout form should)"
    return str(tokens.first.get_attribute("value"))


def test_auditor_sees_no_actions_and_a_forged_action_is_refused(
    open_page: OpenPage, seeded: Seeded
) -> None:
    rid = seeded.in_review
    page = open_page(seeded.auditor_key)
    assert "auditor" in page.locator("[data-testid=whoami]").inner_text().lower()
    page.goto(f"/admin/requests/{rid}")
    assert _status_text(page) == "needs_review"
    assert page.locator("form[data-action]").count() == 0
    assert page.locator("form[action*='/review'], form[action*='/extend']").count() == 0
    page.goto("/admin/review")
    assert page.locator(f"[data-request-id='{rid}']").count() >= 1
    assert page.locator("form[data-action]").count() == 0

    token = _csrf_token(page)
    forged: list[tuple[str, dict[str, str | float | bool]]] = [
        (f"/admin/requests/{rid}/review", {"action": "approve", "note": "forged"}),
        (f"/admin/requests/{rid}/extend", {"reason": "forged"}),
        (f"/admin/requests/{rid}/cancel", {}),
    ]
    for path, form in forged:
        r = page.request.post(path, form={**form, "csrf_token": token}, max_redirects=0)
        assert r.status == 403, (path, r.status)
    d = _api(seeded, f"/v1/deletion-requests/{rid}")
    assert d["status"] == "needs_review" and not d["extended"], d
    assert _api(seeded, "/v1/models/claims-triage")["production_version"] == 1


def test_admin_action_without_the_csrf_token_is_refused(
    open_page: OpenPage, seeded: Seeded
) -> None:
    rid = seeded.in_review
    page = open_page(seeded.admin_key)
    page.goto(f"/admin/requests/{rid}")
    assert page.locator("form[data-action='approve'] input[name=csrf_token]").count() == 1
    forms: list[dict[str, str | float | bool]] = [
        {"action": "approve"},
        {"action": "approve", "csrf_token": "0" * 64},
    ]
    for form in forms:
        r = page.request.post(f"/admin/requests/{rid}/review", form=form, max_redirects=0)
        assert r.status == 403, (form, r.status)
        assert 'data-testid="error"' in r.text() or "data-testid=error" in r.text()
    assert _api(seeded, f"/v1/deletion-requests/{rid}")["status"] == "needs_review"


def test_screenshots_of_the_main_pages(
    open_page: OpenPage, seeded: Seeded, screenshots: Path
) -> None:
    login = open_page(None)
    login.goto("/admin/login")
    login.screenshot(path=str(screenshots / "login.png"), full_page=True)
    page = open_page(seeded.admin_key)
    # While visiting every page: no uncaught script error, nothing fetched from elsewhere.
    errors: list[str] = []
    foreign: list[str] = []
    host = urlparse(seeded.base_url).netloc
    page.on("pageerror", lambda exc: errors.append(str(exc)))
    page.on(
        "request",
        lambda req: (
            foreign.append(req.url)
            if urlparse(req.url).scheme in ("http", "https") and urlparse(req.url).netloc != host
            else None
        ),
    )
    pages = {
        "overview": ("/admin", ["chart-completions"]),
        "requests": ("/admin/requests", []),
        "request-detail": (
            f"/admin/requests/{seeded.in_review}",
            ["chart-fairness"],
        ),
        "report": (
            f"/admin/reports/{_report_id(seeded, seeded.in_review)}",
            ["chart-fairness", "chart-mia", "chart-utility"],
        ),
        "models": ("/admin/models/visit-risk", []),
        "jobs": ("/admin/jobs", []),
        "audit": ("/admin/audit", []),
        "webhooks": ("/admin/webhooks", []),
    }
    for name, (path, charts) in pages.items():
        page.goto(path)
        assert _path(page) == path.rstrip("/"), (name, page.url)
        for chart in charts:
            _chart(page, chart)
        page.screenshot(path=str(screenshots / f"{name}.png"), full_page=True)
    assert not errors, errors
    assert not foreign, foreign
    for name in [*pages, "login"]:
        png = screenshots / f"{name}.png"
        assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" and png.stat().st_size > 5000, name
    print(f"screenshots in {screenshots}")
