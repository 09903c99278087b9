"""The lifecycle table: complete, closed at the terminal states, and enforced."""

from __future__ import annotations

import itertools

import pytest

from app.requests.states import (
    LEGAL,
    STATUSES,
    TERMINAL,
    IllegalTransition,
    check,
    check_reopen,
)

API_STATUSES = {
    "received",
    "planned",
    "unlearning",
    "verifying",
    "retraining",
    "needs_review",
    "erasing",
    "completed",
    "failed",
    "cancelled",
    "rejected",
}


def test_every_status_of_the_contract_is_known() -> None:
    assert set(STATUSES) == API_STATUSES
    assert all(targets <= API_STATUSES for targets in LEGAL.values())


def test_terminal_states_have_no_way_out() -> None:
    for s in TERMINAL:
        for t in API_STATUSES:
            with pytest.raises(IllegalTransition):
                check(s, t)


def test_only_an_admin_retry_reopens_a_failed_request() -> None:
    check_reopen("failed", "retraining")
    check_reopen("failed", "received")
    for s in TERMINAL - {"failed"}:
        for t in API_STATUSES:
            with pytest.raises(IllegalTransition):
                check_reopen(s, t)
    with pytest.raises(IllegalTransition):
        check_reopen("failed", "completed")


@pytest.mark.parametrize(
    "path",
    [
        ["received", "planned", "unlearning", "verifying", "erasing", "completed"],
        ["received", "planned", "unlearning", "verifying", "retraining", "verifying", "erasing"],
        ["received", "planned", "unlearning", "verifying", "needs_review", "retraining"],
        ["received", "planned", "erasing", "completed"],
        ["received", "cancelled"],
        ["received", "planned", "cancelled"],
    ],
)
def test_legal_paths(path: list[str]) -> None:
    for a, b in itertools.pairwise(path):
        check(a, b)


@pytest.mark.parametrize(
    ("a", "b"),
    [
        ("unlearning", "cancelled"),  # cancel only before unlearning starts
        ("verifying", "cancelled"),
        ("received", "completed"),  # no skipping erasure
        ("needs_review", "completed"),
        ("planned", "verifying"),
        ("received", "bogus"),
    ],
)
def test_illegal_transitions(a: str, b: str) -> None:
    with pytest.raises(IllegalTransition):
        check(a, b)
