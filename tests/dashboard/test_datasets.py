"""The dataset pages: a media dataset's columns with their kinds, its files and bytes, the
models trained on it (and the model page's link back), and a media model's report with its
per-group fairness chart."""

from __future__ import annotations

import json
import re

from app.dashboard.pages import _size
from tests.dashboard.helpers import login
from tests.media import gen
from tests.media.test_flow import SMALL
from tests.support.app_env import AppEnv
from tests.support.factories import auth, create_key, create_model, plan_and_run, post_dataset


def _row(html: str, column: str) -> str:
    return html[html.index(f'data-column="{column}"') :].split("</tr>")[0]


def test_media_dataset_page_model_link_and_report_chart(env: AppEnv) -> None:
    admin = create_key("admin")
    recs = gen.rows("image", n_subjects=12, seed=3, prefix="dsp-")
    resp = post_dataset(
        env.client, admin, gen.zip_bytes(recs, "image"), gen.spec("scans", "image"), "d.zip"
    )
    assert resp.status_code == 201, resp.text
    ds = resp.json()
    create_model(
        env.client,
        admin,
        ds["id"],
        name="scan-triage",
        architecture={"kind": "mlp", "hidden": [4], "encoders": {"media": SMALL["image"]}},
        verification={"utility_max_drop": 1.0, "fairness_max_drop": 1.0, "min_group_size": 2},
    )
    browser = login(env, create_key("auditor"))  # auditors see every page

    listing = browser.get("/admin/datasets")
    assert listing.status_code == 200, listing.text
    assert f'href="/admin/datasets/{ds["id"]}"' in listing.text
    assert "1 image" in re.sub(
        r"<[^>]+>", "", _row(listing.text.replace("data-dataset", "data-column"), "scans")
    )

    page = browser.get(f"/admin/datasets/{ds['id']}")
    assert page.status_code == 200, page.text
    html = page.text
    assert 'data-kind="image"' in _row(html, "media")
    assert 'data-kind="numeric"' in _row(html, "age")
    assert 'data-kind="subject"' in _row(html, "subject")
    assert 'data-kind="label"' in _row(html, "label") and "no, yes" in _row(html, "label")
    assert 'data-kind="source"' in _row(html, "source")
    assert 'data-kind="categorical"' in _row(html, "group")
    assert "feature, group" in _row(html, "group")
    # Each image stored once per partition: at most one file per record.
    usage = re.search(r'data-testid="media-usage">.*?>([\d,]+) files<', html, re.S)
    assert usage is not None, html
    assert 0 < int(usage.group(1).replace(",", "")) <= len(recs)
    assert 'href="/admin/models/scan-triage"' in _row(
        html.replace("data-model", "data-column"), "scan-triage"
    )

    model = browser.get("/admin/models/scan-triage").text
    assert f'<a href="/admin/datasets/{ds["id"]}">scans</a>' in model

    r = env.client.post(
        "/v1/deletion-requests",
        headers=auth(create_key("portal")),
        json={"kind": "subject", "subject_id": "dsp-s003", "reason": "GDPR Art. 17"},
    )
    assert r.status_code == 202, r.text
    view = plan_and_run(env.client, admin, r.json()["id"])
    report_id = view["models"][0]["report_id"]
    assert report_id, view
    report = browser.get(f"/admin/reports/{report_id}").text
    assert 'id="chart-fairness"' in report
    charts = json.loads(
        re.search(
            r'<script type="application/json" id="chart-data">(.*?)</script>', report, re.S
        ).group(1)  # type: ignore[union-attr]
    )
    fairness = charts["chart-fairness"]
    assert {"a", "b"} <= {str(x) for t in fairness["data"] for x in t.get("x") or t.get("y") or []}


def test_unknown_dataset_is_a_404_page_and_sizes_read_in_binary_units(env: AppEnv) -> None:
    browser = login(env, create_key("admin"))
    assert browser.get("/admin/datasets/nope").status_code == 404
    assert browser.get("/admin/datasets/" + "x" * 100).status_code == 404
    assert [_size(v) for v in (0, 1023, 1536, 5 * 1024**2, 3 * 1024**3)] == [
        "0 B",
        "1023 B",
        "1.5 KiB",
        "5.0 MiB",
        "3.00 GiB",
    ]
    assert _size(None) == "\u2013"
