"""Turning an uploaded file plus spec into a validated, typed Arrow table."""

from __future__ import annotations

import io
from dataclasses import dataclass, field

import pyarrow as pa
import pyarrow.csv as pacsv
import pyarrow.parquet as pq

from app.core.errors import Unprocessable
from app.datasets.schemas import DatasetSpec

MAX_ROWS = 5_000_000
MAX_LABEL_CLASSES = 100


@dataclass
class ParsedDataset:
    table: pa.Table
    feature_columns: list[str]
    categorical_columns: list[str]
    numeric_columns: list[str]
    group_columns: list[str]
    label_classes: list[str]
    external_ids: list[str]
    subjects: list[str]
    sources: list[str]
    media_columns: dict[str, str] = field(default_factory=dict)


def read_table(data: bytes, filename: str) -> pa.Table:
    if not data:
        raise Unprocessable("the uploaded file is empty", code="invalid_file")
    is_parquet = data[:4] == b"PAR1" or filename.lower().endswith(".parquet")
    try:
        if is_parquet:
            return pq.read_table(io.BytesIO(data))
        return pacsv.read_csv(io.BytesIO(data))
    except (pa.ArrowInvalid, pa.ArrowNotImplementedError, OSError, UnicodeDecodeError) as exc:
        kind = "Parquet" if is_parquet else "CSV"
        first = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        raise Unprocessable(
            f"could not read the file as {kind}: {first}", code="invalid_file"
        ) from exc


def _strings(col: pa.ChunkedArray) -> list[str]:
    return [str(v) for v in col.cast(pa.string()).to_pylist()]


@dataclass
class Columns:
    """What the spec and the file's schema make of its columns."""

    features: list[str]
    categorical: list[str]
    numeric: list[str]
    groups: list[str]
    media: dict[str, str] = field(default_factory=dict)  # text/image/audio feature -> kind


def spec_media(spec: DatasetSpec) -> dict[str, str]:
    out: dict[str, str] = {}
    for kind, cols in (
        ("text", spec.text_columns),
        ("image", spec.image_columns),
        ("audio", spec.audio_columns),
    ):
        out.update({c: kind for c in cols or []})
    return out


def media_schema(
    features: list[str], numeric: list[str], media: dict[str, str]
) -> dict[str, object]:
    """The dataset schema's media part: `media_columns` (column -> text|image|audio) and
    `column_kinds` (every feature's kind)."""
    kinds = {f: media.get(f) or ("numeric" if f in numeric else "categorical") for f in features}
    return {"media_columns": dict(media), "column_kinds": kinds}


def plan_columns(schema: pa.Schema, spec: DatasetSpec) -> Columns:
    """Check the spec against the file's columns and decide each feature's kind."""
    cols = schema.names
    if len(set(cols)) != len(cols):
        raise Unprocessable("the file has duplicate column names", code="invalid_file")

    def need(name: str, what: str) -> None:
        if name not in cols:
            raise Unprocessable(f"{what} {name!r} is not a column of the file", code="invalid_spec")

    need(spec.subject_column, "subject_column")
    need(spec.label_column, "label_column")
    if spec.source_column:
        need(spec.source_column, "source_column")
    if spec.record_id_column:
        need(spec.record_id_column, "record_id_column")
    reserved = {spec.subject_column, spec.label_column, spec.source_column, spec.record_id_column}
    reserved.discard(None)
    for name in spec.feature_columns or []:
        need(name, "feature column")
        if name in reserved:
            raise Unprocessable(
                f"{name!r} cannot be a feature and an id/label column", code="invalid_spec"
            )
    for name in (spec.categorical_columns or []) + (spec.group_columns or []):
        need(name, "column")
    declared_media = spec_media(spec)
    for name in declared_media:
        need(name, "media column")
        if name in reserved:
            raise Unprocessable(
                f"{name!r} cannot be a media feature and an id/label column", code="invalid_spec"
            )
    features = spec.feature_columns or [c for c in cols if c not in reserved]
    if not features:
        raise Unprocessable("no feature columns", code="invalid_spec")
    if len(set(features)) != len(features):
        raise Unprocessable("feature_columns has duplicates", code="invalid_spec")
    declared = set(spec.categorical_columns or [])
    categorical: list[str] = []
    numeric: list[str] = []
    media: dict[str, str] = {}
    for name in features:
        t = schema.field(name).type
        if name in declared_media:
            media[name] = declared_media[name]
        elif (
            name in declared
            or pa.types.is_string(t)
            or pa.types.is_large_string(t)
            or pa.types.is_boolean(t)
        ):
            categorical.append(name)
        elif pa.types.is_integer(t) or pa.types.is_floating(t) or pa.types.is_null(t):
            numeric.append(name)
        else:
            raise Unprocessable(f"column {name!r} has unsupported type {t}", code="invalid_file")
    unused = [c for c in declared_media if c not in media]
    if unused:
        raise Unprocessable(
            f"media columns {unused} are not among the feature columns", code="invalid_spec"
        )
    return Columns(features, categorical, numeric, list(spec.group_columns or []), media)


