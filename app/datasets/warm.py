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

import hashlib
from collections.abc import Callable

import numpy as np

from app.core.warm import Expiring
from app.ml.data import TabularData


class WarmDatasets:
    """At most `capacity` datasets' rows, each dropped `ttl` seconds after its last use."""

    def __init__(self, capacity: int = 2) -> None:
        self._copies: Expiring[str, TabularData] = Expiring(capacity)
        # The same rows asked again (the test rows, job after job) are the same arrays,
        # so what is computed from them per array (one-hot codes) is found again too.
        self._takes: Expiring[tuple[str, str], TabularData] = Expiring(8)
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
        full = self._copies.get(dataset_id)
        warm = full is not None
        if full is None:
            full = load()
            if full is None:
                return None
            self._copies.put(dataset_id, full, ttl)
            self.loads += 1
        else:
            self.hits += 1
        key = (dataset_id, hashlib.sha256(ids.tobytes()).hexdigest())
        taken = self._takes.get(key) if warm else None
        if taken is not None:
            return taken, warm
        pos = np.minimum(np.searchsorted(full.record_ids, ids), max(len(full) - 1, 0))
        if len(ids) and (len(full) == 0 or not np.array_equal(full.record_ids[pos], ids)):
            self.drop(dataset_id)
            return None
        taken = full.take(pos)
        self._takes.put(key, taken, ttl)
        return taken, warm

    def drop_rows(self, dataset_id: str, record_ids: list[int] | np.ndarray) -> None:
        """Erased rows leave the warm copy (the erasure calls this before it commits)."""
        gone = np.asarray(record_ids, dtype=np.int64)
        self._copies.update(dataset_id, lambda d: d.take(~np.isin(d.record_ids, gone)))
        # A take that holds none of the erased rows is still exactly those rows: it stays
        # (the same arrays, so what was computed from them is found again); one that
        # holds an erased row goes.
        holding = {
            k
            for k, taken in self._takes.items()
            if k[0] == dataset_id and np.isin(taken.record_ids, gone).any()
        }
        self._takes.drop(where=lambda k: k in holding)

    def drop(self, dataset_id: str | None = None) -> None:
        self._copies.drop(dataset_id)
        if dataset_id is None:
            self._takes.drop()
        else:
            self._takes.drop(where=lambda k: k[0] == dataset_id)

    def held(self) -> dict[str, int]:
        """Rows held per dataset (for tests)."""
        return {k: len(v) for k, v in self._copies.items()}


WARM = WarmDatasets()
