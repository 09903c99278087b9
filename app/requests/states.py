"""The request lifecycle in one place: every status of API.md and its legal successors.

`received -> planned -> unlearning -> verifying -> (retraining -> verifying) -> erasing
-> completed`, with the exits `needs_review`, `failed`, `cancelled` (only before
unlearning starts) and `rejected` (an invalid target). A transition not listed here is a
bug, and `check` refuses it before anything is written.
"""

from __future__ import annotations

TERMINAL = frozenset({"completed", "failed", "cancelled", "rejected"})

LEGAL: dict[str, frozenset[str]] = {
    "received": frozenset({"planned", "cancelled", "rejected", "failed"}),
    # A request whose records no model trained on goes straight to erasure.
    "planned": frozenset({"unlearning", "erasing", "cancelled", "failed"}),
    # A batch-mate's job may already have removed the records: nothing left to verify.
    # A fast method that errors hands the request to exact retraining.
    "unlearning": frozenset({"verifying", "erasing", "retraining", "failed"}),
    "verifying": frozenset({"erasing", "needs_review", "retraining", "failed"}),
    "retraining": frozenset({"verifying", "erasing", "needs_review", "failed"}),
    # approve -> erasing (once every model is promoted); reject/mitigate -> retraining.
    "needs_review": frozenset({"erasing", "retraining", "failed"}),
    "erasing": frozenset({"completed", "failed"}),
    **{s: frozenset() for s in TERMINAL},
}

STATUSES = tuple(LEGAL)

# The one way out of a terminal state: an admin retries a failed request (a fix of the
# model's settings, a transient fault), which reopens it for retraining or, when it
# failed before reaching any model, for planning again.
REOPEN: dict[str, frozenset[str]] = {"failed": frozenset({"retraining", "received"})}


class IllegalTransition(RuntimeError):
    """A code path tried a status change the lifecycle does not allow."""


def check_reopen(previous: str, new: str) -> None:
    if new not in REOPEN.get(previous, frozenset()):
        raise IllegalTransition(f"a {previous!r} request cannot be reopened as {new!r}")


def check(previous: str, new: str) -> None:
    if new not in LEGAL:
        raise IllegalTransition(f"unknown request status {new!r}")
    if new not in LEGAL.get(previous, frozenset()):
        raise IllegalTransition(f"a request cannot go from {previous!r} to {new!r}")
