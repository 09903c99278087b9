"""The broker side of the outbox, captured: what each commit sent, for tests that check
which tasks go out (the in-memory broker of the in-process tests drops them)."""

from __future__ import annotations

from typing import Any

import pytest

from app.core import outbox


class Capture:
    """A task sender that keeps what it is given."""

    def __init__(self) -> None:
        self.sent: list[outbox.PendingTask] = []

    def send(self, task: outbox.PendingTask) -> None:
        self.sent.append(task)

    def chord(self, header: Any, callback: outbox.PendingTask) -> None:
        self.sent.extend([*header, callback])


def capture_tasks(monkeypatch: pytest.MonkeyPatch) -> Capture:
    """Install a `Capture` as this process's sender until the test ends."""
    capture = Capture()
    monkeypatch.setattr(outbox, "_sender", capture)
    return capture
