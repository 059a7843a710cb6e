"""Server settings: environment variables with the SCRIBEFARM_ prefix (DATABASE_URL too).

Every setting is documented in docs/configuration.md; keep the two in step.
"""

from __future__ import annotations

import os
import secrets
from functools import cached_property
from pathlib import Path
from typing import Annotated

from pydantic import AliasChoices, Field, SecretStr, field_validator
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

from shared.urlguard import Allowlist


def default_data_dir() -> Path:
    base = os.environ.get("XDG_DATA_HOME") or Path.home() / ".local" / "share"
    return Path(base) / "scribefarm"


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="SCRIBEFARM_", extra="ignore", populate_by_name=True
    )

    data_dir: Path = Field(default_factory=default_data_dir)
    database_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices("DATABASE_URL", "SCRIBEFARM_DATABASE_URL"),
    )
    public_url: str | None = Field(
        default=None,
        description="Base URL workers use to reach this server (signed media links).",
    )
    signing_key: str | None = Field(
        default=None,
        description="Secret for signed URLs; generated into the data directory when unset.",
    )

    log_format: str = Field(default="auto", pattern="^(auto|text|json)$")
    log_level: str = "INFO"

    default_model: str = "tiny.en"
    # Submissions may ask for the default model, a model some worker has registered
    # with, or one listed here (for workers that have not registered yet).
    models: Annotated[list[str], NoDecode] = Field(default_factory=list)
    default_chunk_seconds: float = 60.0
    max_chunk_seconds: float = 120.0
    # A source longer than about twice this is cut (at quiet points) into spans this long,
    # each planned by a chunk job of its own, at once (0: one chunk job plans it whole).
    plan_span_seconds: float = Field(default=300.0, ge=0)
    max_upload_bytes: int = 2 * 1024**3
    # Request bodies are capped before they are read (server/bodylimit.py): chunk
    # results (a worker's completion), and every other body that is not an upload.
    max_result_bytes: int = Field(default=16 * 1024**2, ge=64 * 1024)
    max_request_bytes: int = Field(default=256 * 1024, ge=16 * 1024)
    max_audio_seconds: float = Field(default=24 * 3600.0, gt=0)
    # Per submit key (admin keys are the operator's, and exempt).
    max_active_per_key: int = Field(default=100, ge=1)
    submissions_per_minute: int = Field(default=60, ge=1)
    # The highest priority a submit key may ask for: above it jumps everyone's queue.
    max_submit_priority: int = Field(default=0, ge=-100, le=100)
    max_workers: int = Field(default=1000, ge=1)
    # Not heard from for this long and holding no live lease: the worker is gone (it no
    # longer counts against max_workers). Long polls end after half of it at most.
    worker_gone_seconds: float = Field(default=120.0, ge=2)

    lease_seconds: float = 30.0
    # A job's wall-clock deadline from its claim: heartbeats do not extend a lease past it
    # (a worker stuck on a live stream or a hang cannot hold a job for ever).
    max_job_seconds: float = Field(default=3600.0, gt=0)
    max_attempts: int = 5
    retry_base_seconds: float = 2.0
    retry_max_seconds: float = 600.0
    poll_seconds: float = 1.0
    signed_url_seconds: float = 6 * 3600.0
    db_pool_size: int = 20

    # Object storage: a local directory under data_dir unless a bucket is named.
    s3_bucket: str | None = None
    s3_endpoint_url: str | None = Field(
        default=None,
        validation_alias=AliasChoices(
            "SCRIBEFARM_S3_ENDPOINT_URL", "AWS_ENDPOINT_URL_S3", "AWS_ENDPOINT_URL"
        ),
    )
    s3_region: str | None = Field(
        default=None,
        validation_alias=AliasChoices("SCRIBEFARM_S3_REGION", "AWS_REGION", "AWS_DEFAULT_REGION"),
    )
    s3_access_key_id: str | None = Field(
        default=None,
        validation_alias=AliasChoices("SCRIBEFARM_S3_ACCESS_KEY_ID", "AWS_ACCESS_KEY_ID"),
    )
    s3_secret_access_key: str | None = Field(
        default=None,
        validation_alias=AliasChoices("SCRIBEFARM_S3_SECRET_ACCESS_KEY", "AWS_SECRET_ACCESS_KEY"),
    )
    inline_result_bytes: int = Field(
        default=256 * 1024, ge=0, description="Larger transcripts go to object storage."
    )
    retention_days: float | None = Field(
        default=None, gt=0, description="Delete finished transcriptions this old; never when unset."
    )
    dedup: bool = True

    # Outbound requests (URL sources, webhooks) may not reach private addresses unless
    # listed here: IP networks ("10.0.0.0/8") or host names.
    url_allowlist: Annotated[list[str], NoDecode] = Field(default_factory=list)
    webhook_secret: str | None = Field(
        default=None,
        description="Signs webhooks; generated into the data directory when unset.",
    )
    webhook_timeout_seconds: float = 10.0
    webhook_retry_hours: float = 24.0
    webhook_retry_base_seconds: float = Field(
        default=10.0, gt=0, description="First webhook retry delay; doubles, with jitter."
    )
    webhook_retry_max_seconds: float = Field(
        default=3600.0, gt=0, description="Longest delay between webhook attempts."
    )
    # GET /metrics: its board query is shared by the scrapes within this many seconds,
    # and with a token set, a scrape must send it (Authorization: Bearer <token>).
    metrics_cache_seconds: float = Field(default=5.0, ge=0)
    metrics_token: SecretStr | None = None
    openai_wait_seconds: float = Field(
        default=3600.0, description="How long /v1/audio/transcriptions waits for its result."
    )

    # The autoscaler (server/autoscaler/, docs/deploy.md): off, or who starts workers.
    autoscaler: str = Field(default="off", pattern="^(off|local|fly)$")
    autoscaler_interval_seconds: float = Field(default=10.0, gt=0)
    autoscaler_target_seconds: float = Field(
        default=300.0, gt=0, description="Aim to finish the queued audio within this long."
    )
    autoscaler_assumed_speed: float = Field(
        default=10.0, gt=0, description="× realtime per worker until one has been measured."
    )
    autoscaler_idle_seconds: float = Field(
        default=120.0, gt=0, description="Started workers exit after this long without work."
    )
    autoscaler_worker_key: SecretStr | None = Field(
        default=None, description="The worker key the local provider gives its workers."
    )
    fly_app: str | None = Field(
        default=None, validation_alias=AliasChoices("SCRIBEFARM_FLY_APP", "FLY_APP_NAME")
    )
    fly_api_token: SecretStr | None = Field(
        default=None, validation_alias=AliasChoices("SCRIBEFARM_FLY_API_TOKEN", "FLY_API_TOKEN")
    )
    fly_api_url: str = "https://api.machines.dev/v1"
    fly_worker_image: str | None = Field(
        default=None,
        validation_alias=AliasChoices("SCRIBEFARM_FLY_WORKER_IMAGE", "FLY_IMAGE_REF"),
    )
    fly_regions: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        validation_alias=AliasChoices("SCRIBEFARM_FLY_REGIONS", "PRIMARY_REGION", "FLY_REGION"),
    )
    fly_worker_cpu_kind: str = Field(default="performance", pattern="^(shared|performance)$")
    fly_worker_cpus: int = Field(default=2, ge=1)
    fly_worker_memory_mb: int = Field(default=4096, ge=256)

    @field_validator("plan_span_seconds")
    @classmethod
    def _long_enough_to_split(cls, value: float) -> float:
        if 0 < value < 120:  # a span must hold the search for its quiet cut, and more
            raise ValueError("SCRIBEFARM_PLAN_SPAN_SECONDS must be 0 (off) or at least 120")
        return value

    @field_validator("models", "url_allowlist", "fly_regions", mode="before")
    @classmethod
    def comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            return [entry.strip() for entry in value.split(",") if entry.strip()]
        return value

    @cached_property
    def allowlist(self) -> Allowlist:
        return Allowlist.parse(self.url_allowlist)

    @property
    def storage_dir(self) -> Path:
        return self.data_dir / "storage"

    @property
    def postgres_dir(self) -> Path:
        return self.data_dir / "postgres"

    @cached_property
    def signing_secret(self) -> bytes:
        return (self.signing_key or self.secret_file("signing.key")).encode()

    @cached_property
    def webhook_signing_secret(self) -> bytes:
        return (self.webhook_secret or self.secret_file("webhook.key")).encode()

    def secret_file(self, name: str) -> str:
        """A random secret kept in the data directory, created on first use."""
        path = self.data_dir / name
        if not path.exists():
            # Write then rename, so a concurrent process never reads a half-written key.
            path.parent.mkdir(parents=True, exist_ok=True)
            tmp = path.with_suffix(f".{os.getpid()}.tmp")
            fd = os.open(tmp, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
            with os.fdopen(fd, "w") as f:
                f.write(secrets.token_urlsafe(32))
            try:
                os.link(tmp, path)  # atomic: the first process to get here wins
            except FileExistsError:
                pass
            finally:
                tmp.unlink()
        return path.read_text().strip()
