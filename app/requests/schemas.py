"""Deletion request bodies and views."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from app.integrations.schemas import CallbackOut

RequestKind = Literal["subject", "records", "source", "feature"]
TARGET_FIELD = {
    "subject": "subject_id",
    "records": "record_ids",
    "source": "source",
    "feature": "feature",
}


def _given(field: str) -> dict[str, Any]:
    return {"required": [field], "properties": {field: {"not": {"type": "null"}}}}


def _one_target_per_kind(schema: dict[str, Any]) -> None:
    """State the cross-field rules in the JSON schema: each kind carries its own target
    (and a feature request its model) and no other kind's; only a records request may
    name a dataset, only a feature request words."""
    variants = []
    for kind, field in TARGET_FIELD.items():
        needed = [field, "model"] if kind == "feature" else [field]
        others = [f for k, f in TARGET_FIELD.items() if k != kind]
        if kind != "records":
            others.append("dataset_id")  # it only narrows record ids
        if kind != "feature":
            others.append("tokens")  # words are forgotten from a model's text column
        variants.append(
            {
                "properties": {"kind": {"const": kind}},
                "allOf": [_given(f) for f in needed],
                "not": {"anyOf": [_given(f) for f in others]},
            }
        )
    schema["oneOf"] = variants


class DeletionRequestIn(BaseModel):
    model_config = ConfigDict(extra="forbid", json_schema_extra=_one_target_per_kind)
    kind: RequestKind
    subject_id: str | None = Field(default=None, min_length=1, max_length=500, pattern=r"\S")
    record_ids: list[str] | None = Field(default=None, min_length=1, max_length=100_000)
    source: str | None = Field(default=None, min_length=1, max_length=200)
    feature: str | None = Field(default=None, min_length=1, max_length=200)
    # A feature request on a text column: forget these words (whole words, any case)
    # instead of the whole column.
    tokens: list[Annotated[str, Field(min_length=1, max_length=64, pattern=r"^\w+$")]] | None = (
        Field(default=None, min_length=1, max_length=100)
    )
    model: str | None = Field(default=None, min_length=1, max_length=200)
    dataset_id: str | None = Field(default=None, max_length=64)
    reason: str | None = Field(default=None, max_length=2000)
    external_ref: str | None = Field(default=None, max_length=200)

    @model_validator(mode="after")
    def _target(self) -> DeletionRequestIn:
        need = TARGET_FIELD
        field = need[self.kind]
        if getattr(self, field) in (None, "", []):
            raise ValueError(f"a {self.kind!r} request needs {field!r}")
        others = [f for k, f in need.items() if k != self.kind and getattr(self, f) is not None]
        if others:
            raise ValueError(f"a {self.kind!r} request must not carry {others}")
        if self.kind == "feature" and not self.model:
            raise ValueError("a 'feature' request needs 'model'")
        if self.tokens is not None and self.kind != "feature":
            raise ValueError("only a 'feature' request may carry 'tokens'")
        if self.subject_id is not None and not self.subject_id.strip():
            raise ValueError("subject_id is blank")
        return self


class RequestAccepted(BaseModel):
    id: str
    status: str
    received_at: datetime
    due_at: datetime


class RequestModelOut(BaseModel):
    model: str
    status: str
    job_id: str | None
    from_version: int | None
    to_version: int | None
    method: str | None
    report_id: str | None


class DeletionRequestOut(BaseModel):
    id: str
    kind: str
    status: str
    received_at: datetime
    due_at: datetime
    completed_at: datetime | None
    models: list[RequestModelOut]
    # For admins and auditors: the records the target covers (counted when it is planned),
    # and whether the service held any data for it at all (known once planned). Hidden
    # from portals: no existence oracle.
    n_records: int | None = 0
    data_held: bool | None = None
    source: str | None = None
    feature: str | None = None
    tokens: list[str] | None = None
    model: str | None = None
    external_ref: str | None = None
    extended: bool = False
    # Open and past its deadline (the watchdog also announces it once).
    overdue: bool = False
    # The request's jobs summed, and the compute saved against full retraining.
    cost: dict[str, float | None] = {}
    error: str | None = None
    # A privacy platform's callback (Fides), when the request came with one.
    callback: CallbackOut | None = None


class RequestPage(BaseModel):
    items: list[DeletionRequestOut]
    next_cursor: str | None


class ExtendIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    reason: str = Field(min_length=3, max_length=2000)
    days: int | None = Field(default=None, ge=1, le=61)


class ReviewIn(BaseModel):
    model_config = ConfigDict(extra="forbid")
    action: Literal["approve", "reject", "mitigate"]
    note: str | None = Field(default=None, max_length=2000)
    # With `mitigate`: which mitigation the retrain applies (default `reweight`):
    # `reweight` upweights the flagged groups; `group_dro` weights every group by its
    # loss under the current model (group DRO's step, frozen); `thresholds` retrains
    # plainly and fits per-group decision thresholds (post-processing). Each candidate is
    # verified like any other before it can be promoted. With `approve`: promote the
    # verified candidate that mitigation made for this request (the admin's pick among
    # the candidates shown side by side); without it, the latest candidate. Ignored with
    # `reject` (a plain retrain).
    mitigation: Literal["reweight", "group_dro", "thresholds"] | None = None
