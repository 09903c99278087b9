"""Chart data for the dashboard: plain plotly figure dicts ({"data", "layout"}) built from
stored numbers. Pages embed them as JSON and `static/dashboard.js` draws them, so nothing
here renders HTML and nothing user-supplied is ever evaluated as script."""

from __future__ import annotations

import math
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
FAIRNESS_METRICS = (
    ("accuracy", "Accuracy"),
    ("tpr", "True-positive rate"),
    ("fpr", "False-positive rate"),
)
# Membership scores are log p_y - log(1 - p_y) with both probabilities floored at 1e-12
# (app.ml.verify.membership), so |score| ~ 27.6 means "saturated": the model is as sure
# as float precision allows. Such scores, and a sparse far tail, go to an overflow bar.
SATURATED = 27.0
SCORE_BINS = 30


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
    n = max(1, len(panels))
    # Panels side by side with room between them; each panel's name sits above it (no
    # y-axis titles, which would be drawn over the previous panel), and only the first
    # panel repeats the shared 0..1 scale.
    gap = 0.06
    width = (1 - gap * (n - 1)) / n
    domains = [[round(i * (width + gap), 4), round(i * (width + gap) + width, 4)] for i in range(n)]
    layout = _layout(
        "Per group, before and after (flagged groups in red)",
        barmode="group",
        annotations=[
            {
                "text": title,
                "xref": "paper",
                "yref": "paper",
                "x": (lo + hi) / 2,
                "y": 1.0,
                "xanchor": "center",
                "yanchor": "bottom",
                "yshift": 6,
                "showarrow": False,
                "font": {"size": 12},
            }
            for (_, title), (lo, hi) in zip(panels, domains, strict=True)
        ],
        margin={"l": 40, "r": 10, "t": 80, "b": 40},
        legend={"orientation": "h", "x": 0, "y": 0, "yref": "container", "yanchor": "bottom"},
        height=400,
    )
    for i, (key, _title) in enumerate(panels, start=1):
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
        layout[f"yaxis{axis}"] = {
            "range": [0, 1.05],
            "anchor": f"x{axis}",
            "showticklabels": i == 1,
            "tickformat": ".1f",
        }
        xaxis: dict[str, Any] = {
            "domain": domains[i - 1],
            "anchor": f"y{axis}",
            "automargin": True,
        }
        if len(keys) > 6:
            xaxis["tickangle"] = -45  # otherwise plotly tilts labels only when they collide
        layout[f"xaxis{axis}"] = xaxis
    return {"data": data, "layout": layout}


def _quantile(values: Sequence[float], q: float) -> float:
    """Linear-interpolated quantile of sorted values."""
    pos = q * (len(values) - 1)
    i = int(pos)
    j = min(i + 1, len(values) - 1)
    return values[i] + (values[j] - values[i]) * (pos - i)


def score_range(values: Sequence[float]) -> tuple[float, float]:
    """The x range the histogram bins: saturated scores aside, the 1st to 99th percentile,
    widened to the minimum and maximum unless they lie far (a quarter of that range)
    beyond it.
    Anything outside is counted in an overflow (or underflow) bar."""
    pool = sorted(values)
    bulk = [v for v in pool if abs(v) < SATURATED] or pool
    q_lo, q_hi = _quantile(bulk, 0.01), _quantile(bulk, 0.99)
    slack = 0.25 * (q_hi - q_lo)
    lo = min(v for v in bulk if v >= q_lo - slack)
    hi = max(v for v in bulk if v <= q_hi + slack)
    if hi - lo < 1e-9:
        lo, hi = lo - 0.5, hi + 0.5
    return lo, hi


def _nice_ticks(lo: float, hi: float, target: int = 6) -> list[float]:
    raw = (hi - lo) / target
    mag = 10 ** math.floor(math.log10(raw))
    step = next(m * mag for m in (1, 2, 2.5, 5, 10) if m * mag >= raw)
    first = math.ceil(lo / step - 1e-9)
    ticks = [round(k * step, 10) for k in range(first, math.floor(hi / step + 1e-9) + 1)]
    return ticks


def _fmt(v: float) -> str:
    return f"{v:.3g}" if abs(v) < 1000 else f"{v:.0f}"


