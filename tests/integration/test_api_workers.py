"""`palimpsest api` serves with several processes: PALIMPSEST_API_WORKERS of them (by
default one per core), sharing the port, each with our logging and its own pools."""

from __future__ import annotations

import os
from pathlib import Path

import httpx
import pytest

from app.core.settings import Settings
from app.stack import LocalStack
from tests.integration.flows import wait_for

pytestmark = pytest.mark.integration


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            with open(f"/proc/{entry}/stat") as fh:
                ppid = int(fh.read().rsplit(")", 1)[1].split()[1])
        except OSError:
            continue
        if ppid == pid:
            found.append(int(entry))
    return found


def test_default_is_one_process_per_core(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.delenv("PALIMPSEST_API_WORKERS", raising=False)
    assert Settings().api_workers == len(os.sched_getaffinity(0))
    monkeypatch.setenv("PALIMPSEST_API_WORKERS", "3")
    assert Settings().api_workers == 3


def test_api_serves_with_the_configured_processes(tmp_path: Path) -> None:
    stack = LocalStack(tmp_path / "stack", env={"PALIMPSEST_API_WORKERS": "3"})
    stack.start(worker=False)
    try:
        (api,) = stack.procs
        # uvicorn's supervisor, its three workers (and multiprocessing's resource tracker).
        workers = wait_for(
            lambda: [p for p in _children(api.pid) if "resource_tracker" not in _cmdline(p)],
            lambda ps: len(ps) == 3,
            timeout=60,
        )
        assert len(workers) == 3
        key = stack.create_key("admin", "ops")
        with httpx.Client(
            base_url=stack.base_url, headers={"Authorization": f"Bearer {key}"}, timeout=30
        ) as client:
            for _ in range(20):  # every answer is whole, whichever process gives it
                r = client.get("/v1/deletion-requests")
                assert r.status_code == 200 and r.json()["items"] == [], r.text
                assert r.headers["x-request-id"]
        # The access log is written by the serving processes: they set up our logging.
        log = (stack.folder / "api.log").read_text()
        assert "palimpsest.access" in log and "/v1/deletion-requests" in log, log[-2000:]
    finally:
        stack.stop()


def _cmdline(pid: int) -> str:
    try:
        with open(f"/proc/{pid}/cmdline", "rb") as fh:
            return fh.read().replace(b"\0", b" ").decode(errors="replace")
    except OSError:
        return ""
