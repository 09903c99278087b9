"""The bring-your-own-model tests: the example plugin package must be installed (the
Makefile's venv step installs it; a venv set up by hand gets it here, once)."""

from __future__ import annotations

import importlib.util
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.ml import plugins

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "palimpsest-example-architectures"


def _ensure_example_plugin() -> None:
    if "example-resmlp" in plugins.installed():
        return
    pip = [sys.executable, "-m", "pip", "install", "-q", "--no-deps", "--no-build-isolation"]
    subprocess.run([*pip, "-e", str(EXAMPLE)], check=True)
    import importlib
    import site

    importlib.invalidate_caches()
    for d in site.getsitepackages():
        if any(Path(d).glob("__editable__*palimpsest_example*.pth")):
            site.addsitedir(d)  # picks up the new .pth (its path or finder) in this process
    plugins.refresh()


_ensure_example_plugin()

from tests.support.module_env import env  # noqa: E402  (one service per module)

__all__ = ["env", "free_port", "mlflow_uri"]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@pytest.fixture(scope="session")
def mlflow_uri(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """A real `mlflow server` (SQLite backend) on 127.0.0.1, one for the session."""
    if importlib.util.find_spec("mlflow") is None:
        pytest.skip("mlflow is not installed (pip install -e '.[dev]' or 'palimpsest[mlflow]')")
    folder = tmp_path_factory.mktemp("mlflow")
    port = free_port()
    cmd = [
        sys.executable,
        "-m",
        "mlflow",
        "server",
        "--host",
        "127.0.0.1",
        "--port",
        str(port),
        "--backend-store-uri",
        f"sqlite:///{folder / 'mlflow.db'}",
        "--default-artifact-root",
        str(folder / "artifacts"),
        "--workers",
        "1",
    ]
    log = (folder / "server.log").open("wb")
    proc = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, cwd=folder)
    uri = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 180
        while True:
            if proc.poll() is not None:
                pytest.fail(f"mlflow server exited: {(folder / 'server.log').read_text()[-2000:]}")
            try:
                if httpx.get(f"{uri}/health", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            if time.monotonic() > deadline:
                pytest.fail("mlflow server did not start within 180 s")
            time.sleep(0.5)
        yield uri
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=20)
        except subprocess.TimeoutExpired:
            proc.kill()
        log.close()
