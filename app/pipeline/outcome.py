"""What the pipeline tells the request side, and nothing more.

The pipeline never changes a request's status: it reports where a job stands (started,
verifying, concluded, failed) through `RequestEvents`, and `app.requests.lifecycle`
(the implementation the worker passes in) applies it to the requests, in the same
transaction as the job's own writes.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Literal, Protocol

from sqlalchemy.orm import Session

Decision = Literal["promote", "needs_review", "retrain", "nothing_to_forget"]


@dataclass(frozen=True)
class Outcome:
    """A concluded job: the decision on its candidate and where its requests go next."""

    job_id: str
    model_id: str
    request_ids: list[str]
    decision: Decision
    version: int  # the candidate (or, with nothing to forget, the version that stands)
    method: str
    report_id: str | None = None
    retrain_job_id: str | None = None  # the fallback retraining job, for `retrain`


class RequestEvents(Protocol):
    def started(self, session: Session, job_id: str, stage: str, from_version: int) -> None:
        """The job began `stage` (`unlearning` | `retraining`) from `from_version`."""

    def verifying(self, session: Session, job_id: str) -> None:
        """The job's candidate exists and its checks run."""

    def concluded(self, session: Session, outcome: Outcome) -> None:
        """The job concluded with `outcome`."""

    def failed(self, session: Session, job_id: str, error: str) -> None:
        """The job failed for good (after its retries)."""
