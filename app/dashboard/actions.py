"""Dashboard actions: thin calls into the request service, each in a savepoint so that a
refusal leaves the page's own transaction clean."""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeVar

from sqlalchemy.orm import Session

from app.api.deps import Caller
from app.core.errors import BadRequest
from app.core.outbox import savepoint
from app.core.settings import Settings
from app.dashboard.views import get_request
from app.requests import service as requests

T = TypeVar("T")


def run_action(session: Session, action: Callable[[], T]) -> T:
    """Run a service call in a savepoint: when it refuses (an AppError), whatever it had
    flushed is undone and the tasks it had queued are dropped, while the request's own
    transaction stays usable to render the page that explains why."""
    with savepoint(session):
        return action()


def review(
    session: Session,
    request_id: str,
    caller: Caller,
    action: str,
    note: str | None,
    *,
    mitigation: str | None = None,
) -> None:
    if action not in ("approve", "reject", "mitigate"):
        raise BadRequest("action must be approve, reject or mitigate", code="invalid")
    if mitigation is not None and (
        action == "reject" or mitigation not in ("reweight", "group_dro", "thresholds")
    ):
        raise BadRequest(
            "mitigation must be reweight, group_dro or thresholds, with mitigate or approve",
            code="invalid",
        )
    if note is not None and len(note) > 2000:
        raise BadRequest("the note is at most 2000 characters", code="invalid")
    req = get_request(session, request_id, caller)
    run_action(
        session,
        lambda: requests.review(session, req, caller, action, note or None, mitigation=mitigation),
    )


def parse_days(days: str | None) -> int | None:
    """An extension's length in days; empty means the longest the law allows."""
    days = (days or "").strip()
    if not days:
        return None
    if not days.isdigit() or len(days) > 4:
        raise BadRequest("days must be a whole number", code="invalid")
    return int(days)


def extend(
    session: Session,
    request_id: str,
    caller: Caller,
    reason: str,
    days: int | None,
    settings: Settings,
) -> None:
    reason = reason.strip()
    if not 3 <= len(reason) <= 2000:
        raise BadRequest("give a reason of 3 to 2000 characters", code="invalid")
    if days is not None and not 1 <= days <= settings.max_extension_days:
        raise BadRequest(f"an extension is 1 to {settings.max_extension_days} days", code="invalid")
    req = get_request(session, request_id, caller)
    run_action(session, lambda: requests.extend(session, req, caller, reason, days, settings))


def cancel(session: Session, request_id: str, caller: Caller) -> None:
    req = get_request(session, request_id, caller)
    run_action(session, lambda: requests.cancel(session, req, caller))
