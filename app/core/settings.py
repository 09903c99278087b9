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
    torch_threads: int = Field(default=0, ge=0)  # 0 = torch's default
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
