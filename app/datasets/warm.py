"""A worker's warm copy of the datasets its recent jobs read: each dataset's stored rows,
converted once (`TabularData`, sorted by record id), kept in this process for the jobs
that follow, so that a stream of one-subject erasures does not read and convert the
same Parquet for every job.

Stored rows never change: a dataset is written once at ingest and only loses rows when
they are erased. So a warm copy is right for every record that still exists, and what
it must not do is outlive an erasure:

* the erasure that rewrites a dataset's partitions (`erase_from_partitions`) drops the
  same rows from this process's copy before the rewrite commits;
* a copy that another process holds is dropped when it has not been used for
  `warm_data_seconds` (a timer, not the next job, so an idle worker lets go too), and a
  job never takes rows from it that the database no longer lists;
* `warm_data_seconds = 0` turns the copy off, and datasets above `warm_data_max_rows`
  are never kept (their jobs read only the rows they need, as before).
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

import numpy as np

from app.ml.data import TabularData


@dataclass
class _Entry:
    data: TabularData
    used: float


class WarmDatasets:
    """At most `capacity` datasets, each dropped `ttl` seconds after its last use."""

    def __init__(self, capacity: int = 2) -> None:
        self.capacity = capacity
        self._entries: dict[str, _Entry] = {}
        self._lock = threading.Lock()
        self._timer: threading.Timer | None = None
        self.loads = 0
        self.hits = 0

    def rows(
        self,
        dataset_id: str,
        record_ids: np.ndarray,
        load: Callable[[], TabularData | None],
        *,
        ttl: float,
    ) -> tuple[TabularData, bool] | None:
        """The rows of `record_ids` (sorted by id) and whether the copy was already warm;
        None when no copy is kept (`load` declined: too large) or a row is missing from
        it (the copy is dropped and the caller reads storage)."""
        ids = np.asarray(record_ids, dtype=np.int64)
        with self._lock:
            entry = self._entries.get(dataset_id)
            warm = entry is not None
            if entry is None:
                data = load()
                if data is None:
                    return None
                entry = _Entry(data, time.monotonic())
                self._entries[dataset_id] = entry
                self.loads += 1
                while len(self._entries) > self.capacity:
                    oldest = min(self._entries, key=lambda k: self._entries[k].used)
                    del self._entries[oldest]
            else:
                self.hits += 1
            entry.used = time.monotonic()
            full = entry.data
            self._arm(ttl)
        pos = np.searchsorted(full.record_ids, ids)
        pos = np.minimum(pos, max(len(full) - 1, 0))
        if len(ids) and (len(full) == 0 or not np.array_equal(full.record_ids[pos], ids)):
            self.drop(dataset_id)
            return None
        return full.take(pos), warm

    def drop_rows(self, dataset_id: str, record_ids: list[int] | np.ndarray) -> None:
        """Erased rows leave the warm copy (the erasure calls this before it commits)."""
        with self._lock:
            entry = self._entries.get(dataset_id)
            if entry is None:
                return
            keep = ~np.isin(entry.data.record_ids, np.asarray(record_ids, dtype=np.int64))
            entry.data = entry.data.take(keep)

    def drop(self, dataset_id: str | None = None) -> None:
        with self._lock:
            if dataset_id is None:
                self._entries.clear()
            else:
                self._entries.pop(dataset_id, None)

    def held(self) -> dict[str, int]:
        """Rows held per dataset (for tests and the metrics)."""
        with self._lock:
            return {k: len(v.data) for k, v in self._entries.items()}

    def expire(self, ttl: float) -> None:
        """Drop every copy unused for `ttl` seconds."""
        now = time.monotonic()
        with self._lock:
            for k in [k for k, v in self._entries.items() if now - v.used >= ttl]:
                del self._entries[k]
            self._timer = None
            if self._entries:
                self._arm(ttl)

    def _arm(self, ttl: float) -> None:
        # Called with the lock held: one timer at a time, firing when the least recently
        # used copy is due (it re-arms itself while copies remain).
        if self._timer is not None:
            return
        due = min(v.used for v in self._entries.values()) + ttl - time.monotonic()
        self._timer = threading.Timer(max(due, 0.0) + 0.01, self.expire, args=(ttl,))
        self._timer.daemon = True
        self._timer.start()


WARM = WarmDatasets()
