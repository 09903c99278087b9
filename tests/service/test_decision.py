"""The decision after verification: which failures retrain, which go to a person."""

from __future__ import annotations

import pytest

from app.verification.service import Check, decide

OK, BAD = Check(True, {}), Check(False, {})
UNSURE = Check.inconclusive({}, reason="no power on the baseline")


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
        # The attack could not tell (no power on the baseline): an exact method rests on
        # its lineage proof; an approximate one falls back to exact retraining.
        ({"lineage": OK, "utility": OK, "forgetting": UNSURE}, False, (True, "promote")),
        ({"utility": OK, "forgetting": UNSURE}, True, (False, "retrain")),
        # No lineage proof to rest on (an exact method without a lineage check): a person.
        ({"utility": OK, "forgetting": UNSURE}, False, (False, "needs_review")),
        # An inconclusive check never hides a failure.
        ({"lineage": OK, "forgetting": UNSURE, "fairness": BAD}, False, (False, "needs_review")),
    ],
)
def test_decide(checks: dict[str, Check], approximate: bool, expected: tuple[bool, str]) -> None:
    assert decide(checks, approximate) == expected


def test_policy_may_accept_an_inconclusive_forgetting_check_for_approximate_methods() -> None:
    checks = {"utility": OK, "forgetting": UNSURE}
    assert decide(checks, True, accept_inconclusive=True) == (True, "promote")
    assert decide({**checks, "utility": BAD}, True, accept_inconclusive=True)[1] == "retrain"


def test_status_and_passed_agree() -> None:
    assert OK.to_dict()["status"] == "pass" and OK.to_dict()["passed"] is True
    assert BAD.to_dict()["status"] == "fail" and BAD.to_dict()["passed"] is False
    d = UNSURE.to_dict()
    assert d["status"] == "inconclusive" and d["passed"] is False
    assert d["reason"] == "no power on the baseline"
    with pytest.raises(ValueError):
        Check(True, {}, status="maybe")


def test_report_and_certificate_say_what_decides_an_inconclusive_forgetting_check() -> None:
    from app.certificates.service import _forgetting_evidence
    from app.verification.service import explain_inconclusive

    exact = {"lineage": OK, "forgetting": Check.inconclusive({}, reason="no power")}
    explain_inconclusive(exact, approximate=False, accepted=False)
    assert "lineage proof" in exact["forgetting"].reason
    assert exact["forgetting"].metrics["decided_by"] == "lineage"
    stored = {k: c.to_dict() for k, c in exact.items()}
    assert "lineage proof" in _forgetting_evidence(stored)["forgetting_evidence"]
    approx = {"forgetting": Check.inconclusive({}, reason="no power")}
    explain_inconclusive(approx, approximate=True, accepted=False)
    assert "falls back to exact retraining" in approx["forgetting"].reason
    assert _forgetting_evidence({"forgetting": OK.to_dict()})["forgetting_evidence"].startswith(
        "membership attack with power"
    )
