"""Checkpoint store: safetensors + JSON, deterministic bytes, no pickle."""

from __future__ import annotations

import hashlib
import json

import fsspec
import pytest
import torch

from app.ml.checkpoints import CheckpointStore, FsspecCheckpointStore


def test_round_trip_and_deterministic_bytes(tmp_path: object) -> None:
    store = FsspecCheckpointStore.local(f"{tmp_path}/ck")
    assert isinstance(store, CheckpointStore)
    tensors = {"w": torch.arange(6, dtype=torch.float32).reshape(2, 3), "b": torch.ones(2)}
    meta = {"shard": 1, "slice": 0, "z": [1, 2], "a": {"y": 1, "x": 2}}
    assert not store.exists("k1")
    store.save("k1", tensors, meta)
    store.save("k2", {"b": torch.ones(2), "w": tensors["w"].clone()}, dict(reversed(meta.items())))
    assert store.exists("k1")
    got, got_meta = store.load("k1")
    assert got_meta == meta
    assert all(torch.equal(got[k], tensors[k]) for k in tensors)
    assert store.read_bytes("k1") == store.read_bytes("k2")
    assert store.path("k1").endswith("/ck/k1.safetensors")
    with open(f"{tmp_path}/ck/k1.json") as f:
        assert json.load(f) == meta
    store.delete("k1")
    assert not store.exists("k1")
    assert sorted(p.rsplit("/", 1)[-1] for p in store.fs.ls(store.root)) == [
        "k2.json",
        "k2.safetensors",
        "k2.sha256",
    ]
    # The digest recorded at write time is the bytes' own, and goes with the checkpoint.
    assert store.digest("k2") == hashlib.sha256(store.read_bytes("k2")).hexdigest()
    assert store.digest("k1") is None


def test_memory_filesystem_and_bad_keys() -> None:
    store = FsspecCheckpointStore(fsspec.filesystem("memory"), "/palimpsest-test-ck")
    store.save("a.b-c_d", {"t": torch.zeros(1)}, {})
    assert store.exists("a.b-c_d")
    for bad in ("../x", "a/b", "", ".hidden"):
        with pytest.raises(ValueError):
            store.exists(bad)
    store.delete("a.b-c_d")
