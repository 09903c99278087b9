"""View models: counts, deadlines, completions, compute saved, filters, shard maps and
the charts drawn from a report's checks. Each test gets a database of its own, since the
overview counts everything in it."""

from __future__ import annotations

import re
from collections.abc import Iterator
from datetime import timedelta
from itertools import pairwise
from pathlib import Path
from typing import Any

import pytest

from app.core.db import session_scope
from app.core.errors import BadRequest
from app.dashboard import charts, ops_views, views
from app.models import ModelVersion
from app.models.base import utcnow
from tests.dashboard.helpers import login, seed_job, seed_model, seed_request
from tests.support.app_env import AppEnv, app_env
from tests.support.factories import create_key


@pytest.fixture
def fresh(tmp_path: Path) -> Iterator[AppEnv]:
    with app_env(tmp_path) as e:
        yield e


def test_overview_counts_deadlines_and_completions(fresh: AppEnv) -> None:
    now = utcnow()
    with session_scope() as s:
        soon = seed_request(s, due_in=timedelta(days=2)).id
        seed_request(s, due_in=timedelta(days=10))  # neither soon nor late
        late = seed_request(s, status="unlearning", due_in=timedelta(hours=-5)).id
        # Closed requests are never due or overdue, whatever their date.
        seed_request(s, status="completed", due_in=timedelta(days=-3), completed_at=now)
        seed_request(
            s, status="completed", due_in=timedelta(days=1), completed_at=now - timedelta(days=2)
        )
        seed_request(
            s, status="completed", due_in=timedelta(days=1), completed_at=now - timedelta(days=45)
        )
        seed_request(s, status="cancelled", due_in=timedelta(days=1))
    with session_scope() as s:
        ov = views.overview(s, now)
    assert ov.counts["received"] == 2 and ov.counts["unlearning"] == 1
    assert ov.counts["completed"] == 3 and ov.counts["cancelled"] == 1
    assert ov.counts["needs_review"] == 0 and set(ov.counts) >= {"failed", "rejected"}
    assert ov.total == 7 and ov.open == 3
    assert [r.id for r in ov.due_soon] == [soon]
    assert abs(ov.due_soon[0].seconds_left - 2 * 86400) < 60
    assert [r.id for r in ov.overdue] == [late] and ov.overdue[0].overdue
    assert len(ov.completions) == 30
    per_day = dict(ov.completions)
    assert per_day[now.date().isoformat()] == 1
    assert per_day[(now - timedelta(days=2)).date().isoformat()] == 1
    assert sum(per_day.values()) == 2  # the one 45 days ago is outside the window
    fig = ov.charts["chart-completions"]
    assert fig["data"][0]["y"] == [n for _, n in ov.completions]


def test_compute_saved_counts_finished_unlearning_and_retraining_only(fresh: AppEnv) -> None:
    with session_scope() as s:
        m = seed_model(s, "m")
        seed_job(s, m, cost={"device_seconds": 10.0, "retrain_estimate_seconds": 100.0})
        seed_job(
            s, m, kind="retrain", cost={"device_seconds": 30.0, "retrain_estimate_seconds": 60.0}
        )
        seed_job(
            s, m, kind="train", cost={"device_seconds": 50.0, "retrain_estimate_seconds": 50.0}
        )
        seed_job(
            s, m, status="failed", cost={"device_seconds": 5.0, "retrain_estimate_seconds": 99.0}
        )
        seed_job(s, m, cost={"device_seconds": 5.0})  # no estimate: cannot be compared
        seed_job(s, m, status="running", progress=0.4)
    with session_scope() as s:
        c = views.compute_saved(s)
        running = views.active_jobs(s)
    assert c.jobs == 2
    assert c.device_seconds == 40.0 and c.retrain_estimate_seconds == 160.0
    assert c.saved_seconds == 120.0 and c.saved_share == pytest.approx(0.75)
    assert [j.percent for j in running] == [40]


