"""A small HTTP/1.1 load generator: keep-alive connections on asyncio streams, each
request prebuilt as bytes. It costs far less CPU per request than a general client, which
matters when it shares a 2-core machine with the server it measures."""

from __future__ import annotations

import asyncio
import contextlib
import json
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any


@dataclass
class Reply:
    status: int
    body: bytes
    seconds: float


@dataclass
class Tally:
    latencies: list[float] = field(default_factory=list)
    statuses: dict[int, int] = field(default_factory=dict)
    transport_errors: int = 0

    def add(self, reply: Reply) -> None:
        self.latencies.append(reply.seconds)
        self.statuses[reply.status] = self.statuses.get(reply.status, 0) + 1

    def percentile(self, q: float) -> float:
        if not self.latencies:
            return float("nan")
        ordered = sorted(self.latencies)
        return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def post_json(path: str, headers: dict[str, str], body: dict[str, Any], host: str) -> bytes:
    payload = json.dumps(body, separators=(",", ":")).encode()
    head = [f"POST {path} HTTP/1.1", f"Host: {host}", "Content-Type: application/json"]
    head += [f"{k}: {v}" for k, v in headers.items()]
    head.append(f"Content-Length: {len(payload)}")
    return ("\r\n".join(head) + "\r\n\r\n").encode() + payload


class Connection:
    """One keep-alive connection; reconnects after the server closes it."""

    def __init__(self, host: str, port: int) -> None:
        self.host, self.port = host, port
        self.reader: asyncio.StreamReader | None = None
        self.writer: asyncio.StreamWriter | None = None

    async def request(self, raw: bytes) -> Reply:
        if self.writer is None or self.writer.is_closing():
            self.reader, self.writer = await asyncio.open_connection(self.host, self.port)
        assert self.reader is not None
        started = time.perf_counter()
        self.writer.write(raw)
        head = await self.reader.readuntil(b"\r\n\r\n")
        lines = head.decode("latin-1").split("\r\n")
        status = int(lines[0].split(" ", 2)[1])
        length, close = 0, False
        for line in lines[1:]:
            name, _, value = line.partition(":")
            name = name.strip().lower()
            if name == "content-length":
                length = int(value)
            elif name == "connection" and value.strip().lower() == "close":
                close = True
        body = await self.reader.readexactly(length) if length else b""
        reply = Reply(status, body, time.perf_counter() - started)
        if close:
            await self.close()
        return reply

    async def close(self) -> None:
        if self.writer is not None:
            self.writer.close()
            with contextlib.suppress(OSError):
                await self.writer.wait_closed()
            self.writer = None


async def run_for(
    host: str,
    port: int,
    clients: int,
    seconds: float,
    make: Callable[[], bytes],
    on_reply: Callable[[bytes, Reply], None] | None = None,
) -> tuple[Tally, float]:
    """`clients` connections send `make()` back to back for `seconds`; the tally and
    the wall time taken."""
    tally = Tally()
    deadline = time.perf_counter() + seconds

    async def client() -> None:
        conn = Connection(host, port)
        try:
            while time.perf_counter() < deadline:
                raw = make()
                try:
                    reply = await conn.request(raw)
                except (OSError, asyncio.IncompleteReadError):
                    tally.transport_errors += 1
                    await conn.close()
                    continue
                tally.add(reply)
                if on_reply is not None:
                    on_reply(raw, reply)
        finally:
            await conn.close()

    started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(clients)))
    return tally, time.perf_counter() - started


async def run_all(
    host: str,
    port: int,
    clients: int,
    requests: list[bytes],
    retry: Callable[[Reply], bool],
    on_reply: Callable[[int, Reply], None],
) -> Tally:
    """Every request of the list, sent over `clients` connections; a reply for which
    `retry` is true is sent again (a client's retry)."""
    tally = Tally()
    queue: asyncio.Queue[int] = asyncio.Queue()
    for i in range(len(requests)):
        queue.put_nowait(i)

    async def client() -> None:
        conn = Connection(host, port)
        try:
            while True:
                try:
                    i = queue.get_nowait()
                except asyncio.QueueEmpty:
                    return
                while True:
                    try:
                        reply = await conn.request(requests[i])
                    except (OSError, asyncio.IncompleteReadError):
                        tally.transport_errors += 1
                        await conn.close()
                        continue
                    tally.add(reply)
                    if not retry(reply):
                        on_reply(i, reply)
                        break
                    await asyncio.sleep(0.01)
        finally:
            await conn.close()

    await asyncio.gather(*(client() for _ in range(clients)))
    return tally
