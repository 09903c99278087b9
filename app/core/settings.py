"""Settings from `PALIMPSEST_*` environment variables; defaults give the embedded shape."""

from __future__ import annotations

import os
from functools import lru_cache
from ipaddress import IPv4Network, IPv6Network
from pathlib import Path
from typing import Any, Literal

from pydantic import Field, PrivateAttr, field_validator, model_validator
from pydantic_settings import BaseSettings, SettingsConfigDict

from app.core.instance_secrets import LEGACY_DEV_PEPPER, InstanceSecrets, load_or_create

# Kept for old installs only (see app.core.instance_secrets); never a default any more.
DEV_PEPPER = LEGACY_DEV_PEPPER


def _usable_cores() -> int:
    """Cores this process may run on (a container's CPU set), where the OS tells."""
    if hasattr(os, "sched_getaffinity"):
        return len(os.sched_getaffinity(0))
    return os.cpu_count() or 1


class Settings(BaseSettings):
    """Everything configurable. Paths without a scheme are relative to the current folder."""

    model_config = SettingsConfigDict(env_prefix="PALIMPSEST_", extra="ignore")

    # Unset: production when the database is not SQLite (a server database means a
    # deployment of several hosts, which cannot share a generated secrets file).
    environment: Literal["development", "test", "production"] | None = None
    database_url: str = "sqlite:///palimpsest.sqlite"
    broker_url: str = "sqla+sqlite:///palimpsest-broker.sqlite"
    result_backend: str = "db+sqlite:///palimpsest-results.sqlite"
    artifact_root: str = "palimpsest-data/artifacts"
    # fsspec options for the artifact root's filesystem, as JSON: for S3 (s3fs) e.g.
    # {"endpoint_url": "https://minio.internal:9000"}. Credentials come from the usual
    # AWS variables (AWS_ACCESS_KEY_ID, AWS_SECRET_ACCESS_KEY) or the instance's role.
    artifact_options: dict[str, Any] = Field(default_factory=dict)
    device: Literal["auto", "cpu", "cuda"] = "auto"
    signing_key_file: str = "palimpsest-data/signing-key.pem"
    beat_schedule_file: str = "palimpsest-data/celerybeat-schedule"
    # The HMAC key of subject ids and the dashboard's cookie key. Unset outside
    # production: random values made on first use in `secrets_file` (default: beside
    # the signing key, `instance-secrets.json`). Production refuses to start without.
    subject_pepper: str | None = None
    dashboard_session_secret: str | None = None
    secrets_file: str | None = None
    # How long a statement waits for the database (SQLite's busy timeout, a pooled
    # connection's checkout) before the request answers 503 `busy`.
    database_busy_timeout_seconds: float = Field(default=30.0, gt=0, le=600)
    # `palimpsest api` processes (uvicorn workers): one per core the process may use.
    api_workers: int = Field(default_factory=_usable_cores, ge=1)
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
    # A job writes its progress at most this often (its own short transactions).
    progress_interval_seconds: float = Field(default=0.5, ge=0)
    # A worker keeps the converted rows of the datasets its recent jobs read (at most two,
    # each up to `warm_data_max_rows`), dropping a copy unused for this long; an erasure
    # drops its rows from the copy at once (app.datasets.warm). 0: never kept.
    warm_data_seconds: float = Field(default=120.0, ge=0)
    warm_data_max_rows: int = Field(default=500_000, ge=0)
    # CIDRs (comma-separated) that webhook targets may resolve to although they are
    # loopback, private, link-local ... (app.webhooks.targets); empty: none.
    webhook_allowed_networks: str = ""
    # Uploads (`POST /v1/datasets`) stream to the artifact store and are refused (413)
    # once they pass the maximum. Files up to the inline size are ingested inside the
    # request (201, as before); larger ones by a worker job (202, `status: ingesting`).
    max_upload_bytes: int = Field(default=512 * 2**20, gt=0)
    inline_ingest_bytes: int = Field(default=4 * 2**20, ge=0)
    # Media datasets (zip archives, binary Parquet columns; app.datasets.archive): what an
    # archive may hold before it is refused (422 naming the file), and what a file may be.
    media_max_entries: int = Field(default=200_000, gt=0)
    media_max_uncompressed_bytes: int = Field(default=2 * 2**30, gt=0)
    media_max_compression_ratio: float = Field(default=200.0, gt=1)
    media_max_file_bytes: int = Field(default=16 * 2**20, gt=0)
    media_max_image_pixels: int = Field(default=4096 * 4096, gt=0)
    media_max_audio_seconds: float = Field(default=60.0, gt=0)
    # Issue 14 integrations: the MLflow registry mirror (app.integrations.mlflow_mirror;
    # empty: off) and OpenLineage run events (app.integrations.openlineage: "" off,
    # "console" logs them, "http" posts them to openlineage_url).
    mlflow_tracking_uri: str = ""
    openlineage_transport: Literal["", "console", "http"] = ""
    openlineage_url: str = ""
    openlineage_namespace: str = "palimpsest"
    log_format: Literal["json", "text"] = "json"
    log_level: str = "INFO"

    _instance: InstanceSecrets | None = PrivateAttr(default=None)

    @field_validator("webhook_allowed_networks")
    @classmethod
    def _cidrs(cls, v: str) -> str:
        from app.core.networks import parse_networks

        parse_networks(v)  # a bad CIDR refuses to start, rather than being ignored
        return v

    @property
    def webhook_networks(self) -> tuple[IPv4Network | IPv6Network, ...]:
        from app.core.networks import parse_networks

        return parse_networks(self.webhook_allowed_networks)

    @model_validator(mode="after")
    def _refuse_default_secrets(self) -> Settings:
        if not self.is_production:
            return self
        missing = [
            name
            for name, value in (
                ("PALIMPSEST_SUBJECT_PEPPER", self.subject_pepper),
                ("PALIMPSEST_DASHBOARD_SESSION_SECRET", self.dashboard_session_secret),
            )
            if not value or value == DEV_PEPPER
        ]
        if missing:
            raise ValueError(
                f"production needs {' and '.join(missing)} set to long random secrets "
                "(production: PALIMPSEST_ENVIRONMENT=production, or a database other than "
                "SQLite without PALIMPSEST_ENVIRONMENT)"
            )
        return self

    @property
    def is_sqlite(self) -> bool:
        return self.database_url.startswith("sqlite")

    @property
    def is_production(self) -> bool:
        if self.environment is not None:
            return self.environment == "production"
        return not self.is_sqlite

    @property
    def secrets_path(self) -> Path:
        if self.secrets_file:
            return Path(self.secrets_file)
        return Path(self.signing_key_file).parent / "instance-secrets.json"

    def _instance_secrets(self) -> InstanceSecrets:
        if self._instance is None:
            self._instance = load_or_create(self.secrets_path, self.database_url)
        return self._instance

    @property
    def pepper(self) -> str:
        """The subject pepper in force: configured, or this install's own."""
        return self.subject_pepper or self._instance_secrets().subject_pepper

    @property
    def session_secret(self) -> str:
        """The dashboard session secret in force: configured, or this install's own."""
        return self.dashboard_session_secret or self._instance_secrets().dashboard_session_secret

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
