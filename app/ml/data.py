"""The tabular batch the engine works on: ids, raw feature columns, labels, owners."""

from __future__ import annotations

from dataclasses import dataclass, field

import numpy as np


@dataclass
class TabularData:
    """N records. `record_ids` define data order (everything sorts on them) and are unique.

    `columns` hold raw feature values (float64 for numeric, object/str for categorical);
    `labels` are class indices; `subjects` (subject keys) and `sources` drive sharding.
    """

    record_ids: np.ndarray  # int64 (N,)
    columns: dict[str, np.ndarray]
    labels: np.ndarray  # int64 (N,)
    subjects: np.ndarray = field(default_factory=lambda: np.array([], dtype=object))
    sources: np.ndarray = field(default_factory=lambda: np.array([], dtype=object))

    def __post_init__(self) -> None:
        n = len(self.record_ids)
        if len(self.subjects) == 0:
            self.subjects = np.array([""] * n, dtype=object)
        if len(self.sources) == 0:
            self.sources = np.array([""] * n, dtype=object)
        for name, col in self.columns.items():
            if len(col) != n:
                raise ValueError(f"column {name!r} has {len(col)} rows, expected {n}")
        if len(self.labels) != n or len(self.subjects) != n or len(self.sources) != n:
            raise ValueError("labels, subjects and sources must have one entry per record")

    def __len__(self) -> int:
        return len(self.record_ids)

    def take(self, index: np.ndarray) -> TabularData:
        """Rows at `index` (integer positions or a boolean mask), in that order."""
        return TabularData(
            record_ids=self.record_ids[index],
            columns={k: v[index] for k, v in self.columns.items()},
            labels=self.labels[index],
            subjects=self.subjects[index],
            sources=self.sources[index],
        )

    def sorted_by_id(self) -> TabularData:
        return self.take(np.argsort(self.record_ids, kind="stable"))

    def without(self, record_ids: np.ndarray) -> TabularData:
        """These records minus `record_ids`."""
        return self.take(~np.isin(self.record_ids, record_ids))
