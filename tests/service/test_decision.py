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
    ],
)
def test_decide(checks: dict[str, Check], approximate: bool, expected: tuple[bool, str]) -> None:
    assert decide(checks, approximate) == expected
