"""Chart data for the dashboard: plain plotly figure dicts ({"data", "layout"}) built from
stored numbers. Pages embed them as JSON and `static/dashboard.js` draws them, so nothing
here renders HTML and nothing user-supplied is ever evaluated as script."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

Figure = dict[str, Any]

BEFORE = "#9aa5b1"
AFTER = "#2f6fde"
FLAGGED = "#d64545"
COLOURS = {
    "forgotten": "#d64545",
    "forgotten_before": "#f0a35e",
    "forgotten_reference": "#8e6bd1",
    "nonmembers": "#2f6fde",
    "retained": "#2a9d6f",
}
LABELS = {
    "forgotten": "forgotten records (after)",
    "forgotten_before": "forgotten records (before)",
    "forgotten_reference": "forgotten records (reference models)",
    "nonmembers": "reference non-members",
    "retained": "retained members",
}
# Beyond this many groups a bar chart is unreadable: the largest and the flagged stay.
MAX_GROUPS = 30
FAIRNESS_METRICS = (("accuracy", "Accuracy"), ("tpr", "TPR"), ("fpr", "FPR"))


def _layout(title: str, **extra: Any) -> dict[str, Any]:
    return {
        "title": {"text": title, "font": {"size": 14}},
        "margin": {"l": 50, "r": 20, "t": 50, "b": 60},
        "paper_bgcolor": "#ffffff",
        "plot_bgcolor": "#ffffff",
        "font": {"family": "system-ui, -apple-system, Segoe UI, Roboto, sans-serif", "size": 12},
        "legend": {"orientation": "h", "y": -0.2},
        **extra,
    }


def _num(value: Any) -> float | None:
    return float(value) if isinstance(value, int | float) and not isinstance(value, bool) else None


def _check(checks: dict[str, Any], name: str) -> dict[str, Any] | None:
    c = checks.get(name)
    return c if isinstance(c, dict) else None


def _metrics(check: dict[str, Any]) -> dict[str, Any]:
    m = check.get("metrics")
    return m if isinstance(m, dict) else {}


def completions_per_day(days: Sequence[tuple[str, int]]) -> Figure:
    """Bar chart: requests completed per day (ISO dates, oldest first)."""
    yaxis: dict[str, Any] = {"rangemode": "tozero", "title": {"text": "requests"}}
    if max((n for _, n in days), default=0) < 10:
        yaxis["dtick"] = 1
    return {
        "data": [
            {
                "type": "bar",
                "x": [d for d, _ in days],
                "y": [n for _, n in days],
                "marker": {"color": AFTER},
                "name": "completed",
                "hovertemplate": "%{x}: %{y} completed<extra></extra>",
            }
        ],
        "layout": _layout(
            "Requests completed per day",
            yaxis=yaxis,
            xaxis={"type": "date"},
            showlegend=False,
        ),
    }


def _group_key(g: dict[str, Any]) -> tuple[str, str]:
    return str(g.get("column", "")), str(g.get("group", ""))


def fairness(check: dict[str, Any]) -> Figure | None:
    """Per-group accuracy, TPR and FPR before/after, one panel each; the groups the check
    flagged are drawn in red and marked in their labels."""
    m = _metrics(check)
    before = [g for g in m.get("before") or [] if isinstance(g, dict)]
    after = [g for g in m.get("after") or [] if isinstance(g, dict)]
    if not before and not after:
        return None
    flagged = {_group_key(f) for f in m.get("flagged") or [] if isinstance(f, dict)}
    b_by = {_group_key(g): g for g in before}
    a_by = {_group_key(g): g for g in after}
    keys = list(dict.fromkeys([*b_by, *a_by]))
    if len(keys) > MAX_GROUPS:
        size = {k: int((a_by.get(k) or b_by.get(k) or {}).get("n") or 0) for k in keys}
        keep = set(sorted(keys, key=lambda k: -size[k])[:MAX_GROUPS]) | (flagged & set(keys))
        keys = [k for k in keys if k in keep]
    columns = {c for c, _ in keys}

    def label(k: tuple[str, str]) -> str:
        name = k[1] if len(columns) == 1 else f"{k[0]}={k[1]}"
        return f"⚑ {name}" if k in flagged else name

    labels = [label(k) for k in keys]
    panels = [
        (key, title)
        for key, title in FAIRNESS_METRICS
        if any(_num((b_by.get(k) or {}).get(key)) is not None for k in keys)
        or any(_num((a_by.get(k) or {}).get(key)) is not None for k in keys)
    ]
    data: list[dict[str, Any]] = []
    layout = _layout(
        "Per group, before and after (flagged groups in red)",
        barmode="group",
        grid={"rows": 1, "columns": max(1, len(panels)), "pattern": "independent"},
        annotations=[],
        height=380,
    )
    for i, (key, title) in enumerate(panels, start=1):
        axis = "" if i == 1 else str(i)
        data.append(
            {
                "type": "bar",
                "name": "before",
                "x": labels,
                "y": [_num((b_by.get(k) or {}).get(key)) for k in keys],
                "marker": {"color": BEFORE},
                "xaxis": f"x{axis}",
                "yaxis": f"y{axis}",
                "showlegend": i == 1,
                "legendgroup": "before",
            }
        )
        data.append(
            {
                "type": "bar",
                "name": "after",
                "x": labels,
                "y": [_num((a_by.get(k) or {}).get(key)) for k in keys],
                "marker": {"color": [FLAGGED if k in flagged else AFTER for k in keys]},
                "xaxis": f"x{axis}",
                "yaxis": f"y{axis}",
                "showlegend": i == 1,
                "legendgroup": "after",
            }
        )
        layout[f"yaxis{axis}"] = {"range": [0, 1.05], "title": {"text": title}}
        layout[f"xaxis{axis}"] = {"tickangle": -30 if len(keys) > 6 else 0}
    return {"data": data, "layout": layout}


def membership(check: dict[str, Any]) -> Figure | None:
    """Distributions of the membership score (log p_y - log(1 - p_y)) per population: the
    forgotten records after (and before) unlearning, reference non-members, retained
    members. Reports without score samples get the attack AUCs instead."""
    m = _metrics(check)
    samples = m.get("score_samples")
    populations: list[tuple[str, list[float]]] = []
    if isinstance(samples, dict):
        for name in LABELS:
            values = [float(v) for v in samples.get(name) or [] if _num(v) is not None]
            if values:
                populations.append((name, values))
    data: list[dict[str, Any]] = []
    if populations:
        # One set of bins for every population, so the bars compare like with like.
        lo = min(min(v) for _, v in populations)
        hi = max(max(v) for _, v in populations)
        size = (hi - lo) / 30 if hi > lo else 1.0
        for name, values in populations:
            data.append(
                {
                    "type": "histogram",
                    "name": LABELS[name],
                    "x": values,
                    "histnorm": "probability density",
                    "opacity": 0.55,
                    "xbins": {"start": lo, "end": hi + size, "size": size},
                    "marker": {"color": COLOURS[name]},
                }
            )
    title = "Membership-inference scores"
    auc = _num((m.get("candidate") or {}).get("auc"))
    ref = _num((m.get("reference") or {}).get("auc"))
    if auc is not None:
        title += f" (attack AUC {auc:.3f}" + (f", reference {ref:.3f})" if ref is not None else ")")
    if data:
        return {
            "data": data,
            "layout": _layout(
                title,
                barmode="overlay",
                xaxis={"title": {"text": "score: higher looks more like a training member"}},
                yaxis={"title": {"text": "density"}},
                legend={"orientation": "h", "y": -0.3},
                margin={"l": 50, "r": 20, "t": 50, "b": 110},
                height=400,
            ),
        }
    aucs = [
        (label, _num((m.get(part) or {}).get("auc")))
        for part, label in (
            ("baseline", "before"),
            ("candidate", "after"),
            ("reference", "reference"),
        )
    ]
    aucs = [(k, v) for k, v in aucs if v is not None]
    if not aucs:
        return None
    return {
        "data": [
            {
                "type": "bar",
                "x": [k for k, _ in aucs],
                "y": [v for _, v in aucs],
                "marker": {"color": [BEFORE, AFTER, COLOURS["forgotten_reference"]][: len(aucs)]},
                "name": "attack AUC",
            }
        ],
        "layout": _layout(
            title, yaxis={"range": [0, 1], "title": {"text": "AUC"}}, showlegend=False
        ),
    }


def utility(check: dict[str, Any]) -> Figure | None:
    """Test accuracy of the current version and of the candidate."""
    m = _metrics(check)
    base, cand = _num(m.get("baseline_accuracy")), _num(m.get("candidate_accuracy"))
    if base is None and cand is None:
        return None
    drop = _num((check.get("threshold") or {}).get("max_drop"))
    passed = bool(check.get("passed"))
    layout = _layout(
        "Test accuracy before and after" + (f" (max drop {drop:.3f})" if drop is not None else ""),
        yaxis={"range": [0, 1.05], "title": {"text": "accuracy"}},
        showlegend=False,
        height=320,
    )
    if base is not None and drop is not None:
        layout["shapes"] = [
            {
                "type": "line",
                "xref": "paper",
                "x0": 0,
                "x1": 1,
                "y0": base - drop,
                "y1": base - drop,
                "line": {"color": FLAGGED, "dash": "dot", "width": 1},
            }
        ]
    return {
        "data": [
            {
                "type": "bar",
                "x": ["before", "after"],
                "y": [base, cand],
                "marker": {"color": [BEFORE, AFTER if passed else FLAGGED]},
                "text": [f"{v:.3f}" if v is not None else "" for v in (base, cand)],
                "textposition": "auto",
            }
        ],
        "layout": layout,
    }


def feature(check: dict[str, Any]) -> Figure | None:
    """Feature requests: score change when the feature is flipped, and the score gap
    between rows with and without it, before and after."""
    m = _metrics(check)
    after = m.get("after") if isinstance(m.get("after"), dict) else None
    before = m.get("before") if isinstance(m.get("before"), dict) else None
    if after is None and before is None:
        return None
    measures = (
        ("max_abs_change", "max score change"),
        ("mean_abs_change", "mean score change"),
        ("group_gap", "score gap"),
    )
    data: list[dict[str, Any]] = []
    for name, part, colour in (("before", before, BEFORE), ("after", after, AFTER)):
        if part is None:
            continue
        data.append(
            {
                "type": "bar",
                "name": name,
                "x": [label for _, label in measures],
                "y": [_num(part.get(key)) for key, _ in measures],
                "marker": {"color": colour},
            }
        )
    feature_name = str(m.get("feature") or "the feature")
    return {
        "data": data,
        "layout": _layout(
            f"Flipping {feature_name}: score change before and after",
            barmode="group",
            yaxis={"title": {"text": "probability"}, "rangemode": "tozero"},
            height=320,
        ),
    }


def report_charts(checks: dict[str, Any], suffix: str = "") -> dict[str, Figure]:
    """Element id -> figure for every chart a report's checks can draw."""
    out: dict[str, Figure] = {}
    builders = (
        ("fairness", "fairness", fairness),
        ("mia", "forgetting", membership),
        ("utility", "utility", utility),
        ("feature", "feature", feature),
    )
    for chart, check_name, build in builders:
        check = _check(checks, check_name)
        fig = build(check) if check is not None else None
        if fig is not None:
            out[f"chart-{chart}{suffix}"] = fig
    return out
