"""A real Fides (ethyca-fides from PyPI): its own virtual environment, cached between
runs outside the repository, and its webserver and worker as child processes against a
private PostgreSQL database and Redis database number.

The venv lives in `~/.cache/palimpsest/fides-venv-<version>-py<major><minor>` (or under
`PALIMPSEST_FIDES_CACHE`); the first run installs it (a few minutes), later runs reuse
it. An install that did not finish leaves no `.installed` marker and is redone.
"""

from __future__ import annotations

import contextlib
import fcntl
import io
import os
import shutil
import signal
import subprocess
import sys
import time
import uuid
import zipfile
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx

from app.stack import free_port

FIDES_VERSION = os.environ.get("PALIMPSEST_FIDES_VERSION", "2.78.2")
CONNECTOR = Path(__file__).resolve().parents[2] / "integrations" / "fides"
INSTALL_TIMEOUT = 1500


def cache_root() -> Path:
    default = Path.home() / ".cache" / "palimpsest"
    return Path(os.environ.get("PALIMPSEST_FIDES_CACHE", str(default)))


def fides_venv(version: str = FIDES_VERSION) -> tuple[Path, float]:
    """The venv holding ethyca-fides `version`, and the seconds spent installing it now
    (0 when it was cached). Concurrent runs wait on one lock instead of racing."""
    tag = f"py{sys.version_info.major}{sys.version_info.minor}"
    venv = cache_root() / f"fides-venv-{version}-{tag}"
    marker = venv / ".installed"
    cache_root().mkdir(parents=True, exist_ok=True)
    with (cache_root() / f"fides-venv-{version}-{tag}.lock").open("w") as lock:
        fcntl.flock(lock, fcntl.LOCK_EX)
        if marker.exists():
            return venv, 0.0
        shutil.rmtree(venv, ignore_errors=True)
        started = time.monotonic()
        base = getattr(sys, "_base_executable", sys.executable)
        subprocess.run([base, "-m", "venv", str(venv)], check=True, timeout=300)
        out = subprocess.run(
            [str(venv / "bin" / "pip"), "install", "-q", f"ethyca-fides=={version}"],
            capture_output=True,
            text=True,
            timeout=INSTALL_TIMEOUT,
        )
        if out.returncode != 0:
            raise RuntimeError(f"installing ethyca-fides {version} failed:\n{out.stderr[-4000:]}")
        seconds = time.monotonic() - started
        marker.write_text(f"{version} installed in {seconds:.0f} s\n")
        return venv, seconds


def connector_zip() -> bytes:
    """The connector as Fides's custom-template upload takes it: config, dataset, icon."""
    buf = io.BytesIO()
    with zipfile.ZipFile(buf, "w") as z:
        for name in ("palimpsest_config.yml", "palimpsest_dataset.yml", "palimpsest.svg"):
            z.write(CONNECTOR / name, name)
    return buf.getvalue()