def membership(check: dict[str, Any]) -> Figure | None:
    """Distributions of the membership score (log p_y - log(1 - p_y)) per population: the
    forgotten records after (and before) unlearning, reference non-members, retained
    members, binned here as density bars over one shared set of bins. Scores beyond the
    bulk (saturated ones, a far tail) are counted in labelled overflow bars at the edges
    rather than stretching the axis. Reports without score samples get the attack AUCs
    instead."""
    m = _metrics(check)
    samples = m.get("score_samples")
    populations: list[tuple[str, list[float]]] = []
    if isinstance(samples, dict):
        for name in LABELS:
            values = [float(v) for v in samples.get(name) or [] if _num(v) is not None]
            values = [v for v in values if math.isfinite(v)]
            if values:
                populations.append((name, values))
    data: list[dict[str, Any]] = []
    notes: list[str] = []
    shapes: list[dict[str, Any]] = []
    xaxis: dict[str, Any] = {}
    if populations:
        lo, hi = score_range([v for _, vs in populations for v in vs])
        size = (hi - lo) / SCORE_BINS
        below = [v for _, vs in populations for v in vs if v < lo]
        above = [v for _, vs in populations for v in vs if v > hi]
        # Overflow bars sit two bins clear of the range, on a shaded strip.
        under_x, over_x = lo - 2 * size, hi + 2 * size
        centres = [lo + (i + 0.5) * size for i in range(SCORE_BINS)]
        for name, values in populations:
            counts = [0] * SCORE_BINS
            n_below = n_above = 0
            for v in values:
                if v < lo:
                    n_below += 1
                elif v > hi:
                    n_above += 1
                else:
                    counts[min(int((v - lo) / size), SCORE_BINS - 1)] += 1
            total = len(values)
            xs, ys, hover = [], [], []
            label = LABELS[name]
            if below:
                xs.append(under_x)
                ys.append(n_below / (total * size))
                hover.append(f"{label}<br>{n_below} of {total} below {_fmt(lo)}")
            for c, centre in zip(counts, centres, strict=True):
                xs.append(round(centre, 6))
                ys.append(c / (total * size))
                hover.append(
                    f"{label}<br>{c} of {total} in {_fmt(centre - size / 2)}"
                    f" to {_fmt(centre + size / 2)}"
                )
            if above:
                xs.append(over_x)
                ys.append(n_above / (total * size))
                hover.append(f"{label}<br>{n_above} of {total} above {_fmt(hi)}")
            data.append(
                {
                    "type": "bar",
                    "name": label,
                    "x": xs,
                    "y": [round(y, 6) for y in ys],
                    "width": size,
                    "opacity": 0.55,
                    "marker": {"color": COLOURS[name]},
                    "hovertext": hover,
                    "hovertemplate": "%{hovertext}<extra></extra>",
                }
            )
        ticks = [t for t in _nice_ticks(lo, hi) if lo - size / 2 <= t <= hi + size / 2]
        tickvals: list[float] = list(ticks)
        ticktext = [_fmt(t) for t in ticks]
        left, right = lo, hi
        for side, xpos, edge, extra in (
            ("below", under_x, lo, below),
            ("above", over_x, hi, above),
        ):
            if not extra:
                continue
            sign = "<" if side == "below" else ">"
            # Room for the overflow bar's own label: drop the nearest regular ticks.
            keep = [
                (v, t) for v, t in zip(tickvals, ticktext, strict=True) if abs(v - xpos) > 4 * size
            ]
            tickvals, ticktext = [v for v, _ in keep], [t for _, t in keep]
            tickvals.append(xpos)
            ticktext.append(f"{sign} {_fmt(edge)}")
            far = min(extra) if side == "below" else max(extra)
            saturated = sum(abs(v) >= SATURATED for v in extra)
            notes.append(
                f"bar {sign} {_fmt(edge)}: {len(extra)} score(s) {side} {_fmt(edge)}"
                f" ({'down' if side == 'below' else 'up'} to {_fmt(far)}"
                + (f"; {saturated} saturated, p = 1" if saturated else "")
                + ")"
            )
            x0, x1 = (xpos - size, edge) if side == "below" else (edge, xpos + size)
            shapes.append(
                {
                    "type": "rect",
                    "xref": "x",
                    "yref": "paper",
                    "x0": x0,
                    "x1": x1,
                    "y0": 0,
                    "y1": 1,
                    "fillcolor": "#eef1f5",
                    "line": {"width": 0},
                    "layer": "below",
                }
            )
            if side == "below":
                left = xpos - size
            else:
                right = xpos + size
        xaxis = {
            "range": [left, right],
            "tickmode": "array",
            "tickvals": [round(v, 6) for v in tickvals],
            "ticktext": ticktext,
            "zeroline": False,
            "automargin": True,
        }
    title = "Membership-inference scores"
    auc = _num((m.get("candidate") or {}).get("auc"))
    ref = _num((m.get("reference") or {}).get("auc"))
    if auc is not None:
        title += f" (attack AUC {auc:.3f}" + (f", reference {ref:.3f})" if ref is not None else ")")
    if data:
        axis_title = "score: higher looks more like a training member"
        for note in notes:  # plain text: plotly's styled spans need inline styles
            axis_title += f"<br>{note}"
        xaxis["title"] = {"text": axis_title}
        layout = _layout(
            title,
            barmode="overlay",
            bargap=0,
            xaxis=xaxis,
            yaxis={"title": {"text": "density"}, "rangemode": "tozero"},
            legend={
                "orientation": "h",
                "x": 0,
                "y": 0,
                "yref": "container",
                "yanchor": "bottom",
                "entrywidth": 0.5,  # two columns: five populations in three rows
                "entrywidthmode": "fraction",
            },
            margin={"l": 50, "r": 20, "t": 50, "b": 40},
            height=400 + 18 * len(notes),
        )
        if shapes:
            layout["shapes"] = shapes
        return {"data": data, "layout": layout}
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


