"""Settings from `PALIMPSEST_*` environment variables; defaults give the embedded shape."""

from __future__ import annotations

from functools import lru_cache
from pathlib import Path
from typing import Literal

from pydantic import Field, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

DEV_PEPPER = "palimpsest-development-pepper-change-me"


class Settings(BaseSettings):
    """Everything configurable. Paths without a scheme are relative to the current folder."""

    model_config = SettingsConfigDict(env_prefix="PALIMPSEST_", extra="ignore")

    environment: Literal["development", "test", "production"] = "development"
    database_url: str = "sqlite:///palimpsest.sqlite"
    broker_url: str = "sqla+sqlite:///palimpsest-broker.sqlite"
    result_backend: str = "db+sqlite:///palimpsest-results.sqlite"
    artifact_root: str = "palimpsest-data/artifacts"
    device: Literal["auto", "cpu", "cuda"] = "auto"
    signing_key_file: str = "palimpsest-data/signing-key.pem"
    beat_schedule_file: str = "palimpsest-data/celerybeat-schedule"
    subject_pepper: str = DEV_PEPPER
    # Worker shape: CUDA does not survive fork, so the GPU queue runs `solo` by default.
    worker_pool: Literal["solo", "threads", "prefork"] = "solo"
    worker_concurrency: int = Field(default=1, ge=1)
    # Legal deadline (GDPR Art. 12(3)): one month, extendable once by up to two.
    deadline_days: int = Field(default=30, ge=1)
    max_extension_days: int = Field(default=61, ge=1)
    # The watchdog announces open requests this close to their deadline.
    deadline_warning_days: float = Field(default=3.0, ge=0)
    # How often the beat sends held unlearning jobs whose batching time has come.
    batch_release_interval: float = Field(default=10.0, gt=0, le=3600)
    # Verification defaults (per-model overrides live in the model config).
    utility_max_drop: float = Field(default=0.02, ge=0.0, le=1.0)
    # How long a job waits before retrying when another job holds the model's lock.
    lock_retry_seconds: float = Field(default=2.0, gt=0)
    # Crash safety. A running job's worker refreshes its heartbeat this often; a job whose
    # heartbeat is older than the lease belonged to a dead worker and is handed out again
    # by the resume sweep. A job waiting for its fanned-out shards is only refreshed while
    # a shard runs (they may queue behind other work), so it gets the longer shard lease.
    job_heartbeat_seconds: float = Field(default=10.0, gt=0)
    job_lease_seconds: float = Field(default=60.0, gt=0)
    job_shard_lease_seconds: float = Field(default=3600.0, gt=0)
    # The beat's resume sweep: how often it runs, and how old pending work must be before
    # it is re-sent (younger work still has its own message on the way).
    resume_interval_seconds: float = Field(default=60.0, gt=0)
    resume_after_seconds: float = Field(default=120.0, ge=0)
    # Redis only: an unacknowledged message is delivered again after this long. Recovery
    # does not rely on it (see workers/celery_app.py), so it is long.
    broker_visibility_timeout: int = Field(default=6 * 3600, gt=0)
    # Test hook, never set in production: an unlearning job sleeps this long after each
    # progress write, so that tests can crash a worker in the middle of one.
    test_slow_unlearning_seconds: float = Field(default=0.0, ge=0)
    torch_threads: int = Field(default=0, ge=0)  # 0 = torch's default
    # Uploads (`POST /v1/datasets`) stream to the artifact store and are refused (413)
    # once they pass the maximum. Files up to the inline size are ingested inside the
    # request (201, as before); larger ones by a worker job (202, `status: ingesting`).
    max_upload_bytes: int = Field(default=512 * 2**20, gt=0)
    inline_ingest_bytes: int = Field(default=4 * 2**20, ge=0)
    log_format: Literal["json", "text"] = "json"
    log_level: str = "INFO"

    @model_validator(mode="after")
    def _refuse_default_secrets(self) -> Settings:
        if self.environment == "production" and self.subject_pepper == DEV_PEPPER:
            raise ValueError("PALIMPSEST_SUBJECT_PEPPER must be set in production")
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    def ensure_local_dirs(self) -> None:
        """Create parent folders of local SQLite files, artifacts and the signing key."""
        for url in (self.database_url, self.broker_url, self.result_backend):
            if "sqlite:///" in url:
                path = url.split("sqlite:///", 1)[1]
                if path and path != ":memory:":
                    Path(path).parent.mkdir(parents=True, exist_ok=True)
        if "://" not in self.artifact_root:
            Path(self.artifact_root).mkdir(parents=True, exist_ok=True)
        Path(self.signing_key_file).parent.mkdir(parents=True, exist_ok=True)
        Path(self.beat_schedule_file).parent.mkdir(parents=True, exist_ok=True)


@lru_cache
def get_settings() -> Settings:
    return Settings()