class FidesServer:
    """`fides webserver` and `fides worker`, configured by environment variables only."""

    def __init__(
        self, folder: Path, venv: Path, postgres_admin_url: str, redis_url: str, db_index: int
    ) -> None:
        from urllib.parse import urlparse

        self.folder = folder
        self.venv = venv
        self.port = free_port()
        self.base_url = f"http://127.0.0.1:{self.port}"
        self.admin_url = postgres_admin_url.replace("postgresql+psycopg://", "postgresql://")
        self.db_name = f"fides_it_{uuid.uuid4().hex[:10]}"
        self.client_id = "palimpsest-test"
        self.client_secret = uuid.uuid4().hex
        pg = urlparse(self.admin_url)
        rd = urlparse(redis_url)
        self.redis_url = f"{redis_url.rstrip('/')}/{db_index}"
        self.env = {
            "PATH": f"{venv / 'bin'}:{os.environ.get('PATH', '')}",
            "HOME": str(folder),
            "PYTHONUNBUFFERED": "1",
            "FIDES__DATABASE__SERVER": pg.hostname or "127.0.0.1",
            "FIDES__DATABASE__PORT": str(pg.port or 5432),
            "FIDES__DATABASE__USER": pg.username or "postgres",
            "FIDES__DATABASE__PASSWORD": pg.password or "unused-trust-auth",
            "FIDES__DATABASE__DB": self.db_name,
            "FIDES__REDIS__HOST": rd.hostname or "127.0.0.1",
            "FIDES__REDIS__PORT": str(rd.port or 6379),
            "FIDES__REDIS__PASSWORD": rd.password or "",
            "FIDES__REDIS__DB_INDEX": str(db_index),
            "FIDES__SECURITY__APP_ENCRYPTION_KEY": uuid.uuid4().hex,  # 32 characters
            "FIDES__SECURITY__OAUTH_ROOT_CLIENT_ID": self.client_id,
            "FIDES__SECURITY__OAUTH_ROOT_CLIENT_SECRET": self.client_secret,
            # A real worker takes the privacy requests (Fides's default runs them inline).
            "FIDES__CELERY__TASK_ALWAYS_EAGER": "false",
            # Fides refuses SaaS hosts on loopback outside dev mode; Palimpsest is on
            # 127.0.0.1 here.
            "FIDES__DEV_MODE": "true",
            "FIDES__USER__ANALYTICS_OPT_OUT": "true",
            "FIDES__EXECUTION__REQUIRE_MANUAL_REQUEST_APPROVAL": "true",
            "FIDES__EXECUTION__SUBJECT_IDENTITY_VERIFICATION_REQUIRED": "false",
            "FIDES__LOGGING__LEVEL": "INFO",
        }
        self.procs: list[subprocess.Popen[bytes]] = []
        self.logs: list[Path] = []

    def _spawn(self, name: str, *args: str) -> None:
        log = self.folder / f"fides-{name}.log"
        self.logs.append(log)
        fh = log.open("wb")
        self.procs.append(
            subprocess.Popen(
                [str(self.venv / "bin" / "fides"), *args],
                env=self.env,
                cwd=self.folder,
                stdout=fh,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        )

    def start(self, timeout: float = 240.0) -> FidesServer:
        import psycopg

        # Fides reads its bundled connector templates from ./data/saas (not in the wheel):
        # empty folders and a default icon are enough for custom templates.
        for sub in ("config", "dataset", "icon"):
            (self.folder / "data" / "saas" / sub).mkdir(parents=True, exist_ok=True)
        shutil.copy(CONNECTOR / "palimpsest.svg", self.folder / "data/saas/icon/default.svg")
        with psycopg.connect(self.admin_url, autocommit=True) as conn:
            conn.execute(f'CREATE DATABASE "{self.db_name}"')
        # The webserver migrates the database at start; the worker comes after it.
        self._spawn("webserver", "webserver", "--port", str(self.port))
        deadline = time.monotonic() + timeout
        if self._wait(deadline, self._healthy):
            self._spawn("worker", "worker")
            if self._wait(deadline, lambda: b" ready." in self.logs[-1].read_bytes()):
                return self
        self.stop()
        raise RuntimeError("Fides did not come up:\n" + self.tail())

    def _healthy(self) -> bool:
        with contextlib.suppress(httpx.HTTPError):
            return httpx.get(f"{self.base_url}/health", timeout=2).status_code == 200
        return False

    def _wait(self, deadline: float, ready: Any) -> bool:
        while time.monotonic() < deadline:
            if ready():
                return True
            if any(p.poll() is not None for p in self.procs):
                return False
            time.sleep(0.5)
        return False

    def tail(self, n: int = 4000) -> str:
        return "\n".join(
            f"--- {p.name}\n{p.read_text(errors='replace')[-n:]}" for p in self.logs if p.exists()
        )

    def log_text(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.logs if p.exists())

    def stop(self) -> None:
        import psycopg

        for p in self.procs:
            if p.poll() is None:
                p.terminate()
        for p in self.procs:
            try:
                p.wait(timeout=20)
            except subprocess.TimeoutExpired:
                p.kill()
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(p.pid, signal.SIGKILL)
        self.procs.clear()
        with contextlib.suppress(Exception), psycopg.connect(self.admin_url, autocommit=True) as c:
            c.execute(f'DROP DATABASE IF EXISTS "{self.db_name}" WITH (FORCE)')
        # The Redis database is not flushed: the numbers are drawn at random, like the
        # other integration tests', and a flush could empty a concurrent run's broker.

    def client(self) -> httpx.Client:
        """An API client authenticated as Fides's root OAuth client."""
        r = httpx.post(
            f"{self.base_url}/api/v1/oauth/token",
            data={
                "client_id": self.client_id,
                "client_secret": self.client_secret,
                "grant_type": "client_credentials",
            },
            timeout=30,
        )
        r.raise_for_status()
        token = r.json()["access_token"]
        return httpx.Client(
            base_url=f"{self.base_url}/api/v1",
            headers={"Authorization": f"Bearer {token}"},
            timeout=60,
        )


@contextlib.contextmanager
def running_fides(
    folder: Path, venv: Path, postgres_admin_url: str, redis_url: str, db_index: int
) -> Iterator[FidesServer]:
    server = FidesServer(folder, venv, postgres_admin_url, redis_url, db_index)
    server.start()
    try:
        yield server
    finally:
        server.stop()


def privacy_request(fides: httpx.Client, request_id: str) -> dict[str, Any]:
    r = fides.get("/privacy-request", params={"request_id": request_id, "verbose": "true"})
    r.raise_for_status()
    items = r.json()["items"]
    assert len(items) == 1, items
    return dict(items[0])
