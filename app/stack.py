"""Start a real API server and a real Celery worker as child processes.

Used by `palimpsest demo` and by the integration tests: the product's real shape, with
real HTTP and a real worker, on whatever settings the environment holds.
"""

from __future__ import annotations

import contextlib
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path
from types import FrameType, TracebackType
from typing import Any

import httpx


def _interrupt(signum: int, _frame: FrameType | None) -> None:
    raise KeyboardInterrupt(f"signal {signal.Signals(signum).name}")


def _catch_stop_signals() -> dict[signal.Signals, Any]:
    """Turn SIGTERM and SIGHUP (and SIGINT where a background shell left it ignored)
    into KeyboardInterrupt, so that whatever started a stack unwinds through its
    `finally`/`with` and stops the child processes: they lead sessions of their own, so
    no signal sent to us reaches them. Only from the main thread (signals go there);
    returns the handlers to restore."""
    if threading.current_thread() is not threading.main_thread():
        return {}
    previous: dict[signal.Signals, Any] = {}
    for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
        current = signal.getsignal(sig)
        default = signal.SIG_IGN if sig == signal.SIGINT else signal.SIG_DFL
        if current == default:
            previous[sig] = signal.signal(sig, _interrupt)
    return previous


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


class LocalStack:
    """`palimpsest db upgrade`, keys, then `palimpsest api` and `palimpsest worker`."""

    def __init__(self, folder: Path, env: dict[str, str] | None = None, port: int = 0) -> None:
        self.folder = folder
        self.port = port or free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.env = {
            **os.environ,
            "PALIMPSEST_DATABASE_URL": f"sqlite:///{folder / 'palimpsest.sqlite'}",
            "PALIMPSEST_BROKER_URL": f"sqla+sqlite:///{folder / 'broker.sqlite'}",
            "PALIMPSEST_RESULT_BACKEND": f"db+sqlite:///{folder / 'results.sqlite'}",
            "PALIMPSEST_ARTIFACT_ROOT": str(folder / "artifacts"),
            "PALIMPSEST_SIGNING_KEY_FILE": str(folder / "signing-key.pem"),
            "PALIMPSEST_BEAT_SCHEDULE_FILE": str(folder / "celerybeat-schedule"),
            # One API process: the demo and the tests need no more, and each costs a start-up.
            # A deployment's `palimpsest api` takes the core count (B9 asks for it).
            "PALIMPSEST_API_WORKERS": os.environ.get("PALIMPSEST_API_WORKERS", "1"),
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []
        self._previous_handlers: dict[signal.Signals, Any] = {}

    @property
    def pepper(self) -> str:
        """The subject pepper the stack's processes use: configured, or the install's own
        (made by its first process, beside the signing key)."""
        configured = self.env.get("PALIMPSEST_SUBJECT_PEPPER")
        if configured:
            return configured
        path = Path(self.env["PALIMPSEST_SIGNING_KEY_FILE"]).parent / "instance-secrets.json"
        return str(json.loads(path.read_text())["subject_pepper"])

    def cli(self, *args: str) -> str:
        out = subprocess.run(
            [sys.executable, "-m", "app.cli", *args],
            env=self.env,
            cwd=self.folder,
            capture_output=True,
            text=True,
            timeout=300,
        )
        if out.returncode != 0:
            raise RuntimeError(f"palimpsest {' '.join(args)} failed: {out.stderr[-2000:]}")
        return out.stdout

    def create_key(self, role: str, name: str) -> str:
        return self.cli("keys", "create", "--role", role, "--name", name).strip().splitlines()[-1]

    def _spawn(self, name: str, *args: str) -> None:
        self.folder.mkdir(parents=True, exist_ok=True)
        log = self.folder / f"{name}.log"
        self.logs.append(log)
        fh = log.open("wb")
        self.procs.append(
            subprocess.Popen(
                [sys.executable, "-m", "app.cli", *args],
                env=self.env,
                cwd=self.folder,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    def start(
        self,
        worker_args: tuple[str, ...] = (),
        *,
        api_args: tuple[str, ...] = (),
        worker: bool = True,
    ) -> LocalStack:
        """`worker=False` starts the API alone (`start_worker` adds one later)."""
        self.folder.mkdir(parents=True, exist_ok=True)
        if not self._previous_handlers:
            self._previous_handlers = _catch_stop_signals()
        self.cli("db", "upgrade")
        self._spawn("api", "api", "--host", "127.0.0.1", "--port", str(self.port), *api_args)
        if worker:
            self.start_worker(*worker_args)
        deadline = time.monotonic() + 60
        while time.monotonic() < deadline:
            try:
                if httpx.get(f"{self.base_url}/readyz", timeout=2).status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            if any(p.poll() is not None for p in self.procs):
                break
            time.sleep(0.2)
        self.stop()
        raise RuntimeError("the API did not come up:\n" + self.tail())

    def start_worker(self, *args: str, name: str = "worker", beat: bool = True) -> None:
        """A `palimpsest worker` (its log is `<name>.log`), by default with the embedded
        beat; a stack runs one beat, however many workers."""
        self._spawn(name, "worker", "--loglevel", "WARNING", *(["--beat"] if beat else []), *args)

    def tail(self, n: int = 4000) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-n:]}" for p in self.logs if p.exists()
        )

    def stop(self) -> None:
        # A second signal must not cut the shutdown short and leave children behind.
        in_main = threading.current_thread() is threading.main_thread()
        held: dict[signal.Signals, Any] = {}
        if in_main:
            for sig in (signal.SIGTERM, signal.SIGHUP, signal.SIGINT):
                held[sig] = signal.signal(sig, signal.SIG_IGN)
        try:
            for p in self.procs:
                if p.poll() is None:
                    p.terminate()
            for p in self.procs:
                try:
                    p.wait(timeout=15)
                except subprocess.TimeoutExpired:
                    p.kill()
                # Each process leads its own session: take its children (the worker's
                # embedded beat) with it, so nothing is left orphaned.
                with contextlib.suppress(ProcessLookupError, PermissionError):
                    os.killpg(p.pid, signal.SIGKILL)
            self.procs.clear()
        finally:
            if in_main:
                for sig, handler in held.items():
                    signal.signal(sig, handler)
                for sig, handler in self._previous_handlers.items():
                    signal.signal(sig, handler)
                self._previous_handlers = {}

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
