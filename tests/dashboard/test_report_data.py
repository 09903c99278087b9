"""The forgetting check keeps a sample of each population's membership scores in the
report (for the dashboard's distribution chart), bounded in size."""

from __future__ import annotations

import numpy as np
import torch

from app.ml.data import TabularData
from app.verification.forgetting import SAMPLE_SCORES, forgetting, score_samples


class FixedModel:
    """A predictor whose confidence on the true label is a column of the data."""

    def __init__(self, shift: float = 0.0) -> None:
        self.shift = shift

    def predict_proba(self, columns: dict[str, np.ndarray]) -> torch.Tensor:
        p = np.clip(np.asarray(columns["conf"], dtype=np.float64) + self.shift, 0.01, 0.99)
        return torch.from_numpy(np.stack([1 - p, p], axis=1))


def _data(n: int, start: int, conf: float, seed: int) -> TabularData:
    rng = np.random.default_rng(seed)
    return TabularData(
        record_ids=np.arange(start, start + n, dtype=np.int64),
        columns={"conf": np.clip(rng.normal(conf, 0.05, n), 0.01, 0.99)},
        labels=np.ones(n, dtype=np.int64),
    )


def test_score_samples_are_bounded_finite_and_seeded() -> None:
    big = np.linspace(-5, 5, 1000)
    out = score_samples({"a": big, "b": np.array([1.0, np.nan, np.inf, 2.0])}, seed=1)
    assert len(out["a"]) == SAMPLE_SCORES and set(out["a"]) <= {round(v, 3) for v in big}
    assert out["b"] == [1.0, 2.0]
    assert out == score_samples({"a": big, "b": np.array([1.0, np.nan, np.inf, 2.0])}, seed=1)


def test_forgetting_reports_score_samples_per_population() -> None:
    forget, test, retained = _data(30, 0, 0.9, 0), _data(400, 100, 0.6, 1), _data(500, 1000, 0.8, 2)
    check = forgetting(
        FixedModel(),
        FixedModel(shift=0.05),
        None,
        forget,
        test,
        margin=0.05,
        exact=True,
        retained=retained,
    )
    samples = check.metrics["score_samples"]
    assert set(samples) == {"forgotten", "forgotten_before", "nonmembers", "retained"}
    assert len(samples["forgotten"]) == 30
    assert len(samples["nonmembers"]) == SAMPLE_SCORES
    assert len(samples["retained"]) == SAMPLE_SCORES
    # The baseline is more confident on the forget rows than the candidate.
    assert np.mean(samples["forgotten_before"]) > np.mean(samples["forgotten"])
    # Without retained rows that population is simply absent.
    plain = forgetting(FixedModel(), FixedModel(), None, forget, test, margin=0.05, exact=True)
    assert "retained" not in plain.metrics["score_samples"]


def test_power_and_per_example_charts_and_the_check_row_show_power() -> None:
    from app.dashboard import charts
    from app.dashboard.reports import power_summary

    gate = {"baseline": 0.71, "candidate": 0.52, "threshold": 0.6, "has_power": True}
    check = {
        "passed": True,
        "status": "pass",
        "reason": "the attacks with power on the baseline (rmia) no longer find the forget set",
        "metrics": {
            "power": {
                "has_power": True,
                "attacks": {"rmia": gate, "population": {**gate, "has_power": False}},
                "baseline_auc": 0.55,
                "reference_auc": 0.5,
            },
            "per_example": {
                "forgotten": {"lira_offline_before": [1.0, 2.0], "lira_offline_after": [0.1, None]},
                "nonmembers": {"lira_offline_before": [0.0], "lira_offline_after": [0.2]},
            },
        },
    }
    figs = charts.report_charts({"forgetting": check})
    assert {"chart-power", "chart-per-example"} <= set(figs)
    bars = figs["chart-power"]["data"]
    assert bars[0]["x"] == ["rmia", "population"] and bars[0]["y"] == [0.71, 0.71]
    boxes = figs["chart-per-example"]["data"]
    assert [b["name"] for b in boxes][:2] == ["forgotten before", "forgotten after"]
    assert boxes[1]["y"] == [0.1]  # missing values are not drawn
    assert power_summary(check).startswith("has power: baseline AUC 0.550")
    unsure = {"metrics": {"power": {"has_power": False, "baseline_auc": 0.5}}}
    assert power_summary(unsure).startswith("no power")
