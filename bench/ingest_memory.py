"""Memory of one dataset ingest: the worker's `ingest` job against the inline path.

Run with `python -m bench.ingest_memory job 40000` (or `inline`; the number is students
of the demo's generator, 2-6 rows each, about 180 bytes of CSV per student). Each run is
its own process on a fresh SQLite database in a temporary folder: the CSV is staged in
the artifact store as an upload would be, then ingested, and the process's peak RSS
(VmHWM) is compared with its RSS just before. The job reads the file in batches, so its
growth should not depend on the file's size; the inline path holds the parsed table and
Python rows whole.
"""

from __future__ import annotations

import gc
import os
import sys
import tempfile
import time
from pathlib import Path


def _kib(field: str) -> int:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1])
    raise RuntimeError(field)


def main(mode: str, n_subjects: int) -> str:
    folder = Path(tempfile.mkdtemp(prefix="palimpsest-ingest-memory-"))
    os.environ.update(
        {
            "PALIMPSEST_ENVIRONMENT": "test",
            "PALIMPSEST_DATABASE_URL": f"sqlite:///{folder}/db.sqlite",
            "PALIMPSEST_ARTIFACT_ROOT": str(folder / "artifacts"),
            "PALIMPSEST_BROKER_URL": "memory://",
            "PALIMPSEST_RESULT_BACKEND": "cache+memory://",
            "PALIMPSEST_SIGNING_KEY_FILE": str(folder / "signing-key.pem"),
        }
    )
    from app.cli import upgrade_database
    from app.core.db import session_scope
    from app.core.settings import get_settings
    from app.core.storage import get_store
    from app.datasets import service
    from app.datasets.parsing import read_table
    from app.datasets.schemas import DatasetSpec
    from app.demo import learning_dataset
    from app.pipeline import ingest
    from workers.celery_app import install_sender

    install_sender()
    upgrade_database(os.environ["PALIMPSEST_DATABASE_URL"])
    data = learning_dataset(n_subjects)
    spec = DatasetSpec(
        name="measured",
        subject_column="student",
        label_column="passed",
        source_column="district",
        group_columns=["home_language"],
    )
    store = get_store()
    store.write_bytes("uploads/measured.upload", data)
    size = len(data)
    del data
    gc.collect()
    before = _kib("VmRSS")
    started = time.perf_counter()
    if mode == "job":
        with session_scope() as s:
            staged = service.stage(s, spec, "uploads/measured.upload", "m.csv", size, "bench")
        ingest.run_ingest(staged.job_id)
    else:
        with session_scope() as s:
            table = read_table(store.read_bytes("uploads/measured.upload"), "m.csv")
            service.ingest(s, store, get_settings(), spec, table, "bench")
    peak = _kib("VmHWM")
    return (
        f"{mode}: {size / 1e6:.1f} MB of CSV in {time.perf_counter() - started:.1f} s; "
        f"RSS before {before / 1024:.0f} MiB, peak {peak / 1024:.0f} MiB, "
        f"growth {(peak - before) / 1024:.0f} MiB"
    )


if __name__ == "__main__":
    args = sys.argv[1:]
    print(main(args[0] if args else "job", int(args[1]) if len(args) > 1 else 40000))