def test_overview_page_shows_counts_countdowns_and_progress(fresh: AppEnv) -> None:
    with session_scope() as s:
        rid = seed_request(s, due_in=timedelta(days=3)).id
        job = seed_job(s, seed_model(s, "m"), status="running", progress=0.25).id
    client = login(fresh, create_key("auditor"))
    html = client.get("/admin").text
    counts = html[html.index('data-testid="status-counts"') :]
    m = re.search(r'data-status="received"[^>]*>\s*<div class="stat-n">(\d+)<', counts)
    assert m is not None and m.group(1) == "1"
    assert re.search(
        rf'data-testid="due-soon".*data-request-id="{rid}".*data-countdown', html, re.S
    )
    assert re.search(rf'<progress data-job-id="{job}"[^>]*value="25"', html)
    assert 'data-testid="compute-saved"' in html and 'id="chart-completions"' in html
    live = client.get(f"/admin/jobs.json?ids={job},unknown").json()
    assert live == {"jobs": [live["jobs"][0]]} and live["jobs"][0]["progress"] == 0.25
    assert client.get(f"/admin/jobs/{job}.json").json()["status"] == "running"
    assert client.get("/admin/jobs/nope.json").status_code == 404


def test_request_filters(fresh: AppEnv) -> None:
    with session_scope() as s:
        a = seed_request(s, source="district-a").id
        b = seed_request(s, status="completed", source="district-b", completed_at=utcnow()).id
        c = seed_request(s, kind="feature", source=None).id

    def ids(**kw: Any) -> list[str]:
        f = views.parse_filters(kw.get("status"), kw.get("kind"), kw.get("q"), kw.get("page"))
        with session_scope() as s:
            return [r.id for r in views.request_list(s, f).rows]

    assert set(ids()) == {a, b, c}
    assert ids(status="completed") == [b]
    assert ids(kind="feature") == [c]
    assert ids(q="district-a") == [a]
    assert ids(q="%") == [] and ids(q="_") == []  # LIKE wildcards are literal
    assert ids(status="", kind=" ") == ids()
    assert ids(page="2") == []
    for bad in ({"status": "bogus"}, {"kind": "person"}, {"page": "0"}, {"page": "x"}):
        with pytest.raises(BadRequest):
            ids(**bad)
    client = login(fresh, create_key("admin"))
    page = client.get("/admin/requests?status=completed")
    assert page.status_code == 200
    assert re.findall(r'<tr data-request-id="(\w+)"', page.text) == [b]
    assert 'data-testid="filters"' in page.text
    assert client.get("/admin/requests?status=nope").status_code == 400
    assert client.get("/admin/requests?page=-1").status_code == 400
    assert client.get("/admin/requests/" + "x" * 500).status_code == 404


def _version(model_id: str, v: int, keys: list[str], n: list[int], status: str) -> ModelVersion:
    return ModelVersion(
        model_id=model_id,
        version=v,
        status=status,
        manifest={
            "entries": [
                {"shard": i, "final_key": k, "n_records": c}
                for i, (k, c) in enumerate(zip(keys, n, strict=True))
            ]
        },
    )


def test_shard_map_marks_the_shards_each_version_retrained(fresh: AppEnv) -> None:
    with session_scope() as s:
        m = seed_model(s, "sisa")
        m.production_version = 2
        s.add(_version(m.id, 1, ["a", "b", "c"], [10, 10, 10], "retired"))
        s.add(_version(m.id, 2, ["a", "b2", "c"], [10, 9, 10], "production"))
        s.add(_version(m.id, 3, ["a3", "b2", "c3"], [8, 9, 7], "candidate"))
    with session_scope() as s:
        d = ops_views.model_detail(s, "sisa")
    assert d.shards == [0, 1, 2]
    by_version = {row.version: [c.retrained for c in row.cells] for row in d.shard_map}
    assert by_version == {1: [True, True, True], 2: [False, True, False], 3: [True, False, True]}
    assert [(v.version, v.production, v.retrained_shards) for v in d.versions] == [
        (3, False, [0, 2]),
        (2, True, [1]),
        (1, False, [0, 1, 2]),
    ]
    # Shard 0 alone must not read as "0" (= none).
    assert [v.retrained_label for v in d.versions] == [
        "shards 0, 2 (2 of 3)",
        "shard 1 (1 of 3)",
        "all 3",
    ]
    assert ops_views.retrained_label([0], 8) == "shard 0 (1 of 8)"
    assert ops_views.retrained_label([], 8) == "none"
    assert ops_views.retrained_label([0], 1) == "the whole model"
    assert ops_views.retrained_label([], 0) == "\u2013"
    assert ops_views.retrained_label(list(range(10)), 64) == "shards 0, 1, 2, 3, 4, 5, … (10 of 64)"
    html = login(fresh, create_key("auditor")).get("/admin/models/sisa").text
    assert ">shard 1 (1 of 3)</td>" in html
    assert html.count('data-testid="production-marker"') == 1
    assert re.search(r'<tr data-version="2"[^>]*>\s*<td>v2 <span[^>]*production-marker', html)
    assert 'data-testid="shard-map"' in html and html.count('data-retrained="true"') == 6


