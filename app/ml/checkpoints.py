"""Checkpoint storage: safetensors weights with a JSON config beside them.

Nothing is ever pickled or read with `torch.load`. Bytes are deterministic for the same
tensors and metadata (sorted tensor names, canonical JSON, a single safetensors metadata
entry because safetensors does not keep the order of several), so content-addressed
checkpoints that two model versions share are byte-equal.
"""

from __future__ import annotations

import hashlib
import json
import os
import re
import uuid
from typing import Any, Protocol, runtime_checkable

import fsspec
import torch
from fsspec.implementations.local import LocalFileSystem
from safetensors.torch import load as st_load
from safetensors.torch import save as st_save

_KEY = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._-]{0,199}$")


def canonical_json(obj: Any) -> str:
    """Deterministic JSON text (sorted keys, no whitespace)."""
    return json.dumps(obj, sort_keys=True, separators=(",", ":"), allow_nan=False)


def tensors_to_bytes(
    tensors: dict[str, torch.Tensor], meta: dict[str, Any], meta_json: str | None = None
) -> bytes:
    """safetensors bytes for `tensors` with `meta` embedded as canonical JSON
    (`meta_json`, when given, is that JSON already)."""
    cpu = {k: tensors[k].detach().to("cpu").contiguous() for k in sorted(tensors)}
    text = canonical_json(meta) if meta_json is None else meta_json
    return bytes(st_save(cpu, metadata={"palimpsest": text}))


@runtime_checkable
class CheckpointStore(Protocol):
    """Where weights live, addressed by an opaque key (letters, digits, `._-`)."""

    def exists(self, key: str) -> bool: ...

    def save(self, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None: ...

    def load(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]: ...

    def delete(self, key: str) -> None: ...

    def path(self, key: str) -> str: ...


class FsspecCheckpointStore:
    """`{root}/{key}.safetensors` + `{root}/{key}.json` on any fsspec filesystem.

    Each file is written to a unique temporary name and then moved into place, so a
    reader never sees half a file; the JSON is written last and `exists` needs both.
    """

    def __init__(self, fs: fsspec.AbstractFileSystem, root: str) -> None:
        self.fs = fs
        self.root = root.rstrip("/")
        self.fs.makedirs(self.root, exist_ok=True)

    @classmethod
    def local(cls, root: str) -> FsspecCheckpointStore:
        return cls(fsspec.filesystem("file"), root)

    def _check(self, key: str) -> str:
        if not _KEY.match(key):
            raise ValueError(f"invalid checkpoint key {key!r}")
        return key

    def path(self, key: str) -> str:
        """Path of the weights file."""
        return f"{self.root}/{self._check(key)}.safetensors"

    def meta_path(self, key: str) -> str:
        return f"{self.root}/{self._check(key)}.json"

    def exists(self, key: str) -> bool:
        return bool(self.fs.exists(self.meta_path(key)) and self.fs.exists(self.path(key)))

    def _write(self, path: str, blob: bytes) -> None:
        tmp = f"{path}.tmp-{uuid.uuid4().hex}"
        if isinstance(self.fs, LocalFileSystem):
            # The same write-then-rename with the OS calls alone: a SISA unlearning
            # writes a checkpoint per retrained stage, and fsspec's path handling
            # around each costs more than the write.
            local = self.fs._strip_protocol(tmp)
            try:
                with open(local, "wb") as f:
                    f.write(blob)
                os.replace(local, self.fs._strip_protocol(path))
            except BaseException:
                if os.path.exists(local):
                    os.remove(local)
                raise
            return
        self.fs.pipe_file(tmp, blob)
        try:
            self.fs.mv(tmp, path)
        except BaseException:
            if self.fs.exists(tmp):
                self.fs.rm(tmp)
            raise

    def digest_path(self, key: str) -> str:
        return f"{self.root}/{self._check(key)}.sha256"

    def save(self, key: str, tensors: dict[str, torch.Tensor], meta: dict[str, Any]) -> None:
        text = canonical_json(meta)
        blob = tensors_to_bytes(tensors, meta, text)
        self._write(self.path(key), blob)
        # Recorded as the bytes are written, so that proving what a version used (its
        # certificate) never re-reads every checkpoint.
        self._write(self.digest_path(key), hashlib.sha256(blob).hexdigest().encode())
        self._write(self.meta_path(key), (text + "\n").encode())

    def digest(self, key: str) -> str | None:
        """SHA-256 of the checkpoint's bytes as written; None once it is deleted.
        Checkpoints written before digests were recorded are hashed once, here."""
        path = self.digest_path(key)
        if self.fs.exists(path):
            return bytes(self.fs.cat_file(path)).decode().strip()
        if not self.fs.exists(self.path(key)):
            return None
        return hashlib.sha256(self.read_bytes(key)).hexdigest()

    def load(self, key: str) -> tuple[dict[str, torch.Tensor], dict[str, Any]]:
        blob = self.fs.cat_file(self.path(key))
        meta: dict[str, Any] = json.loads(self.fs.cat_file(self.meta_path(key)))
        return dict(st_load(blob)), meta

    def read_bytes(self, key: str) -> bytes:
        """Raw weights bytes (for byte-equality checks across model versions)."""
        return bytes(self.fs.cat_file(self.path(key)))

    def delete(self, key: str) -> None:
        for p in (self.meta_path(key), self.digest_path(key), self.path(key)):
            if self.fs.exists(p):
                self.fs.rm(p)
