"""The OpenAPI document against the running API: schemathesis with every check, a fixed
seed and a bounded number of examples per operation, against a real `palimpsest api`
process on 127.0.0.1 with an admin key. Any failure (a 5xx, an undocumented status or
content type, a body off its schema, a schema-valid request refused, an invalid one
accepted, ...) fails the build.

Three runs, because two kinds of input cannot be told apart by a schema:
- examples and fuzzing, every check, with hooks (tests/contract/schemathesis_hooks.py)
  that keep two rules across fields JSON Schema cannot state and leave out the opaque
  list cursor;
- the coverage phase (boundary values; it bypasses hooks), every check but
  positive-data acceptance, which those same rules would trip;
- dataset uploads and model imports, every check but positive-data acceptance: whether
  a spec is valid depends on the uploaded file's columns (or weights).

Left out everywhere: `POST /v1/webhooks`, since generated URLs name hosts whose lookup
would leave this machine (webhook targets have their own tests), and
`POST /v1/keys/{key_id}/revoke`, which would revoke the run's own key.
"""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from app.stack import LocalStack, free_port

pytestmark = pytest.mark.contract

SEED = "20261101"
EXAMPLES = "50"
NEVER = [
    "--exclude-operation-id",
    "create_webhook_v1_webhooks_post",
    "--exclude-operation-id",
    "post_revoke_v1_keys__key_id__revoke_post",
]
DATASETS = "create_dataset_v1_datasets_post"
# Issue 14's model import: like a dataset upload, a multipart form whose `spec` string is
# valid only for the weights file beside it (and a dataset that exists).
IMPORT = "import_model_v1_model_imports_post"
HERE = Path(__file__).parent


@pytest.fixture(scope="module")
def api(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str, Path]]:
    folder = tmp_path_factory.mktemp("contract")
    stack = LocalStack(folder, env={"PALIMPSEST_LOG_LEVEL": "WARNING"})
    stack.cli("db", "upgrade")
    key = stack.create_key("admin", "schemathesis")
    port = free_port()
    log = (folder / "api.log").open("wb")
    proc = subprocess.Popen(
        [sys.executable, "-m", "app.cli", "api", "--host", "127.0.0.1", "--port", str(port)],
        env=stack.env,
        cwd=folder,
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 60
        while True:
            assert proc.poll() is None, (folder / "api.log").read_text()[-3000:]
            assert time.monotonic() < deadline, "the API did not come up"
            try:
                if httpx.get(f"{base}/readyz", timeout=2).status_code == 200:
                    break
            except httpx.HTTPError:
                pass
            time.sleep(0.2)
        yield base, key, folder
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def _run(api: tuple[str, str, Path], name: str, *args: str) -> None:
    base, key, folder = api
    cmd = [
        sys.executable,
        "-m",
        "schemathesis.cli",
        "run",
        f"{base}/openapi.json",
        "--url",
        base,
        "--header",
        f"Authorization: Bearer {key}",
        "--max-examples",
        EXAMPLES,
        "--seed",
        SEED,
        "--workers",
        "1",
        "--no-shrink",
        "--request-timeout",
        "30",
        *NEVER,
        *args,
    ]
    root = str(HERE.parent.parent)
    env = {
        **os.environ,
        "SCHEMATHESIS_HOOKS": "tests.contract.schemathesis_hooks",
        "PYTHONPATH": os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p),
    }
    # Run in the test's folder: schemathesis keeps a cache where it runs.
    out = subprocess.run(cmd, env=env, cwd=folder, capture_output=True, text=True, timeout=300)
    (folder / f"schemathesis-{name}.log").write_text(out.stdout + out.stderr)
    assert out.returncode == 0, f"schemathesis ({name}) failed:\n{out.stdout[-12000:]}"
    server_log = (folder / "api.log").read_text()
    assert "Traceback" not in server_log, server_log[-6000:]


def test_examples_and_fuzzing_pass_every_check(api: tuple[str, str, Path]) -> None:
    _run(
        api,
        "fuzzing",
        "--phases",
        "examples,fuzzing",
        "--checks",
        "all",
        "--exclude-operation-id",
        DATASETS,
        "--exclude-operation-id",
        IMPORT,
    )


def test_boundary_values_pass_every_check_but_positive_acceptance(
    api: tuple[str, str, Path],
) -> None:
    _run(
        api,
        "coverage",
        "--phases",
        "coverage",
        "--checks",
        "all",
        "--exclude-checks",
        "positive_data_acceptance",
    )


def test_dataset_uploads_pass_every_check_but_positive_acceptance(
    api: tuple[str, str, Path],
) -> None:
    _run(
        api,
        "datasets",
        "--phases",
        "examples,fuzzing",
        "--checks",
        "all",
        "--exclude-checks",
        "positive_data_acceptance",
        "--include-operation-id",
        DATASETS,
        "--include-operation-id",
        IMPORT,
    )
