"""Reading a staged upload in bounded batches: the same checks as `parsing.validate`,
made one batch at a time, so that no more than a batch of the file is held as Arrow
(and never as Python rows) while a large upload is checked and written."""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any, Literal

import pyarrow as pa
import pyarrow.compute as pc
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from app.core.errors import Unprocessable
from app.datasets.parsing import (
    MAX_LABEL_CLASSES,
    MAX_ROWS,
    Columns,
    cast_columns,
    plan_columns,
)
from app.datasets.schemas import DatasetSpec

# A CSV block (types are inferred from the first one, as `read_csv` does with the same
# default size) and a Parquet batch: about this much of the file is in memory at a time,
# with a Python object or two per row of it while it is written.
CSV_BLOCK_BYTES = 1 * 2**20
PARQUET_BATCH_ROWS = 32_768
MAX_ID_CHARS = 200
_ARROW_ERRORS = (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, UnicodeDecodeError)


class StagedFile:
    """A staged upload opened for batches: its schema, then its rows in batches, each a
    table; `fraction` is how much of the file has been read."""

    def __init__(self, fh: Any, filename: str, size: int) -> None:
        self.fh = fh
        self.size = max(size, 1)
        head = fh.read(4)
        fh.seek(0)
        if not head:
            raise Unprocessable("the uploaded file is empty", code="invalid_file")
        self.is_parquet = head == b"PAR1" or filename.lower().endswith(".parquet")
        self.kind = "Parquet" if self.is_parquet else "CSV"
        self._rows_read = 0
        with self._errors():
            if self.is_parquet:
                self._parquet = pq.ParquetFile(fh)
                self.schema: pa.Schema = self._parquet.schema_arrow
                self._rows = max(int(self._parquet.metadata.num_rows), 1)
            else:
                self._csv = pacsv.open_csv(
                    fh, read_options=pacsv.ReadOptions(block_size=CSV_BLOCK_BYTES)
                )
                self.schema = self._csv.schema

    def _errors(self) -> Any:
        return _ReadErrors(self.kind)

    def fraction(self) -> float:
        if self.is_parquet:
            return min(self._rows_read / self._rows, 1.0)
        return min(float(self.fh.tell()) / self.size, 1.0)

    def batches(self) -> Iterator[pa.Table]:
        with self._errors():
            source = (
                self._parquet.iter_batches(batch_size=PARQUET_BATCH_ROWS)
                if self.is_parquet
                else self._csv
            )
            for batch in source:
                self._rows_read += batch.num_rows
                if batch.num_rows:
                    yield pa.Table.from_batches([batch])


class _ReadErrors:
    """Arrow's complaints about the bytes become the 422 `parsing.read_table` gives."""

    def __init__(self, kind: str) -> None:
        self.kind = kind

    def __enter__(self) -> None:
        return None

    def __exit__(self, t: Any, exc: BaseException | None, tb: Any) -> Literal[False]:
        if exc is not None and isinstance(exc, _ARROW_ERRORS):
            first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
            raise Unprocessable(
                f"could not read the file as {self.kind}: {first}", code="invalid_file"
            ) from exc
        return False


@dataclass
class Scan:
    """What a first pass over the file established."""

    columns: Columns
    label_classes: list[str]
    n_rows: int


def _as_strings(col: pa.ChunkedArray) -> pa.ChunkedArray:
    return col.cast(pa.string())


def _longest(col: pa.ChunkedArray) -> int:
    return int(pc.max(pc.utf8_length(col)).as_py() or 0)


def scan(upload: StagedFile, spec: DatasetSpec, progress: Callable[[float], None]) -> Scan:
    """Read the whole file once and refuse it (Unprocessable, the messages of
    `parsing.validate`) before anything is written."""
    columns = plan_columns(upload.schema, spec)
    classes: set[str] = set()
    ids: list[pa.ChunkedArray] = []
    n_rows = 0
    for batch in upload.batches():
        n_rows += batch.num_rows
        if n_rows > MAX_ROWS:
            raise Unprocessable(f"at most {MAX_ROWS} rows per dataset", code="invalid_file")
        for required in (spec.subject_column, spec.label_column):
            if batch.column(required).null_count:
                raise Unprocessable(f"column {required!r} has empty values", code="invalid_file")
        with upload._errors():
            cast_columns(batch, columns)
        classes.update(
            str(v) for v in pc.unique(_as_strings(batch.column(spec.label_column))).to_pylist()
        )
        if len(classes) > MAX_LABEL_CLASSES:
            raise Unprocessable(f"at most {MAX_LABEL_CLASSES} label classes", code="invalid_file")
        subjects = pc.utf8_trim_whitespace(_as_strings(batch.column(spec.subject_column)))
        if pc.any(pc.equal(pc.utf8_length(subjects), 0)).as_py():
            raise Unprocessable(
                f"column {spec.subject_column!r} has blank subject ids", code="invalid_file"
            )
        for name in (spec.source_column, spec.record_id_column):
            if not name:
                continue
            col = batch.column(name)
            if col.null_count:
                raise Unprocessable(f"column {name!r} has empty values", code="invalid_file")
            if _longest(_as_strings(col)) > MAX_ID_CHARS:
                raise Unprocessable(
                    "record ids and source names are at most 200 characters",
                    code="invalid_file",
                )
        if spec.record_id_column:
            ids.append(_as_strings(batch.column(spec.record_id_column)))
        progress(upload.fraction())
    if n_rows == 0:
        raise Unprocessable("the file has no rows", code="invalid_file")
    if len(classes) < 2:
        raise Unprocessable(
            "the label column needs at least two distinct values", code="invalid_file"
        )
    if ids:
        # Arrow strings: about the ids' own bytes, not a Python object per id.
        every = pa.chunked_array([c for a in ids for c in a.chunks], pa.string())
        if pc.count_distinct(every).as_py() != len(every):
            raise Unprocessable(
                f"column {spec.record_id_column!r} has duplicate ids", code="invalid_file"
            )
    return Scan(columns, sorted(classes), n_rows)


@dataclass
class Rows:
    """One batch, ready to store: the kept columns typed, and per row the stripped
    subject id, the source and the record's external id."""

    table: pa.Table
    subjects: list[str]
    sources: list[str]
    external_ids: list[str]


def kept_columns(columns: Columns, spec: DatasetSpec) -> list[str]:
    keep = columns.features + [c for c in columns.groups if c not in columns.features]
    return [*keep, spec.label_column]


def prepare(batch: pa.Table, found: Scan, spec: DatasetSpec, offset: int) -> Rows:
    """A batch of a file that `scan` accepted; `offset` is its first row's number."""
    table = cast_columns(batch, found.columns)
    label = _as_strings(table.column(spec.label_column))
    table = table.set_column(table.column_names.index(spec.label_column), spec.label_column, label)
    subjects = pc.utf8_trim_whitespace(_as_strings(table.column(spec.subject_column)))
    n = table.num_rows
    sources = (
        _as_strings(table.column(spec.source_column)).to_pylist()
        if spec.source_column
        else [spec.name] * n
    )
    external = (
        _as_strings(table.column(spec.record_id_column)).to_pylist()
        if spec.record_id_column
        else [str(i) for i in range(offset, offset + n)]
    )
    return Rows(
        table.select(kept_columns(found.columns, spec)),
        subjects.to_pylist(),
        sources,
        external,
    )
