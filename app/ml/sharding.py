"""SISA data layout: which shard and which slice each record belongs to.

Every assignment is a pure function of stable keys (subject, source, record id) hashed with
SHA-256, never Python's salted `hash()`, so the layout is reproducible across processes.
The service computes the layout once at first training and persists it; unlearning takes
the persisted arrays and never recomputes them, so removing records cannot move others.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

from app.ml.config import SisaConfig
from app.ml.data import TabularData
from app.ml.device import derive_seed


def _stable_buckets(keys: Iterable[object], modulus: int, *salt: object) -> np.ndarray:
    """SHA-256 bucket in [0, modulus) per key (int64)."""
    return np.fromiter((derive_seed(*salt, k) % modulus for k in keys), dtype=np.int64, count=-1)


def _by_unique(values: np.ndarray, modulus: int, *salt: object) -> np.ndarray:
    """Bucket per row, hashing each distinct value once (subjects repeat across rows)."""
    if len(values) == 0:
        return np.zeros(0, dtype=np.int64)
    uniq, inverse = np.unique(values.astype(str), return_inverse=True)
    return _stable_buckets(uniq.tolist(), modulus, *salt)[inverse.reshape(-1)]


def assign_shards(data: TabularData, sisa: SisaConfig, seed: int) -> np.ndarray:
    """Shard index (int64, (N,)) per record of `data`, following `sisa.sharding`."""
    s = sisa.shards
    if s < 1:
        raise ValueError("SISA needs at least one shard")
    if sisa.sharding == "subject":
        return _by_unique(data.subjects, s, seed, "shard-subject")
    if sisa.sharding == "random":
        return _stable_buckets(data.record_ids.tolist(), s, seed, "shard-record")
    if sisa.sharding == "source":
        return _pack_sources(data, s, seed)
    raise ValueError(f"unknown sharding {sisa.sharding!r}")


def _pack_sources(data: TabularData, shards: int, seed: int) -> np.ndarray:
    """Whole sources into as few shards as possible.

    Greedy largest-first (ties by source name) into the least-loaded shard (ties by
    index). Capacity is ceil(N/S): a source that fits is never split, even if that
    overfills a shard, because withdrawing a source should touch as few shards as
    possible; a larger source is split by subject hash over the ceil(size/capacity)
    least-loaded shards, so each of its subjects still lands in exactly one shard.
    """
    n = len(data)
    out = np.zeros(n, dtype=np.int64)
    if n == 0:
        return out
    capacity = max(1, math.ceil(n / shards))
    names, inverse, counts = np.unique(
        data.sources.astype(str), return_inverse=True, return_counts=True
    )
    inverse = inverse.reshape(-1)
    load = np.zeros(shards, dtype=np.int64)
    order = sorted(range(len(names)), key=lambda j: (-int(counts[j]), str(names[j])))
    for j in order:
        rows = np.flatnonzero(inverse == j)
        size = int(counts[j])
        need = min(shards, math.ceil(size / capacity))
        # Least-loaded first; a stable argsort breaks ties by shard index.
        targets = np.argsort(load, kind="stable")[:need]
        if need == 1:
            out[rows] = targets[0]
        else:
            targets = np.sort(targets)
            part = _by_unique(data.subjects[rows], need, seed, "source-split", names[j])
            out[rows] = targets[part]
        np.add.at(load, out[rows], 1)
    return out


def assign_slices(record_ids: np.ndarray, slices: int, seed: int) -> np.ndarray:
    """Slice index (int64) per record id: a stable hash, so removing one record moves none
    of the others."""
    if slices < 1:
        raise ValueError("SISA needs at least one slice")
    return _stable_buckets(np.asarray(record_ids).tolist(), slices, seed, "slice")
