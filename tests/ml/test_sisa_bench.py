"""B1 benchmark smoke run: it runs end to end and reports what it claims to."""

from __future__ import annotations

import json
import sys
from pathlib import Path

# `bench` is not an installed package; tests run with the repository root as cwd but
# pytest only puts test directories on sys.path.
sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from app.ml.schedule import mean_passes_per_record, theoretical_speedup
from bench.b1_sisa import main


def test_b1_quick_run_writes_consistent_results(tmp_path: Path) -> None:
    out = tmp_path / "b1.json"
    result = main(quick=True, out=out)
    assert json.loads(out.read_text()) == json.loads(json.dumps(result))
    assert {(r["shards"], r["slices"]) for r in result["rows"]} == {(1, 1), (1, 4), (4, 1), (4, 4)}
    assert result["training"]["schedule"] == "per_record"
    for r in result["rows"]:
        stages = r["stage_epochs"]
        assert len(stages) == r["slices"]
        # Passes over each record (on average over slices) are the monolithic epochs.
        assert mean_passes_per_record(stages) == r["monolithic_epochs"]
        assert r["ratio"] > 0 and r["unlearn_s"] > 0 and r["retrain_s"] > 0
        assert r["theoretical_ratio"] == theoretical_speedup(stages, r["shards"])
        assert r["ensemble_accuracy"] > 0.75 and r["monolithic_accuracy"] > 0.75
        # One request per slice, so the mean is the uniform-slice expectation.
        assert sorted(q["slice"] for q in r["requests"]) == list(range(r["slices"]))
        for req in r["requests"]:
            assert req["slices_retrained"] == r["slices"] - req["earliest_slice"]
    assert result["target_met"] is None  # S=16, R=8 is not part of the quick run
