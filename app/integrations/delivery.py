"""Sending one callback to the platform, recording it, scheduling the retry.

Fides's protocol (`POST {fides}/api/v1/request-task/callback`, `Authorization: Bearer
<reply-to-token>`, body `{"rows_masked": n}`) resumes the waiting erasure task and marks
it done with that count. Retries follow the webhook schedule (`app.webhooks.delivery`),
with the same lease and sweep; the HTTP call happens outside any transaction.

Fides answers 400 while its task is not yet `awaiting_processing` (Palimpsest can finish
an erasure with nothing to erase before Fides has recorded that it is waiting), so a 400
is retried; 401/403 (token expired or invalid) and 404 (no such task) are final.
"""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass
from datetime import timedelta

import httpx
from sqlalchemy import select

from app.audit import service as audit
from app.core.db import enqueue, session_scope
from app.core.settings import get_settings
from app.integrations import sealing, targets
from app.integrations.service import DELIVER_TASK, SYSTEM
from app.models.base import utcnow
from app.models.integrations import RequestCallback
from app.webhooks.delivery import EARLY, LEASE, RETRY_SCHEDULE, TIMEOUT_SECONDS

log = logging.getLogger(__name__)
FINAL_CODES = frozenset({401, 403, 404, 405, 410, 422})


@dataclass(frozen=True)
class _Attempt:
    url: str
    token: str
    body: str


def _claim(callback_id: str) -> _Attempt | None:
    with session_scope() as s:
        cb = s.get(RequestCallback, callback_id)
        if cb is None or cb.status != "pending":
            return None
        now = utcnow()
        if cb.next_attempt_at is not None and cb.next_attempt_at > now + EARLY:
            return None
        cb.next_attempt_at = now + LEASE
        token = sealing.unseal(cb.token_sealed, get_settings().pepper, cb.request_id)
        body = json.dumps({"rows_masked": int(cb.rows_masked or 0)})
        return _Attempt(cb.url, token, body)


def _detail(resp: httpx.Response) -> str:
    """Fides's error detail, short; never echoes our request (which holds the token)."""
    try:
        detail = resp.json().get("detail")
    except (ValueError, AttributeError):
        detail = None
    text = f"HTTP {resp.status_code}"
    return f"{text}: {str(detail)[:300]}" if detail else text


def _post(attempt: _Attempt) -> tuple[int | None, str | None]:
    try:
        targets.check_url(attempt.url)
    except targets.UnsafeTarget as exc:
        return None, str(exc)[:500]
    headers = {
        "authorization": f"Bearer {attempt.token}",
        "content-type": "application/json",
        "user-agent": "palimpsest-integrations/1",
    }
    try:
        with httpx.Client(timeout=TIMEOUT_SECONDS, follow_redirects=False) as client:
            resp = client.post(attempt.url, content=attempt.body.encode(), headers=headers)
    except httpx.HTTPError as exc:
        # The exception text names the URL at most, never headers.
        return None, f"{type(exc).__name__}: {exc}"[:500]
    if 200 <= resp.status_code < 300:
        return resp.status_code, None
    return resp.status_code, _detail(resp)


def deliver(callback_id: str) -> str:
    """One attempt; returns the callback's status afterwards ('skipped' if none made)."""
    attempt = _claim(callback_id)
    if attempt is None:
        return "skipped"
    code, error = _post(attempt)
    with session_scope() as s:
        cb = s.get(RequestCallback, callback_id)
        if cb is None:
            return "skipped"
        now = utcnow()
        cb.attempts += 1
        cb.last_attempt_at = now
        cb.last_status_code = code
        cb.last_error = error
        cb.updated_at = now
        if cb.status != "pending":  # settled meanwhile by a duplicate or a replay
            return cb.status
        outcome = None
        if error is None:
            cb.status, cb.delivered_at, cb.next_attempt_at = "delivered", now, None
            outcome = "integration.callback_delivered"
        elif code in FINAL_CODES or cb.failures >= len(RETRY_SCHEDULE):
            cb.failures += 1
            cb.status, cb.next_attempt_at = "failed", None
            outcome = "integration.callback_failed"
        else:
            cb.failures += 1
            wait = RETRY_SCHEDULE[cb.failures - 1]
            cb.next_attempt_at = now + wait
            enqueue(s, DELIVER_TASK, cb.id, countdown=wait.total_seconds())
        if outcome is not None:
            audit.record(
                s,
                actor=SYSTEM,
                action=outcome,
                entity_type="deletion_request",
                entity_id=cb.request_id,
                data={
                    "kind": cb.kind,
                    "rows_masked": cb.rows_masked,
                    "attempts": cb.attempts,
                    "status_code": code,
                    "error": error,
                },
            )
        log.info("integration callback %s: %s (%s)", cb.id, cb.status, error or code)
        return cb.status


def sweep(grace: timedelta = timedelta(seconds=30), limit: int = 500) -> int:
    """Beat: re-send pending callbacks whose attempt is overdue (their task was lost)."""
    with session_scope() as s:
        ids = s.scalars(
            select(RequestCallback.id)
            .where(
                RequestCallback.status == "pending",
                RequestCallback.next_attempt_at < utcnow() - grace,
            )
            .order_by(RequestCallback.next_attempt_at)
            .limit(limit)
        ).all()
        for callback_id in ids:
            enqueue(s, DELIVER_TASK, callback_id)
        return len(ids)