def test_certified_budget_comes_from_the_serving_version(fresh: AppEnv) -> None:
    config = {
        "architecture": {"kind": "logreg"},
        "unlearning": {"mode": "monolithic", "certified": True},
        "resolved": {},
    }
    with session_scope() as s:
        m = seed_model(s, "cert", config)
        m.production_version = 2
        s.add(_version(m.id, 1, ["a"], [100], "retired"))
        v2 = _version(m.id, 2, ["b"], [99], "production")
        v2.metrics = {
            "unlearning": {
                "method": "certified",
                "budget": 2.0,
                "budget_left": 0.5,
                "epsilon": 1.0,
                "delta": 1e-5,
            }
        }
        s.add(v2)
    with session_scope() as s:
        d = ops_views.model_detail(s, "cert")
    assert d.certified is not None and d.certified.version == 2
    assert d.certified.share_left == pytest.approx(0.25)
    html = login(fresh, create_key("admin")).get("/admin/models/cert").text
    assert 'data-testid="certified-budget"' in html and "25.0% left" in html
    assert login(fresh, create_key("admin")).get("/admin/models/nope").status_code == 404


FAIR = {
    "passed": False,
    "metrics": {
        "flagged": [
            {
                "column": "lang",
                "group": "es",
                "metric": "accuracy",
                "before": 0.9,
                "after": 0.7,
                "drop": 0.2,
                "n": 80,
                "z": 4.0,
            }
        ],
        "before": [
            {"group": "en", "column": "lang", "n": 300, "accuracy": 0.9, "tpr": 0.8, "fpr": 0.1},
            {"group": "es", "column": "lang", "n": 80, "accuracy": 0.9, "tpr": 0.85, "fpr": 0.1},
        ],
        "after": [
            {"group": "en", "column": "lang", "n": 300, "accuracy": 0.91, "tpr": 0.8, "fpr": 0.1},
            {"group": "es", "column": "lang", "n": 80, "accuracy": 0.7, "tpr": 0.6, "fpr": 0.2},
        ],
    },
    "threshold": {"max_drop": 0.05},
}
CHECKS: dict[str, Any] = {
    "utility": {
        "passed": True,
        "metrics": {"candidate_accuracy": 0.8, "baseline_accuracy": 0.82, "drop": 0.02},
        "threshold": {"max_drop": 0.05},
    },
    "fairness": FAIR,
    "forgetting": {
        "passed": True,
        "metrics": {
            "candidate": {"auc": 0.51},
            "reference": {"auc": 0.5},
            "score_samples": {
                "forgotten": [0.1, 0.2, None],
                "nonmembers": [-1.0, 0.0, 1.0],
                "retained": [2.0, 2.5],
                "forgotten_before": [],
            },
        },
    },
    "feature": {
        "passed": True,
        "metrics": {
            "feature": "licence",
            "before": {"max_abs_change": 0.3, "mean_abs_change": 0.1, "group_gap": 0.2},
            "after": {"max_abs_change": 0.0, "mean_abs_change": 0.0, "group_gap": 0.01},
        },
    },
}


