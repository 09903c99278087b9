"""Large uploads through real processes: the API streams the file to the artifact store
with bounded memory (its peak RSS measured while 60 MB arrive), and a real worker's
ingest job makes the dataset ready, on both deployment shapes."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from app.stack import LocalStack
from tests.integration.flows import ingest, make_csv, wait_for

pytestmark = pytest.mark.integration
BOUNDARY = "palimpsest-upload-boundary"
SPEC = {
    "name": "streamed",
    "subject_column": "person",
    "label_column": "passed",
    "source_column": "district",
}


def _kib(pid: int, field: str) -> int:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise AssertionError(f"no {field} for {pid}")


def _body(total: int) -> Iterator[bytes]:
    """A multipart body whose CSV part (`total` bytes or a little more) is generated as
    it is sent: the client holds no more of it than the API should."""
    yield (
        f"--{BOUNDARY}\r\n"
        'Content-Disposition: form-data; name="spec"\r\n\r\n'
        f"{json.dumps(SPEC)}\r\n"
        f"--{BOUNDARY}\r\n"
        'Content-Disposition: form-data; name="file"; filename="big.csv"\r\n'
        "Content-Type: text/csv\r\n\r\n"
    ).encode()
    yield b"person,district,age,score,home_language,track,passed\n"
    sent, i = 0, 0
    districts = ("north", "south", "east", "west")
    while sent < total:
        lines = [
            f"p{(i + k) // 4:07d},{districts[(i + k) % 4]},{15 + (i + k) % 4},"
            f"{((i + k) * 7919 % 1000) / 500 - 1:.4f},en,{'ab'[(i + k) % 2]},{(i + k) % 3 % 2}\n"
            for k in range(20_000)
        ]
        chunk = "".join(lines).encode()
        i += 20_000
        sent += len(chunk)
        yield chunk
    yield f"\r\n--{BOUNDARY}--\r\n".encode()


def test_api_memory_stays_bounded_while_a_60_mb_upload_streams_in(tmp_path: Path) -> None:
    size = 60 * 10**6
    with LocalStack(tmp_path / "stack", env={"PALIMPSEST_DEVICE": "cpu"}) as stack:
        admin = stack.create_key("admin", "admin")
        api = stack.procs[0].pid
        with httpx.Client(
            base_url=stack.base_url, headers={"Authorization": f"Bearer {admin}"}, timeout=300
        ) as client:
            # Warm the endpoint (imports, first request) so the measurement is the upload's.
            warm = make_csv(n_subjects=20)
            assert client.post(
                "/v1/datasets",
                files={"file": ("w.csv", warm, "text/csv")},
                data={"spec": json.dumps({**SPEC, "name": "warm"})},
            ).status_code in (201, 202)
            rss_before = _kib(api, "VmRSS")
            started = time.monotonic()
            resp = client.post(
                "/v1/datasets",
                headers={"Content-Type": f"multipart/form-data; boundary={BOUNDARY}"},
                content=_body(size),
            )
            seconds = time.monotonic() - started
            peak = _kib(api, "VmHWM")
            assert resp.status_code == 202, resp.text
            body: dict[str, Any] = resp.json()
            assert body["status"] == "ingesting" and body["job_id"]
            staged = list((tmp_path / "stack" / "artifacts" / "uploads").glob("*.upload"))
            assert staged and staged[0].stat().st_size >= size
    growth_mib = (peak - rss_before) / 1024
    print(
        f"\nupload of {size / 1e6:.0f} MB in {seconds:.1f} s: API RSS before "
        f"{rss_before / 1024:.1f} MiB, peak {peak / 1024:.1f} MiB, growth {growth_mib:.1f} MiB"
    )
    # Bounded: a few MiB of buffers, nothing like the file (60 MB) or a parsed table.
    assert growth_mib < 20, growth_mib


def test_a_large_upload_is_ingested_by_the_worker(stack: LocalStack) -> None:
    """Above the inline size (4 MiB by default): 202, then the real worker's ingest
    job, then a dataset like any other."""
    admin = stack.create_key("admin", "admin")
    data = make_csv(n_subjects=30_000, per_subject=5, seed=3)
    assert len(data) > 4 * 2**20
    with httpx.Client(
        base_url=stack.base_url, headers={"Authorization": f"Bearer {admin}"}, timeout=120
    ) as client:
        resp = client.post(
            "/v1/datasets",
            files={"file": ("big.csv", data, "text/csv")},
            data={"spec": json.dumps({**SPEC, "name": "big", "group_columns": ["home_language"]})},
        )
        assert resp.status_code == 202, resp.text
        accepted = resp.json()
        job = wait_for(
            lambda: client.get(f"/v1/jobs/{accepted['job_id']}").json(),
            lambda j: j["status"] in ("succeeded", "failed"),
            timeout=120,
        )
        assert job["status"] == "succeeded", job
        assert job["kind"] == "ingest" and job["progress"] == 1.0
        ds = client.get(f"/v1/datasets/{accepted['id']}").json()
        assert ds["status"] == "ready"
        assert ds["n_records"] == 150_000 and ds["n_subjects"] == 30_000
        assert ds["sources"] == ["east", "north", "south", "west"]
        assert ds["label_classes"] == ["0", "1"]
        # The flows' client (API.md's `id`) works on it as on a small one.
        small = ingest(client, "small", make_csv(n_subjects=40))
        assert small["status"] == "ready"
    assert not list((stack.folder / "artifacts" / "uploads").glob("*.upload"))
