"""What a worker keeps in memory between jobs: a small map whose entries are dropped
when unused for a while, by a timer (so an idle process lets go too), and the least
recently used first when it is full. The warm datasets, models and lineage layouts of
`app.datasets.warm`, `app.pipeline.outputs` and `app.pipeline.inputs` are built on it.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Hashable
from typing import Generic, TypeVar

K = TypeVar("K", bound=Hashable)
V = TypeVar("V")


class Expiring(Generic[K, V]):
    """At most `capacity` entries, each dropped `ttl` seconds after its last use."""

    def __init__(self, capacity: int) -> None:
        self.capacity = capacity
        self._entries: dict[K, tuple[V, float]] = {}
        self._lock = threading.RLock()
        self._timer: threading.Timer | None = None

    def get(self, key: K) -> V | None:
        with self._lock:
            hit = self._entries.get(key)
            if hit is None:
                return None
            self._entries[key] = (hit[0], time.monotonic())
            return hit[0]

    def put(self, key: K, value: V, ttl: float) -> None:
        if ttl <= 0:
            return
        with self._lock:
            self._entries[key] = (value, time.monotonic())
            while len(self._entries) > self.capacity:
                oldest = min(self._entries, key=lambda k: self._entries[k][1])
                del self._entries[oldest]
            self._arm(ttl)

    def update(self, key: K, change: Callable[[V], V]) -> None:
        """Replace an entry's value by `change(value)` (nothing when it is not held)."""
        with self._lock:
            hit = self._entries.get(key)
            if hit is not None:
                self._entries[key] = (change(hit[0]), hit[1])

    def drop(self, key: K | None = None, where: Callable[[K], bool] | None = None) -> None:
        """Drop `key`, every key for which `where` is true, or (neither given) all."""
        with self._lock:
            if key is not None:
                self._entries.pop(key, None)
            elif where is not None:
                for k in [k for k in self._entries if where(k)]:
                    del self._entries[k]
            else:
                self._entries.clear()

    def items(self) -> list[tuple[K, V]]:
        with self._lock:
            return [(k, v) for k, (v, _) in self._entries.items()]

    def __len__(self) -> int:
        return len(self._entries)

    def expire(self, ttl: float) -> None:
        """Drop every entry unused for `ttl` seconds; re-arm while some remain."""
        now = time.monotonic()
        with self._lock:
            for k in [k for k, (_, used) in self._entries.items() if now - used >= ttl]:
                del self._entries[k]
            self._timer = None
            if self._entries:
                self._arm(ttl)

    def _arm(self, ttl: float) -> None:
        # With the lock held: one timer at a time, due when the least recently used entry
        # is (`expire` re-arms it for the rest).
        if self._timer is not None:
            return
        due = min(used for _, used in self._entries.values()) + ttl - time.monotonic()
        self._timer = threading.Timer(max(due, 0.0) + 0.01, self.expire, args=(ttl,))
        self._timer.daemon = True
        self._timer.start()
