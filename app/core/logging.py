"""Structured JSON logs, each line carrying the id of the HTTP request that caused it:
the API takes it from `X-Request-ID` (or makes one), tasks carry it in a message header,
and the worker restores it, so one request can be followed from portal to GPU."""

from __future__ import annotations

import json
import logging
import re
import sys
import uuid
from contextvars import ContextVar
from datetime import UTC, datetime

request_id_var: ContextVar[str | None] = ContextVar("palimpsest_request_id", default=None)
HEADER = "palimpsest_request_id"  # the Celery message header
_VALID = re.compile(r"^[A-Za-z0-9._\-]{1,100}$")


def new_request_id(incoming: str | None) -> str:
    """A client's id when it is sane, else a fresh one (never trust it as log syntax)."""
    if incoming and _VALID.match(incoming):
        return incoming
    return uuid.uuid4().hex


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        doc: dict[str, object] = {
            "ts": datetime.fromtimestamp(record.created, UTC).isoformat(timespec="milliseconds"),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
            "request_id": request_id_var.get(),
        }
        duration = getattr(record, "duration_ms", None)
        if duration is not None:
            doc["duration_ms"] = duration
        if record.exc_info:
            doc["exception"] = self.formatException(record.exc_info)
        return json.dumps(doc, default=str)


def configure_logging(level: str = "INFO", fmt: str = "json") -> None:
    handler = logging.StreamHandler(sys.stderr)
    if fmt == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level)