def power(check: dict[str, Any]) -> Figure | None:
    """Each gating attack's AUC on the baseline (its power: it must beat the threshold
    there) and on the candidate (its verdict: it must not), against the threshold."""
    gates = (_metrics(check).get("power") or {}).get("attacks")
    if not isinstance(gates, dict) or not gates:
        return None
    names = [n for n, g in gates.items() if isinstance(g, dict)]
    data: list[dict[str, Any]] = [
        {
            "type": "bar",
            "name": label,
            "x": names,
            "y": [_num(gates[n].get(key)) for n in names],
            "marker": {"color": colour},
        }
        for key, label, colour in (
            ("baseline", "baseline (power)", BEFORE),
            ("candidate", "candidate (verdict)", AFTER),
        )
    ]
    data.append(
        {
            "type": "scatter",
            "mode": "markers",
            "name": "threshold",
            "x": names,
            "y": [_num(gates[n].get("threshold")) for n in names],
            "marker": {"color": FLAGGED, "symbol": "line-ew-open", "size": 30},
        }
    )
    return {
        "data": data,
        "layout": _layout(
            "Attack power on the baseline, verdict on the candidate",
            barmode="group",
            yaxis={"range": [0, 1], "title": {"text": "AUC"}},
            height=340,
        ),
    }


def per_example(check: dict[str, Any]) -> Figure | None:
    """Per-example LiRA statistic of each forgotten record before and after unlearning
    (each against its own out-references), beside the non-members'."""
    pe = _metrics(check).get("per_example")
    if not isinstance(pe, dict):
        return None
    data: list[dict[str, Any]] = []
    for side, label in (("forgotten", "forgotten"), ("nonmembers", "non-members")):
        block = pe.get(side)
        if not isinstance(block, dict):
            continue
        for when, colour in (("before", BEFORE), ("after", AFTER)):
            values = [v for v in block.get(f"lira_offline_{when}") or [] if _num(v) is not None]
            if values:
                data.append(
                    {
                        "type": "box",
                        "name": f"{label} {when}",
                        "y": values,
                        "marker": {"color": colour},
                        "boxpoints": "all",
                        "jitter": 0.4,
                        "pointpos": 0,
                    }
                )
    if not data:
        return None
    return {
        "data": data,
        "layout": _layout(
            "Per-example LiRA: each record against models that never saw it",
            yaxis={"title": {"text": "LiRA z (higher: more member-like)"}},
            showlegend=False,
            height=360,
        ),
    }


def report_charts(checks: dict[str, Any], suffix: str = "") -> dict[str, Figure]:
    """Element id -> figure for every chart a report's checks can draw."""
    out: dict[str, Figure] = {}
    builders = (
        ("fairness", "fairness", fairness),
        ("mia", "forgetting", membership),
        ("power", "forgetting", power),
        ("per-example", "forgetting", per_example),
        ("utility", "utility", utility),
        ("feature", "feature", feature),
    )
    for chart, check_name, build in builders:
        check = _check(checks, check_name)
        fig = build(check) if check is not None else None
        if fig is not None:
            out[f"chart-{chart}{suffix}"] = fig
    return out
