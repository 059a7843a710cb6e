"""The board's schema as SQLModel tables.

The schema changes only through Alembic migrations (migrations/versions); a test
checks the migrations produce exactly this schema. Queries live in server/board/.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any
from uuid import UUID

from sqlalchemy import BigInteger, CheckConstraint, Column, DateTime, Float, Index, text
from sqlalchemy.dialects.postgresql import ARRAY, JSONB
from sqlalchemy.types import Text
from sqlmodel import Field, SQLModel

NOW = text("now()")


def timestamp(nullable: bool = True, default_now: bool = False) -> Any:
    return Field(
        default=None,
        sa_column=Column(
            DateTime(timezone=True),
            nullable=nullable,
            server_default=NOW if default_now else None,
        ),
    )


def counter(sa_type: Any = None) -> Any:
    kwargs = {"sa_type": sa_type} if sa_type is not None else {}
    return Field(default=0, sa_column_kwargs={"server_default": "0"}, **kwargs)


def jsonb(nullable: bool = True) -> Any:
    return Field(default=None, sa_column=Column(JSONB, nullable=nullable))


class ApiKey(SQLModel, table=True):
    __tablename__ = "api_keys"
    __table_args__ = (CheckConstraint("role IN ('submit', 'worker', 'admin')", name="role_known"),)

    id: UUID = Field(
        primary_key=True, sa_column_kwargs={"server_default": text("gen_random_uuid()")}
    )
    name: str
    role: str
    # sha256 of the key: keys are 256-bit random, so a fast hash is enough and a
    # database leak does not reveal usable keys.
    key_hash: str = Field(unique=True)
    prefix: str = Field(description="First characters of the key, to tell keys apart.")
    created_at: datetime = timestamp(nullable=False, default_now=True)
    expires_at: datetime | None = timestamp()
    revoked_at: datetime | None = timestamp()


class Transcription(SQLModel, table=True):
    __tablename__ = "transcriptions"
    __table_args__ = (
        CheckConstraint(
            "state IN ('queued', 'running', 'succeeded', 'failed', 'canceled')", name="state_known"
        ),
        # Listing: newest first, optionally per owner and state.
        Index("ix_transcriptions_owner_created", "api_key_id", "created_at", "id"),
        Index("ix_transcriptions_created", "created_at", "id"),
        CheckConstraint("(source_key IS NULL) <> (source_url IS NULL)", name="one_source"),
        # Deduplication finds a finished transcript of the same audio and options.
        Index(
            "ix_transcriptions_dedup",
            "dedup_key",
            postgresql_where=text("state = 'succeeded' AND dedup_key IS NOT NULL"),
        ),
        # Per-key limits count a key's unfinished transcriptions.
        Index(
            "ix_transcriptions_active",
            "api_key_id",
            postgresql_where=text("state IN ('queued', 'running')"),
        ),
        # The per-minute limit counts retries too.
        Index(
            "ix_transcriptions_retried",
            "api_key_id",
            "retried_at",
            postgresql_where=text("retried_at IS NOT NULL"),
        ),
        # Retention finds finished transcriptions by age.
        Index(
            "ix_transcriptions_finished",
            "finished_at",
            postgresql_where=text("finished_at IS NOT NULL"),
        ),
    )

    id: UUID = Field(primary_key=True)
    api_key_id: UUID = Field(foreign_key="api_keys.id")
    state: str = Field(default="queued")
    filename: str | None = None
    # Exactly one source: an object in storage (uploads) or a URL workers read directly.
    source_key: str | None = None
    source_url: str | None = None
    source_bytes: int | None = Field(default=None, sa_type=BigInteger)
    # sha256 of the source audio and the options that change the transcript: a
    # resubmission with the same key reuses a finished transcript (deduplication).
    dedup_key: str | None = None
    options: dict[str, Any] = jsonb(nullable=False)
    model: str
    priority: int = 0
    duration_seconds: float | None = None
    # Detected once by the chunk job (multilingual model, no language given) and used by
    # every transcribe job.
    detected_language: str | None = None
    jobs_total: int = counter()
    jobs_done: int = counter()
    audio_seconds_done: float = counter(Float)
    # The transcript stays in the row up to SCRIBEFARM_INLINE_RESULT_BYTES; a larger one
    # lives in storage under transcript_key and the row keeps its size and checksum.
    transcript: dict[str, Any] | None = jsonb()
    transcript_key: str | None = None
    transcript_bytes: int | None = Field(default=None, sa_type=BigInteger)
    transcript_sha256: str | None = None
    error: str | None = None
    created_at: datetime = timestamp(nullable=False, default_now=True)
    started_at: datetime | None = timestamp()
    finished_at: datetime | None = timestamp()
    # A retry is a new submission: the per-minute limit counts its latest one.
    retried_at: datetime | None = timestamp()


class Job(SQLModel, table=True):
    __tablename__ = "jobs"
    __table_args__ = (
        CheckConstraint("kind IN ('chunk', 'transcribe')", name="kind_known"),
        CheckConstraint(
            "state IN ('queued', 'leased', 'succeeded', 'dead', 'canceled')", name="state_known"
        ),
        # The claim query walks this in order: priority, then submission age, then
        # chunk order. Partial, so finished jobs never bloat it.
        Index(
            "ix_jobs_claimable",
            text("priority DESC"),
            "submitted_at",
            "seq",
            postgresql_where=text("state IN ('queued', 'leased')"),
        ),
        # The rescuer finds expired leases without walking the queue.
        Index("ix_jobs_leased", "lease_expires_at", postgresql_where=text("state = 'leased'")),
        # Fan-in and progress read a transcription's jobs.
        Index("ix_jobs_transcription", "transcription_id", "seq", unique=True),
        # The dashboard: throughput and history over recent minutes, and the dead jobs.
        Index("ix_jobs_finished", "finished_at", postgresql_where=text("finished_at IS NOT NULL")),
        Index("ix_jobs_dead", "finished_at", postgresql_where=text("state = 'dead'")),
    )

    id: UUID = Field(
        primary_key=True, sa_column_kwargs={"server_default": text("gen_random_uuid()")}
    )
    transcription_id: UUID = Field(foreign_key="transcriptions.id", ondelete="CASCADE")
    kind: str
    state: str = Field(default="queued")
    # 0 for the chunk job (-k for span k's of a long source), i + 1 for chunk i's
    # transcribe job.
    seq: int
    model: str | None = Field(default=None, description="NULL: any worker can run it.")
    priority: int = 0
    submitted_at: datetime = timestamp(nullable=False)
    start_seconds: float | None = None
    end_seconds: float | None = None
    # A transcribe job's speech spans ([[start, end], ...] in seconds), as the chunk job
    # found them over the whole source: the engine decodes exactly these windows.
    speech: list[list[float]] | None = jsonb()
    attempts: int = counter()
    max_attempts: int
    run_after: datetime = timestamp(nullable=False, default_now=True)
    lease_id: UUID | None = None
    lease_expires_at: datetime | None = timestamp()
    worker_id: UUID | None = None
    result: dict[str, Any] | None = jsonb()
    error: str | None = None
    created_at: datetime = timestamp(nullable=False, default_now=True)
    leased_at: datetime | None = timestamp()
    finished_at: datetime | None = timestamp()


class ChunkCache(SQLModel, table=True):
    """Transcripts of chunks by the hash of their audio, model and options: a retried or
    resubmitted chunk reuses its result instead of running the model again."""

    __tablename__ = "chunk_cache"

    key: str = Field(primary_key=True)
    result: dict[str, Any] = jsonb(nullable=False)
    created_at: datetime = timestamp(nullable=False, default_now=True)


class Worker(SQLModel, table=True):
    __tablename__ = "workers"

    id: UUID = Field(
        primary_key=True, sa_column_kwargs={"server_default": text("gen_random_uuid()")}
    )
    api_key_id: UUID = Field(foreign_key="api_keys.id")
    name: str
    engine: str
    device: str
    batch_size: int
    models: list[str] = Field(sa_column=Column(ARRAY(Text), nullable=False))
    kinds: list[str] = Field(sa_column=Column(ARRAY(Text), nullable=False))
    registered_at: datetime = timestamp(nullable=False, default_now=True)
    last_seen_at: datetime = timestamp(nullable=False, default_now=True)
    jobs_done: int = counter()
    audio_seconds: float = counter(Float)
    busy_seconds: float = counter(Float)


class WebhookDelivery(SQLModel, table=True):
    """One webhook notification of a finished transcription (an outbox row, written by
    a trigger in the transaction that finishes it) and its delivery attempts."""

    __tablename__ = "webhook_deliveries"
    __table_args__ = (
        CheckConstraint("state IN ('pending', 'delivered', 'failed')", name="state_known"),
        # The sender picks due deliveries without walking delivered ones.
        Index(
            "ix_webhook_deliveries_due",
            "next_attempt_at",
            postgresql_where=text("state = 'pending'"),
        ),
        Index("ix_webhook_deliveries_transcription", "transcription_id", "created_at"),
        # GET /metrics counts the failed ones at every scrape.
        Index(
            "ix_webhook_deliveries_failed",
            "created_at",
            postgresql_where=text("state = 'failed'"),
        ),
    )

    id: UUID = Field(
        primary_key=True, sa_column_kwargs={"server_default": text("gen_random_uuid()")}
    )
    transcription_id: UUID = Field(foreign_key="transcriptions.id", ondelete="CASCADE")
    url: str
    status: str = Field(description="The transcription state it announces.")
    state: str = Field(default="pending", sa_column_kwargs={"server_default": "pending"})
    attempts: int = counter()
    # Each attempt: {"at", "status_code", "error", "milliseconds"}.
    history: list[dict[str, Any]] = Field(
        default_factory=list,
        sa_column=Column(JSONB, nullable=False, server_default=text("'[]'::jsonb")),
    )
    next_attempt_at: datetime = timestamp(nullable=False, default_now=True)
    created_at: datetime = timestamp(nullable=False, default_now=True)
    delivered_at: datetime | None = timestamp()
