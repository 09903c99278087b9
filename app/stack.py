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
import time
from pathlib import Path
from types import TracebackType

import httpx


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
            "PYTHONUNBUFFERED": "1",
            **(env or {}),
        }
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

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

    def start(self, worker_args: tuple[str, ...] = ()) -> LocalStack:
        self.folder.mkdir(parents=True, exist_ok=True)
        self.cli("db", "upgrade")
        self._spawn("api", "api", "--host", "127.0.0.1", "--port", str(self.port))
        self._spawn("worker", "worker", "--loglevel", "WARNING", "--beat", *worker_args)
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

    def tail(self, n: int = 4000) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-n:]}" for p in self.logs if p.exists()
        )

    def stop(self) -> None:
        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=15)
            except subprocess.TimeoutExpired:
                p.kill()
            # Each process leads its own session: take its children (the worker's embedded
            # beat) with it, so nothing is left orphaned.
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
        self.procs.clear()

    def __enter__(self) -> LocalStack:
        return self.start()

    def __exit__(
        self, t: type[BaseException] | None, e: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()
