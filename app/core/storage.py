"""The artifact store: a local folder or any fsspec URL (s3://bucket/prefix... with the
`s3` extra, s3fs), with PALIMPSEST_ARTIFACT_OPTIONS for the filesystem's options."""

from __future__ import annotations

import io
import json
import posixpath
import uuid
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from app.core.settings import Settings, get_settings


class ArtifactStore:
    """Paths are relative to the root; writes go to a temporary name, then move."""

    def __init__(self, root: str, options: dict[str, Any] | None = None) -> None:
        self.fs: Any
        self.fs, path = fsspec.core.url_to_fs(root, **_options(root, options or {}))
        self.root = path.rstrip("/")
        self.fs.makedirs(self.root, exist_ok=True)

    def path(self, rel: str) -> str:
        return posixpath.join(self.root, rel)

    def exists(self, rel: str) -> bool:
        return bool(self.fs.exists(self.path(rel)))

    def write_bytes(self, rel: str, data: bytes) -> None:
        """Readers see the old bytes or the new ones, never a part: the bytes go to a
        temporary name of this writer's own (two workers may write the same path after
        a takeover) and are then moved into place."""
        full = self.path(rel)
        self.fs.makedirs(posixpath.dirname(full), exist_ok=True)
        tmp = f"{full}.tmp-{uuid.uuid4().hex}"
        try:
            with self.fs.open(tmp, "wb") as fh:
                fh.write(data)
            self.fs.mv(tmp, full)
        finally:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)

    def open(self, rel: str, mode: str = "rb") -> Any:
        """A file object on `rel`, for streaming; writers use names no reader expects
        (an upload's staging name, a `.tmp-` name then `move`)."""
        full = self.path(rel)
        if "w" in mode:
            self.fs.makedirs(posixpath.dirname(full), exist_ok=True)
        return self.fs.open(full, mode)

    def move(self, src: str, dst: str) -> None:
        self.fs.mv(self.path(src), self.path(dst))

    def size(self, rel: str) -> int:
        return int(self.fs.size(self.path(rel)))

    def read_bytes(self, rel: str) -> bytes:
        with self.fs.open(self.path(rel), "rb") as fh:
            return bytes(fh.read())

    def delete(self, rel: str) -> None:
        full = self.path(rel)
        if self.fs.exists(full):
            self.fs.rm(full, recursive=True)

    def list(self, rel: str) -> list[str]:
        full = self.path(rel)
        if not self.fs.exists(full):
            return []
        return sorted(posixpath.relpath(p, self.root) for p in self.fs.find(full))

    def usage(self, rel: str) -> tuple[int, int]:
        """Files under `rel` and their total bytes (0, 0 when there is nothing)."""
        full = self.path(rel)
        if not self.fs.exists(full):
            return 0, 0
        found = self.fs.find(full, detail=True)
        files = [v for v in found.values() if v.get("type", "file") == "file"]
        return len(files), sum(int(v.get("size") or 0) for v in files)

    def write_table(self, rel: str, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self.write_bytes(rel, buf.getvalue())

    def read_table(self, rel: str) -> pa.Table:
        return pq.read_table(io.BytesIO(self.read_bytes(rel)))


def _options(root: str, options: dict[str, Any]) -> dict[str, Any]:
    """The filesystem's options. On object stores the API and the workers write the same
    prefixes from different processes, so a cached listing would go stale: s3fs and
    gcsfs list afresh unless told otherwise."""
    if root.startswith(("s3://", "s3a://", "gs://", "gcs://")):
        return {"use_listings_cache": False, **options}
    return options


_stores: dict[tuple[str, str], ArtifactStore] = {}


def get_store(settings: Settings | None = None) -> ArtifactStore:
    settings = settings or get_settings()
    key = (settings.artifact_root, json.dumps(settings.artifact_options, sort_keys=True))
    if key not in _stores:
        _stores[key] = ArtifactStore(settings.artifact_root, settings.artifact_options)
    return _stores[key]