def cast_columns(table: pa.Table, columns: Columns) -> pa.Table:
    """Categorical features and group columns as strings, numeric features as floats."""
    for name in columns.categorical + columns.groups:
        if name in columns.numeric:
            continue
        table = table.set_column(
            table.column_names.index(name), name, table.column(name).cast(pa.string())
        )
    for name in columns.numeric:
        table = table.set_column(
            table.column_names.index(name), name, table.column(name).cast(pa.float64())
        )
    return table


def validate(table: pa.Table, spec: DatasetSpec) -> ParsedDataset:
    if table.num_rows == 0:
        raise Unprocessable("the file has no rows", code="invalid_file")
    if table.num_rows > MAX_ROWS:
        raise Unprocessable(f"at most {MAX_ROWS} rows per dataset", code="invalid_file")
    columns = plan_columns(table.schema, spec)
    for required in (spec.subject_column, spec.label_column):
        if table.column(required).null_count:
            raise Unprocessable(f"column {required!r} has empty values", code="invalid_file")
    table = cast_columns(table, columns)
    features, categorical, numeric, groups = (
        columns.features,
        columns.categorical,
        columns.numeric,
        columns.groups,
    )

    labels = _strings(table.column(spec.label_column))
    classes = sorted(set(labels))
    if len(classes) < 2:
        raise Unprocessable(
            "the label column needs at least two distinct values", code="invalid_file"
        )
    if len(classes) > MAX_LABEL_CLASSES:
        raise Unprocessable(f"at most {MAX_LABEL_CLASSES} label classes", code="invalid_file")
    table = table.set_column(
        table.column_names.index(spec.label_column), spec.label_column, pa.array(labels)
    )

    subjects = [s.strip() for s in _strings(table.column(spec.subject_column))]
    if any(not s for s in subjects):
        raise Unprocessable(
            f"column {spec.subject_column!r} has blank subject ids", code="invalid_file"
        )
    if spec.source_column:
        src_col = table.column(spec.source_column)
        if src_col.null_count:
            raise Unprocessable(
                f"column {spec.source_column!r} has empty values", code="invalid_file"
            )
        sources = _strings(src_col)
    else:
        sources = [spec.name] * table.num_rows
    if spec.record_id_column:
        id_col = table.column(spec.record_id_column)
        if id_col.null_count:
            raise Unprocessable(
                f"column {spec.record_id_column!r} has empty values", code="invalid_file"
            )
        external_ids = _strings(id_col)
        if len(set(external_ids)) != len(external_ids):
            raise Unprocessable(
                f"column {spec.record_id_column!r} has duplicate ids", code="invalid_file"
            )
    else:
        external_ids = [str(i) for i in range(table.num_rows)]
    if any(len(x) > 200 for x in external_ids) or any(len(x) > 200 for x in sources):
        raise Unprocessable(
            "record ids and source names are at most 200 characters", code="invalid_file"
        )
    return ParsedDataset(
        table,
        features,
        categorical,
        numeric,
        groups,
        classes,
        external_ids,
        subjects,
        sources,
        columns.media,
    )
