"""Make the README's dashboard screenshot from real seeded state.

    .venv/bin/python -m tests.browser.make_screenshot [--out docs/dashboard.png]
        [--page report|overview|request]

Starts the embedded stack (a real API process and a real Celery worker on SQLite), seeds
it over HTTP as the browser tests do (plus a larger model and a source withdrawal held
for approval, for fuller charts), logs in with Debian's Chromium and saves one
viewport-sized (1280x900) PNG.
"""

from __future__ import annotations

import argparse
import io
import json
import re
import sys
import tempfile
from pathlib import Path

from app.stack import LocalStack
from tests.browser.seeding import Seeded, job_state, seed, settle
from tests.support.factories import dataset_spec, make_csv, make_rows

CHROMIUM = "/usr/bin/chromium"
LIMIT = 400_000  # bytes: the README image stays small


def showcase(s: Seeded) -> str:
    """A larger model and a source withdrawal waiting for approval, so that the report's
    charts have something to show (a third of the data forgotten); returns the request."""
    admin = s.client()
    rows = make_rows(n_subjects=400, seed=5, subject_prefix="applicant")
    for row in rows:  # sources of its own: the withdrawal reaches this model only
        row["source"] = "college-" + str(row["source"]).split("-")[-1]
    data = make_csv(rows)
    r = admin.post(
        "/v1/datasets",
        files={"file": ("admissions.csv", io.BytesIO(data), "text/csv")},
        data={"spec": json.dumps(dataset_spec("admissions"))},
    )
    assert r.status_code == 201, r.text
    r = admin.post(
        "/v1/models",
        json={
            "name": "admissions-screen",
            "dataset_id": r.json()["id"],
            "architecture": {"kind": "mlp", "hidden": [32]},
            "training": {"epochs": 8, "batch_size": 32, "lr": 0.02, "seed": 4},
            "unlearning": {"mode": "sisa", "shards": 4, "slices": 2, "sharding": "source"},
            "verification": {"utility_max_drop": 0.1, "require_approval": True},
        },
    )
    assert r.status_code == 202, r.text
    assert job_state(admin, r.json()["job_id"])["status"] == "succeeded"
    r = admin.post(
        "/v1/deletion-requests",
        json={"kind": "source", "source": "college-b", "reason": "the clinic withdrew consent"},
    )
    assert r.status_code == 202, r.text
    rid = str(r.json()["id"])
    assert settle(admin, rid)["status"] == "needs_review"
    return rid


def _path(s: Seeded, page: str, rid: str) -> tuple[str, list[str]]:
    """The page's path and the charts to wait for."""
    with s.client() as admin:
        (m,) = admin.get(f"/v1/deletion-requests/{rid}").json()["models"]
    return {
        "overview": ("/admin", ["chart-completions"]),
        "request": (f"/admin/requests/{rid}", ["chart-fairness"]),
        "report": (f"/admin/reports/{m['report_id']}", ["chart-fairness", "chart-mia"]),
    }[page]


def shoot(out: Path, page_name: str) -> int:
    from playwright.sync_api import sync_playwright

    folder = Path(tempfile.mkdtemp(prefix="palimpsest-shot-"))
    stack = LocalStack(
        folder / "stack",
        env={"PALIMPSEST_DEVICE": "cpu", "PALIMPSEST_WEBHOOK_ALLOWED_NETWORKS": "127.0.0.0/8"},
    )
    stack.start()
    try:
        s = seed(stack)
        path, charts = _path(s, page_name, showcase(s))
        with sync_playwright() as pw:
            browser = pw.chromium.launch(executable_path=CHROMIUM, headless=True)
            ctx = browser.new_context(base_url=s.base_url, viewport={"width": 1280, "height": 900})
            page = ctx.new_page()
            page.goto("/admin/login")
            page.fill("form#login input[name=key]", s.admin_key)
            page.click("form#login button[type=submit]")
            page.wait_for_url(re.compile(r"/admin/?$"))
            page.goto(path)
            for chart in charts:
                page.wait_for_selector(f"#{chart}.js-plotly-plot", state="attached")
            page.wait_for_timeout(500)  # plotly's transitions settle
            out.parent.mkdir(parents=True, exist_ok=True)
            page.screenshot(path=str(out))
            browser.close()
    finally:
        stack.stop()
    size = out.stat().st_size
    print(f"{out}: {size} bytes")
    if size > LIMIT:
        print(f"error: {out} is over {LIMIT} bytes", file=sys.stderr)
        return 1
    return 0


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0] if __doc__ else None)
    ap.add_argument("--out", type=Path, default=Path("docs/dashboard.png"))
    ap.add_argument("--page", choices=["overview", "request", "report"], default="report")
    args = ap.parse_args()
    return shoot(args.out, args.page)


if __name__ == "__main__":
    sys.exit(main())
