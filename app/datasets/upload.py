"""Receiving `POST /v1/datasets`: the multipart body streamed to the artifact store.

The request body is parsed as it arrives (python-multipart, the parser Starlette uses),
and the `file` part goes straight to a staging file in the store, in bounded chunks: the
API never holds more than a chunk of an upload, whatever its size. Bytes are counted as
they come, so an upload over the maximum is refused (413) at the first byte too many,
and its partial file deleted.
"""

from __future__ import annotations

import uuid
from dataclasses import dataclass, field
from typing import Any

import anyio
from python_multipart.multipart import MultipartParser, parse_options_header
from starlette.requests import ClientDisconnect, Request

from app.core.errors import PayloadTooLarge, Unprocessable
from app.core.storage import ArtifactStore

STAGING = "uploads"
MAX_SPEC_BYTES = 1 * 2**20
# Writes leave the event loop in pieces of this size (a store may be s3://: network).
WRITE_CHUNK = 1 * 2**20
# Room for the multipart framing and the spec part when a Content-Length is declared.
FRAMING_SLACK = MAX_SPEC_BYTES + 64 * 2**10


@dataclass
class Upload:
    """A staged upload: its path in the store, the client's file name, its size, the
    raw spec part."""

    path: str
    filename: str
    size: int
    spec: str


def staging_path() -> str:
    return f"{STAGING}/{uuid.uuid4().hex}.upload"


@dataclass
class _Part:
    name: str = ""
    filename: str | None = None
    headers: dict[bytes, bytes] = field(default_factory=dict)


class _Receiver:
    """python-multipart callbacks collect events; `drain` acts on them after each chunk
    (file writes may block, so they happen outside the parser's callbacks)."""

    def __init__(self, store: ArtifactStore, max_bytes: int) -> None:
        self.store = store
        self.max_bytes = max_bytes
        self.path = staging_path()
        self.fh: Any = None
        self.size = 0
        self.filename: str | None = None
        self.spec: bytearray | None = None
        self.part = _Part()
        self._field = b""
        self._value = b""
        self._buffer = bytearray()
        self._headers: dict[bytes, bytes] = {}
        self._events: list[tuple[str, Any]] = []

    def callbacks(self) -> dict[str, Any]:
        def on_part_begin() -> None:
            self._events.append(("begin", b""))

        def on_part_data(data: bytes, start: int, end: int) -> None:
            self._events.append(("data", data[start:end]))

        def on_part_end() -> None:
            self._events.append(("end", b""))

        def on_header_field(data: bytes, start: int, end: int) -> None:
            self._field += data[start:end]

        def on_header_value(data: bytes, start: int, end: int) -> None:
            self._value += data[start:end]

        def on_header_end() -> None:
            self._headers[self._field.lower()] = self._value
            self._field, self._value = b"", b""

        def on_headers_finished() -> None:
            self._events.append(("headers", self._headers))
            self._headers = {}

        return {
            "on_part_begin": on_part_begin,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
        }

    async def drain(self) -> None:
        events, self._events = self._events, []
        for kind, data in events:
            if kind == "begin":
                self.part = _Part()
            elif kind == "headers":
                self.part.headers = data
                _, options = parse_options_header(
                    self.part.headers.get(b"content-disposition", b"")
                )
                self.part.name = options.get(b"name", b"").decode("utf-8", "replace")
                raw_filename = options.get(b"filename")
                if raw_filename is not None:
                    self.part.filename = raw_filename.decode("utf-8", "replace")
                if self.part.name == "file":
                    if self.fh is not None:
                        raise Unprocessable("file: only one file part", code="invalid")
                    self.filename = self.part.filename or ""
                    self.fh = self.store.open(self.path, "wb")
                elif self.part.name == "spec":
                    self.spec = bytearray()
            elif kind == "data":
                await self._data(data)
            elif kind == "end" and self.part.name == "file":
                await self._flush()

    async def _data(self, data: bytes) -> None:
        if self.part.name == "file" and self.fh is not None:
            self.size += len(data)
            if self.size > self.max_bytes:
                raise PayloadTooLarge(
                    f"files are limited to {_mib(self.max_bytes)}", code="payload_too_large"
                )
            self._buffer += data
            if len(self._buffer) >= WRITE_CHUNK:
                await self._flush()
        elif self.part.name == "spec" and self.spec is not None:
            self.spec += data
            if len(self.spec) > MAX_SPEC_BYTES:
                raise PayloadTooLarge(f"the spec part is limited to {_mib(MAX_SPEC_BYTES)}")
        # Other parts are not ours: their bytes are dropped as they come.

    async def _flush(self) -> None:
        if self._buffer:
            chunk, self._buffer = bytes(self._buffer), bytearray()
            await anyio.to_thread.run_sync(self.fh.write, chunk)

    async def close(self) -> None:
        if self.fh is not None:
            await self._flush()
            await anyio.to_thread.run_sync(self.fh.close)

    def discard(self) -> None:
        if self.fh is not None:
            try:
                self.fh.close()
            finally:
                self.store.delete(self.path)


def _mib(n: int) -> str:
    return f"{n / 2**20:g} MiB"


async def receive(request: Request, store: ArtifactStore, max_bytes: int) -> Upload:
    """Stream the body's `file` part into the store's staging area; the caller owns the
    staged file from here (and deletes it). 413 beyond `max_bytes`, 422 for a body that
    is not multipart or lacks a part; nothing is left in the store then."""
    ctype, options = parse_options_header(request.headers.get("content-type", ""))
    boundary = options.get(b"boundary")
    if ctype != b"multipart/form-data" or not boundary:
        raise Unprocessable(
            "expected a multipart/form-data body with the parts `file` and `spec`",
            code="invalid",
        )
    declared = request.headers.get("content-length", "")
    if declared.isdigit() and int(declared) > max_bytes + FRAMING_SLACK:
        # An honest client learns before it sends anything.
        raise PayloadTooLarge(f"files are limited to {_mib(max_bytes)}")
    rx = _Receiver(store, max_bytes)
    parser = MultipartParser(boundary, rx.callbacks())  # type: ignore[arg-type]
    try:
        async for chunk in request.stream():
            parser.write(chunk)
            await rx.drain()
        parser.finalize()
        await rx.drain()
        await rx.close()
    except BaseException as exc:
        rx.discard()
        if isinstance(exc, ClientDisconnect):
            raise Unprocessable("the upload was cut off", code="invalid") from exc
        if isinstance(exc, ValueError):  # the parser's complaint about a malformed body
            raise Unprocessable(f"malformed multipart body: {exc}", code="invalid") from exc
        raise
    missing = [
        n for n, ok in (("file", rx.fh is not None), ("spec", rx.spec is not None)) if not ok
    ]
    if missing:
        rx.discard()
        raise Unprocessable("; ".join(f"{n}: Field required" for n in missing), code="invalid")
    assert rx.spec is not None
    try:
        spec = rx.spec.decode("utf-8")
    except UnicodeDecodeError as exc:
        rx.discard()
        raise Unprocessable("spec is not UTF-8", code="invalid_spec") from exc
    return Upload(path=rx.path, filename=rx.filename or "", size=rx.size, spec=spec)
