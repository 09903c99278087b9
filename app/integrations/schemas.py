"""What the request view shows of a platform callback (never its token or URL path)."""

from __future__ import annotations

from datetime import datetime

from pydantic import BaseModel


class CallbackOut(BaseModel):
    kind: str
    status: str
    attempts: int
    last_error: str | None
    rows_masked: int | None
    # The host it is sent to; the path and the token stay private.
    target: str
    next_attempt_at: datetime | None
    delivered_at: datetime | None
