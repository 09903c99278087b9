"""Dataset ingest spec and responses."""

from __future__ import annotations

from pydantic import BaseModel, ConfigDict, Field, model_validator


class DatasetSpec(BaseModel):
    """The JSON `spec` part of `POST /v1/datasets`."""

    model_config = ConfigDict(extra="forbid")

    name: str = Field(min_length=1, max_length=200, pattern=r"^[A-Za-z0-9][A-Za-z0-9_.\-]*$")
    subject_column: str = Field(min_length=1)
    label_column: str = Field(min_length=1)
    source_column: str | None = None
    feature_columns: list[str] | None = None
    categorical_columns: list[str] | None = None
    group_columns: list[str] | None = None
    # Media columns (app.datasets.archive): text as strings; image (PNG, JPEG) and audio
    # (PCM WAV) as file names inside a zip archive or as bytes in binary Parquet columns.
    text_columns: list[str] | None = None
    image_columns: list[str] | None = None
    audio_columns: list[str] | None = None
    # Additions beyond the contract: a column of stable record ids (used by `records`
    # deletion requests; row numbers otherwise) and the number of storage partitions.
    record_id_column: str | None = None
    partitions: int = Field(default=16, ge=1, le=256)

    @model_validator(mode="after")
    def _distinct_roles(self) -> DatasetSpec:
        # Label classes, source names, group values and record ids are stored and served
        # as they are; only the subject column is pseudonymised. A column in two roles
        # would store raw subject ids (or serve them back as label classes).
        roles: list[tuple[str, str]] = [
            ("subject_column", self.subject_column),
            ("label_column", self.label_column),
        ]
        if self.source_column is not None:
            roles.append(("source_column", self.source_column))
        if self.record_id_column is not None:
            roles.append(("record_id_column", self.record_id_column))
        roles += [("group_columns", g) for g in self.group_columns or []]
        seen: dict[str, str] = {}
        for role, column in roles:
            if column in seen:
                raise ValueError(
                    f"column {column!r} cannot be both {seen[column]} and {role}: "
                    "the subject, label, source, record id and group roles need distinct columns"
                )
            seen[column] = role
        return self


class DatasetOut(BaseModel):
    id: str
    name: str
    # ready; ingesting (a worker job parses a large upload: `job_id`); failed (`error`).
    # Until ready, the counts are 0 and the column lists empty.
    status: str = "ready"
    job_id: str | None = None
    error: str | None = None
    n_records: int
    n_subjects: int
    sources: list[str]
    feature_columns: list[str]
    group_columns: list[str]
    categorical_columns: list[str] = []
    # Every feature column's kind: numeric, categorical, text, image or audio.
    column_kinds: dict[str, str] = {}
    label_column: str = ""
    label_classes: list[str] = []
    created_at: str = ""


class DatasetAccepted(BaseModel):
    """The 202 answer to an upload larger than the inline size: a worker job ingests it;
    `GET /v1/datasets/{id}` shows its status, and the full body once ready."""

    id: str
    name: str
    status: str
    job_id: str
