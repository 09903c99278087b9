"""Schemathesis hooks for the contract test: rules across fields that JSON Schema cannot
state (they are in the schema's descriptions), and opaque server-made values.

- Batching: `max_batch` >= `min_batch` and `max_wait_seconds` >= `window_seconds`
  compare two fields, which JSON Schema cannot express; bodies breaking them are
  dropped from generation (the API's 422 for them has its own tests).
- `cursor` of `GET /v1/deletion-requests` is an opaque token the server issues;
  invented ones are a 400 by design, so generated queries leave it out.
- A platform's callback headers (`Reply-To`, `Reply-To-Token`) name a URL whose host is
  resolved and must be public (as webhook targets are): generated hosts would be looked
  up through the machine's resolver, and refusing them is by design (tested in
  tests/integration/test_fides_callbacks.py), so generated requests leave them out.
"""

from __future__ import annotations

from typing import Any

import schemathesis


def _batching_ok(batching: Any) -> bool:
    if not isinstance(batching, dict):
        return True
    min_batch, max_batch = batching.get("min_batch", 1), batching.get("max_batch")
    window, wait = batching.get("window_seconds", 0.0), batching.get("max_wait_seconds", 86400.0)
    try:
        if max_batch is not None and max_batch < min_batch:
            return False
        return not wait < window
    except TypeError:  # a negative case of another kind: leave it to the API
        return True


@schemathesis.hook
def filter_body(ctx: Any, body: Any) -> bool:
    if ctx.operation is None or not isinstance(body, dict):
        return True
    if ctx.operation.path in ("/v1/models", "/v1/models/{name}"):
        return _batching_ok(body.get("batching"))
    return True


@schemathesis.hook
def map_query(ctx: Any, query: Any) -> Any:
    if (
        ctx.operation is not None
        and ctx.operation.path == "/v1/deletion-requests"
        and isinstance(query, dict)
    ):
        query.pop("cursor", None)
    return query


@schemathesis.hook
def map_headers(ctx: Any, headers: Any) -> Any:
    if (
        ctx.operation is not None
        and ctx.operation.path == "/v1/deletion-requests"
        and isinstance(headers, dict)
    ):
        headers.pop("Reply-To", None)
        headers.pop("Reply-To-Token", None)
    return headers