def test_report_charts_from_checks() -> None:
    figs = charts.report_charts(CHECKS)
    assert set(figs) == {"chart-fairness", "chart-mia", "chart-utility", "chart-feature"}
    fair = figs["chart-fairness"]
    after_acc = fair["data"][1]
    assert after_acc["name"] == "after" and after_acc["x"] == ["en", "⚑ es"]
    assert after_acc["y"] == [0.91, 0.7]
    assert after_acc["marker"]["color"] == [charts.AFTER, charts.FLAGGED]
    assert [t["yaxis"] for t in fair["data"]] == ["y", "y", "y2", "y2", "y3", "y3"]
    mia = figs["chart-mia"]["data"]
    assert [t["name"] for t in mia] == [
        charts.LABELS["forgotten"],
        charts.LABELS["nonmembers"],
        charts.LABELS["retained"],
    ]
    # One set of bins for every population; each population's densities integrate to 1.
    assert len({str(t["x"]) for t in mia}) == 1 and len({t["width"] for t in mia}) == 1
    assert all(abs(sum(t["y"]) * t["width"] - 1) < 1e-3 for t in mia)
    assert "shapes" not in figs["chart-mia"]["layout"]  # nothing beyond the range here
    assert figs["chart-utility"]["data"][0]["y"] == [0.82, 0.8]
    feature = figs["chart-feature"]["data"]
    assert [t["name"] for t in feature] == ["before", "after"] and feature[1]["y"][0] == 0.0
    # Older reports without score samples: the attack AUCs instead.
    old = charts.membership({"metrics": {"candidate": {"auc": 0.6}, "baseline": {"auc": 0.7}}})
    assert old is not None and old["data"][0]["y"] == [0.7, 0.6]
    # Whatever a check holds, drawing never fails; nothing to draw is no chart.
    odd = {"fairness": {"metrics": {"before": "x"}}, "utility": {"metrics": []}, "forgetting": 3}
    assert charts.report_charts(odd) == {}
    assert set(charts.report_charts(CHECKS, suffix="-r1")) == {
        f"chart-{k}-r1" for k in ("fairness", "mia", "utility", "feature")
    }


def test_membership_counts_saturated_scores_in_a_labelled_overflow_bar() -> None:
    bulk = [i / 10 for i in range(180)]  # 0.0 .. 17.9
    sat = [27.631] * 20  # p_y floored at 1 - 1e-12: the model is certain
    fig = charts.membership({"metrics": {"score_samples": {"forgotten": bulk + sat}}})
    assert fig is not None
    (bars,) = fig["data"]
    xaxis = fig["layout"]["xaxis"]
    lo, hi = xaxis["range"]
    assert lo == 0.0 and hi < 20  # the axis shows the bulk, not 0..27.6
    assert bars["x"][-1] < hi and bars["x"][-1] > 17.9
    assert bars["y"][-1] * bars["width"] * 200 == pytest.approx(20, abs=0.01)
    assert xaxis["ticktext"][-1] == "> 17.9"
    assert (
        "bar > 17.9: 20 score(s) above 17.9 (up to 27.6; 20 saturated" in (xaxis["title"]["text"])
    )
    assert "20 of 200 above 17.9" in bars["hovertext"][-1]
    assert len(fig["layout"]["shapes"]) == 1
    # A normal tail stays on the axis: no overflow bar for it.
    plain = [((i * 37) % 101) / 10 - 5 for i in range(200)]
    fig = charts.membership({"metrics": {"score_samples": {"nonmembers": plain}}})
    assert fig is not None and "shapes" not in fig["layout"]
    assert charts.score_range(plain) == (min(plain), max(plain))


def test_fairness_panels_do_not_overlap() -> None:
    fig = charts.fairness(FAIR)
    assert fig is not None
    layout = fig["layout"]
    domains = [layout[f"xaxis{a}"]["domain"] for a in ("", "2", "3")]
    assert all(a[1] < b[0] for a, b in pairwise(domains))
    # Panel names above the panels, not y-axis titles drawn into the neighbour.
    assert [a["text"] for a in layout["annotations"]] == [t for _, t in charts.FAIRNESS_METRICS]
    assert all("title" not in layout[f"yaxis{a}"] for a in ("", "2", "3"))


def test_many_groups_keep_the_largest_and_the_flagged() -> None:
    before = [{"group": f"g{i}", "column": "d", "n": 100 + i, "accuracy": 0.8} for i in range(60)]
    after = [dict(g) for g in before]
    flagged = [{"column": "d", "group": "g0", "metric": "accuracy"}]
    fig = charts.fairness({"metrics": {"before": before, "after": after, "flagged": flagged}})
    assert fig is not None
    labels = fig["data"][0]["x"]
    assert len(labels) == charts.MAX_GROUPS + 1 and "⚑ g0" in labels and "g59" in labels
