"""The artifact store: a local folder or any fsspec URL (s3://bucket/prefix...)."""

from __future__ import annotations

import io
import posixpath
import uuid
from typing import Any

import fsspec
import pyarrow as pa
import pyarrow.parquet as pq

from app.core.settings import Settings, get_settings


class ArtifactStore:
    """Paths are relative to the root; writes go to a temporary name, then move."""

    def __init__(self, root: str) -> None:
        self.fs: Any
        self.fs, path = fsspec.core.url_to_fs(root)
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

    def write_table(self, rel: str, table: pa.Table) -> None:
        buf = io.BytesIO()
        pq.write_table(table, buf, compression="zstd")
        self.write_bytes(rel, buf.getvalue())

    def read_table(self, rel: str) -> pa.Table:
        return pq.read_table(io.BytesIO(self.read_bytes(rel)))


_stores: dict[str, ArtifactStore] = {}


def get_store(settings: Settings | None = None) -> ArtifactStore:
    root = (settings or get_settings()).artifact_root
    if root not in _stores:
        _stores[root] = ArtifactStore(root)
    return _stores[root]
