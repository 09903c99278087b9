"""The decision after verification: which failures retrain, which go to a person."""

from __future__ import annotations

import pytest

from app.verification.service import Check, decide

OK, BAD = Check(True, {}), Check(False, {})


@pytest.mark.parametrize(
    ("checks", "approximate", "expected"),
    [
        ({"lineage": OK, "utility": OK}, False, (True, "promote")),
        ({"lineage": BAD, "utility": OK}, False, (False, "retrain")),
        # Exact method, utility drop: the forgetting is done; a person decides.
        ({"lineage": OK, "utility": BAD}, False, (False, "needs_review")),
        # Approximate method, utility drop: try the exact fallback first.
        ({"utility": BAD}, True, (False, "retrain")),
        ({"utility": OK}, True, (True, "promote")),
        # A feature the model still uses: retrain without the column.
        ({"utility": OK, "feature": BAD}, True, (False, "retrain")),
        ({"utility": OK, "feature": BAD}, False, (False, "retrain")),
        # The attack still finds the forget set: an approximate method falls back to exact
        # retraining; after an exact method (lineage passed) a retrain would rebuild the
        # same model, so a person decides.
        ({"utility": OK, "forgetting": BAD}, True, (False, "retrain")),
        ({"utility": OK, "forgetting": OK, "injection": BAD}, True, (False, "retrain")),
        ({"lineage": OK, "utility": OK, "forgetting": BAD}, False, (False, "needs_review")),
        # A group regressed: never silently promoted, never silently retrained.
        ({"lineage": OK, "utility": OK, "fairness": BAD}, False, (False, "needs_review")),
        ({"utility": OK, "fairness": BAD, "forgetting": OK}, True, (False, "needs_review")),
    ],
)
def test_decide(checks: dict[str, Check], approximate: bool, expected: tuple[bool, str]) -> None:
    assert decide(checks, approximate) == expected
