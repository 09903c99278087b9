"""`palimpsest demo --serve`: after the demo the service keeps running, the dashboard URL
and an admin key are printed, the key logs in, and Ctrl-C stops everything cleanly.

The demo runs one story on a small dataset (the hidden `--stories` option) to keep the
test short; the serving part is the same for the full demo.
"""

from __future__ import annotations

import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import httpx
import pytest

pytestmark = pytest.mark.browser


def _reader(stream: IO[str], lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line)


def test_demo_serve_prints_a_dashboard_url_and_key_and_stops_on_ctrl_c(tmp_path: Path) -> None:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PALIMPSEST_TORCH_THREADS": "1"}
    proc = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "app.cli",
            "demo",
            "--serve",
            "--stories",
            "erasure",
            "--subjects",
            "150",
            "--folder",
            str(tmp_path / "demo"),
        ],
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
    )
    assert proc.stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
    output: list[str] = []
    url = key = None
    try:
        deadline = time.monotonic() + 240
        while key is None:
            assert time.monotonic() < deadline, "no admin key printed:\n" + "".join(output)
            assert proc.poll() is None or not lines.empty(), "demo exited:\n" + "".join(output)
            try:
                line = lines.get(timeout=1)
            except queue.Empty:
                continue
            output.append(line)
            if m := re.match(r"dashboard: (http://127\.0\.0\.1:\d+/admin)\s*$", line):
                url = m.group(1)
            elif m := re.match(r"admin key: (\S+)\s*$", line):
                key = m.group(1)
        assert url is not None, "".join(output)
        base = url.removesuffix("/admin")

        with httpx.Client(base_url=base, timeout=30) as http:
            refused = http.post("/admin/login", data={"key": "wrong"})
            assert refused.status_code == 401
            r = http.post("/admin/login", data={"key": key})
            assert r.status_code == 303, r.text
            assert r.headers["location"].rstrip("/").endswith("/admin")
            assert "palimpsest_admin" in http.cookies
            overview = http.get("/admin")
            assert overview.status_code == 200, overview.text[:500]
            assert 'data-testid="status-counts"' in overview.text
            assert 'data-status="completed"' in overview.text  # the demo's requests
            # The key is a real admin API key too.
            api = http.get("/v1/models/esl-by-student", headers={"Authorization": f"Bearer {key}"})
            assert api.status_code == 200 and api.json()["production_version"] >= 2

        proc.send_signal(signal.SIGINT)
        assert proc.wait(timeout=60) == 0, "".join(output)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    # The API went down with it.
    with pytest.raises(httpx.TransportError):
        httpx.get(f"{base}/healthz", timeout=2)
