"""The OpenAPI document, completed with what every operation can answer.

FastAPI documents the success response and whatever a route declares. The rest is
uniform, so it is added here once: every failure is the error shape
(`{"error": {"code", "message"}}`), a 400 where a body could not be parsed, 401 and
403 where a key is needed, 404 where a path names something, 422 for invalid input,
503 with `Retry-After` when the database is busy. Declared-but-empty responses
(`responses={404: {}}`) get the error schema too, and FastAPI's own 422 schema (which
our handler never sends) is replaced.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi

ERROR_SCHEMA: dict[str, Any] = {
    "type": "object",
    "required": ["error"],
    "additionalProperties": False,
    "properties": {
        "error": {
            "type": "object",
            "required": ["code", "message"],
            "additionalProperties": False,
            "properties": {
                "code": {"type": "string", "minLength": 1},
                "message": {"type": "string", "minLength": 1},
            },
        }
    },
}
DESCRIPTIONS = {
    "400": "The body could not be parsed, or a parameter is malformed",
    "401": "Missing, unknown or revoked API key",
    "403": "The key's role may not do this",
    "404": "Not found",
    "405": "Method not allowed",
    "409": "Conflicts with the current state",
    "413": "Too large",
    "422": "Invalid input",
    "503": "The database is busy or unreachable; retry after `Retry-After` seconds",
}
# Operations that never touch the database.
NO_DATABASE = {("/healthz", "get")}


def _error_response(status: str) -> dict[str, Any]:
    body: dict[str, Any] = {
        "description": DESCRIPTIONS.get(status, "Error"),
        "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}},
    }
    if status == "503":
        body["headers"] = {
            "Retry-After": {
                "description": "seconds to wait before retrying",
                "schema": {"type": "integer", "minimum": 1},
            }
        }
    return body


def complete(doc: dict[str, Any]) -> dict[str, Any]:
    components = doc.setdefault("components", {})
    components.setdefault("schemas", {})["Error"] = ERROR_SCHEMA
    for name in ("HTTPValidationError", "ValidationError"):
        components["schemas"].pop(name, None)
    for path, item in doc.get("paths", {}).items():
        for method, op in item.items():
            if not isinstance(op, dict) or "responses" not in op:
                continue
            responses: dict[str, Any] = op["responses"]
            wanted: set[str] = set()
            if (path, method) not in NO_DATABASE:
                wanted.add("503")
            if op.get("parameters") or op.get("requestBody"):
                wanted.add("422")
            if op.get("requestBody"):
                wanted.add("400")
            if op.get("security"):
                wanted |= {"401", "403"}
            if "{" in path:
                wanted.add("404")
            for status in sorted(wanted | {s for s in responses if s[:1] in "45"}):
                responses[status] = _error_response(status)
            if not op.get("security"):
                op["security"] = []  # public: stated, not left to a default
    return doc


def install(app: FastAPI) -> None:
    """Serve the completed document at /openapi.json (built once, on first request)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            app.openapi_schema = complete(
                get_openapi(
                    title=app.title,
                    version=app.version,
                    description=app.description,
                    routes=app.routes,
                )
            )
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
