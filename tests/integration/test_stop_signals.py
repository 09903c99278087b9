"""Whatever starts the service's processes stops them all when it is told to stop:
`palimpsest demo` (with or without `--serve`) and the benchmarks, on SIGTERM or SIGINT.
The API and worker lead sessions of their own, so a signal to the parent never reaches
them by itself: the parent must take them down."""

from __future__ import annotations

import os
import queue
import signal
import subprocess
import sys
import threading
import time
from pathlib import Path
from typing import IO

import pytest

pytestmark = pytest.mark.integration


def _children(pid: int) -> set[int]:
    """Every live descendant of `pid`, read from /proc."""
    parents: dict[int, int] = {}
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        parents[int(entry.name)] = int(fields[1])
    out: set[int] = set()
    frontier = {pid}
    while frontier:
        frontier = {p for p, pp in parents.items() if pp in frontier} - out
        out |= frontier
    return out


def _alive(pid: int) -> bool:
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"  # a zombie has stopped running


def _reader(stream: IO[str], lines: queue.Queue[str]) -> None:
    for line in stream:
        lines.put(line)


def _start(args: list[str], tmp_path: Path, ready: str) -> tuple[subprocess.Popen[str], set[int]]:
    env = {**os.environ, "PYTHONUNBUFFERED": "1", "PALIMPSEST_TORCH_THREADS": "1"}
    proc = subprocess.Popen(
        args,
        cwd=tmp_path,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
        start_new_session=True,  # the test's own signals stay the test's
    )
    assert proc.stdout is not None
    lines: queue.Queue[str] = queue.Queue()
    threading.Thread(target=_reader, args=(proc.stdout, lines), daemon=True).start()
    output: list[str] = []
    deadline = time.monotonic() + 180
    while not any(ready in line for line in output):
        assert time.monotonic() < deadline, "never ready:\n" + "".join(output)
        assert proc.poll() is None or not lines.empty(), "exited:\n" + "".join(output)
        try:
            output.append(lines.get(timeout=1))
        except queue.Empty:
            continue
    # The API and the worker (and the worker's beat) are running now.
    kids = _children(proc.pid)
    assert len(kids) >= 2, (kids, "".join(output))
    return proc, kids


def _stop_and_check(proc: subprocess.Popen[str], kids: set[int], sig: signal.Signals) -> None:
    try:
        proc.send_signal(sig)
        proc.wait(timeout=90)
        deadline = time.monotonic() + 30
        while any(_alive(p) for p in kids) and time.monotonic() < deadline:
            time.sleep(0.2)
        assert not [p for p in kids if _alive(p)], "children left running"
    finally:
        for p in kids:  # never leave them behind, even when the check failed
            if _alive(p):
                os.kill(p, signal.SIGKILL)
        if proc.poll() is None:
            proc.kill()
            proc.wait()


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_demo_stopped_while_running_its_stories_takes_its_processes_down(
    tmp_path: Path, sig: signal.Signals
) -> None:
    proc, kids = _start(
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
        tmp_path,
        ready="API at http://127.0.0.1:",
    )
    _stop_and_check(proc, kids, sig)
    assert proc.returncode != 0  # interrupted, not finished


SCRIPT = """
import sys, time
from pathlib import Path
from app.stack import LocalStack

with LocalStack(Path(sys.argv[1])) as stack:
    print("stack up", flush=True)
    time.sleep(600)
"""


def test_a_script_holding_a_stack_stops_it_on_sigterm(tmp_path: Path) -> None:
    """What the benchmarks do (`with LocalStack(...)`): SIGTERM unwinds the `with`."""
    proc, kids = _start(
        [sys.executable, "-c", SCRIPT, str(tmp_path / "stack")], tmp_path, ready="stack up"
    )
    _stop_and_check(proc, kids, signal.SIGTERM)
