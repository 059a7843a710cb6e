"""The transcription life cycle: submitted (or answered at once by a duplicate), read,
canceled, retried, succeeded with its transcript document, failed, deleted, expired."""

from __future__ import annotations

import hashlib
import json
from datetime import datetime
from typing import TYPE_CHECKING, Any
from uuid import UUID

import asyncpg

from server import transcripts
from server.board import cache, limits
from server.board.errors import Conflict, not_found
from server.board.locks import LOCK_TRANSCRIPTION, LOCK_TRANSCRIPTION_OF_JOB, notify_jobs
from server.settings import Settings

if TYPE_CHECKING:  # at run time storage is handed in: no import circle through it
    from server.storage import Storage

INSERT_TRANSCRIPTION = """
WITH t AS (
    INSERT INTO transcriptions (id, api_key_id, state, filename, source_key, source_url,
                                source_bytes, options, model, priority, dedup_key)
    VALUES ($1, $2, 'queued', $3, $4, $5, $6, $7, $8, $9, $10)
    RETURNING id, model, priority, created_at
)
INSERT INTO jobs (transcription_id, kind, state, seq, model, priority, submitted_at,
                  max_attempts)
SELECT id, 'chunk', 'queued', 0, NULL, priority, created_at, $11 FROM t
"""

# A resubmission of a finished transcript: no jobs, it succeeds in the same
# transaction (SUCCEED), so it notifies like any other.
INSERT_DUPLICATE = """
INSERT INTO transcriptions (id, api_key_id, state, filename, source_key, source_url,
                            source_bytes, options, model, priority, dedup_key,
                            duration_seconds, audio_seconds_done, started_at)
VALUES ($1, $2, 'running', $3, $4, $5, $6, $7, $8, $9, $10, $11, $11, now())
"""

# Uses ix_transcriptions_dedup. Only the same key's own: a match across keys would tell
# one tenant that another transcribed the same bytes (issue 13).
FIND_DUPLICATE = """
SELECT id, transcript, transcript_key, duration_seconds FROM transcriptions
WHERE dedup_key = $1 AND state = 'succeeded' AND api_key_id = $2
ORDER BY finished_at DESC
LIMIT 1
"""

TRANSCRIPTION_COLUMNS = """
id, api_key_id, state, filename, options, model, created_at, started_at, finished_at,
duration_seconds, jobs_total, jobs_done, audio_seconds_done, error, now() AS db_now
"""

# Primary key lookup; a submit key sees only its own ($2), admin passes NULL.
GET_TRANSCRIPTION = f"""
SELECT {TRANSCRIPTION_COLUMNS} FROM transcriptions
WHERE id = $1 AND ($2::uuid IS NULL OR api_key_id = $2)
"""

# Keyset pagination, newest first: ix_transcriptions_owner_created for a submit key,
# ix_transcriptions_created for admin.
LIST_TRANSCRIPTIONS = f"""
SELECT {TRANSCRIPTION_COLUMNS} FROM transcriptions
WHERE ($1::uuid IS NULL OR api_key_id = $1)
  AND ($2::text IS NULL OR state = $2)
  AND ($3::timestamptz IS NULL OR (created_at, id) < ($3, $4::uuid))
ORDER BY created_at DESC, id DESC
LIMIT $5
"""

# Primary key lookup.
GET_TRANSCRIPT = """
SELECT id, state, transcript, transcript_key, transcript_bytes, transcript_sha256
FROM transcriptions
WHERE id = $1 AND ($2::uuid IS NULL OR api_key_id = $2)
"""

# Primary key lookup: what the transcript document says about its transcription.
DOCUMENT_HEADER = """
SELECT id, model, options, created_at, started_at, now() AS finished_at
FROM transcriptions WHERE id = $1
"""

# Primary key lookup. The document is in the row ($2), or in storage under $3 with its
# size and checksum, never both.
SUCCEED = """
UPDATE transcriptions
SET state = 'succeeded', transcript = $2, transcript_key = $3, transcript_bytes = $4,
    transcript_sha256 = $5, finished_at = now()
WHERE id = $1 AND state = 'running'
"""

# Under the transcription's lock: primary key lookup, then ix_jobs_transcription for
# its unfinished jobs.
FAIL_TRANSCRIPTION = """
WITH failed AS (
    UPDATE transcriptions SET state = 'failed', error = $2, finished_at = now()
    WHERE id = $1 AND state IN ('queued', 'running')
    RETURNING id
)
UPDATE jobs SET state = 'canceled', lease_expires_at = NULL, finished_at = now()
WHERE transcription_id IN (SELECT id FROM failed) AND state IN ('queued', 'leased')
"""

# Under the transcription's lock, like FAIL_TRANSCRIPTION.
CANCEL_TRANSCRIPTION = """
WITH canceled AS (
    UPDATE transcriptions SET state = 'canceled', finished_at = now()
    WHERE id = $1 AND state IN ('queued', 'running')
    RETURNING id
), jobs_canceled AS (
    UPDATE jobs SET state = 'canceled', lease_expires_at = NULL, finished_at = now()
    WHERE transcription_id IN (SELECT id FROM canceled) AND state IN ('queued', 'leased')
)
SELECT count(*) FROM canceled
"""

# Under the transcription's lock: requeues what did not finish (dead or canceled
# jobs); finished chunks keep their results. Uses ix_jobs_transcription.
RETRY_TRANSCRIPTION = """
WITH retried AS (
    UPDATE transcriptions
    SET state = CASE WHEN started_at IS NULL THEN 'queued' ELSE 'running' END,
        error = NULL, finished_at = NULL, retried_at = now()
    WHERE id = $1 AND state IN ('failed', 'canceled')
    RETURNING id
), requeued AS (
    UPDATE jobs SET state = 'queued', attempts = 0, run_after = now(), error = NULL,
                    lease_id = NULL, finished_at = NULL
    WHERE transcription_id IN (SELECT id FROM retried) AND state IN ('dead', 'canceled')
    RETURNING id
)
SELECT (SELECT count(*) FROM retried) AS retried, (SELECT count(*) FROM requeued) AS jobs
"""

# Primary key lookup, under the transcription's lock (LOCK_TRANSCRIPTION_OF_JOB first).
DEAD_JOB = "SELECT transcription_id FROM jobs WHERE id = $1 AND state = 'dead'"

# Primary key lookup, under the transcription's lock (cancel first).
DELETE_TRANSCRIPTION = """
DELETE FROM transcriptions WHERE id = $1
RETURNING source_key, transcript_key
"""

# Walks ix_transcriptions_finished from the oldest, then deletes by primary key (an
# array, not IN: a semi-join may hash the whole table). SKIP LOCKED lets servers share
# the work.
EXPIRE_TRANSCRIPTIONS = """
DELETE FROM transcriptions WHERE id = ANY(ARRAY(
    SELECT id FROM transcriptions
    WHERE finished_at IS NOT NULL AND finished_at < now() - make_interval(secs => $1)
    ORDER BY finished_at
    LIMIT 100
    FOR UPDATE SKIP LOCKED
))
RETURNING source_key, transcript_key
"""


class Transcriptions:
    def __init__(self, pool: asyncpg.Pool, settings: Settings, storage: Storage | None):
        self.pool = pool
        self.settings = settings
        self.storage = storage  # for transcripts over settings.inline_result_bytes

    async def submit(
        self,
        *,
        owner: UUID,
        transcription_id: UUID,
        filename: str | None,
        source_key: str | None,
        source_url: str | None,
        source_bytes: int | None,
        options: dict[str, Any],
        model: str,
        dedup_key: str | None,
        limited: bool,
    ) -> None:
        """Queues the transcription's chunk job, or, when the same audio with the same
        options already succeeded (and dedup is on), finishes it at once with that
        transcript. A `limited` key is held to its limits (OverLimit when over)."""
        row = (transcription_id, owner, filename, source_key, source_url, source_bytes)
        row += (options, model, options.get("priority", 0), dedup_key)
        async with self.pool.acquire() as conn, conn.transaction():
            if limited:
                await limits.hold(conn, self.settings, owner)
            original = None
            if dedup_key and self.settings.dedup:
                original = await conn.fetchrow(FIND_DUPLICATE, dedup_key, owner)
            if original is None:
                await conn.execute(INSERT_TRANSCRIPTION, *row, self.settings.max_attempts)
                await notify_jobs(conn, 1)
                return
            await conn.execute(INSERT_DUPLICATE, *row, original["duration_seconds"])
            merged = transcripts.merged_part(await self.document(original))
            await self.succeed(
                conn, transcription_id, merged, {"deduplicated_from": original["id"]}
            )

    async def check_limits(self, owner: UUID) -> None:
        """The same check as at submission, without its lock: refuses early, before an
        upload is streamed, what would be refused at the end."""
        async with self.pool.acquire() as conn:
            await limits.check(conn, self.settings, owner)

    async def get(self, transcription_id: UUID, owner: UUID | None) -> asyncpg.Record:
        row = await self.pool.fetchrow(GET_TRANSCRIPTION, transcription_id, owner)
        if row is None:
            raise not_found(transcription_id)
        return row

    async def list(
        self,
        owner: UUID | None,
        state: str | None,
        after: tuple[datetime, UUID] | None,
        limit: int,
    ) -> list[asyncpg.Record]:
        created, last_id = after or (None, None)
        return await self.pool.fetch(LIST_TRANSCRIPTIONS, owner, state, created, last_id, limit)

    async def transcript(self, transcription_id: UUID, owner: UUID | None) -> asyncpg.Record:
        """The finished transcript's row: the document itself, or its storage key."""
        row = await self.pool.fetchrow(GET_TRANSCRIPT, transcription_id, owner)
        if row is None:
            raise not_found(transcription_id)
        if row["state"] != "succeeded":
            raise Conflict(
                "not_finished",
                f"transcription {transcription_id} is {row['state']}; "
                "its transcript is available once it has succeeded",
            )
        return row

    async def transcript_document(self, transcription_id: UUID, owner: UUID | None):
        return await self.document(await self.transcript(transcription_id, owner))

    async def document(self, row: asyncpg.Record) -> dict[str, Any]:
        """A transcript document from its row, read from storage when it was too large."""
        if row["transcript_key"] is None:
            return row["transcript"]
        body = b"".join([chunk async for chunk in self.storage.read(row["transcript_key"])])
        return json.loads(body)

    async def succeed(
        self,
        conn: asyncpg.Connection,
        transcription_id: UUID,
        merged: dict[str, Any],
        extra: dict[str, Any] | None = None,
    ) -> None:
        """Stores the transcript document: in the row up to the inline limit, else as
        an object (written before the commit, under a key only this transcription
        uses, so a rolled-back attempt is overwritten by the next)."""
        header = await conn.fetchrow(DOCUMENT_HEADER, transcription_id)
        document = transcripts.document(header, merged, extra or {})
        body = transcripts.document_bytes(document)
        if len(body) <= self.settings.inline_result_bytes:
            await conn.execute(SUCCEED, transcription_id, document, None, None, None)
            return
        key = f"transcripts/{transcription_id}.json"
        await self.storage.put(key, body)
        digest = hashlib.sha256(body).hexdigest()
        await conn.execute(SUCCEED, transcription_id, None, key, len(body), digest)

    @staticmethod
    async def fail(conn: asyncpg.Connection, transcription_id: UUID, reason: str) -> None:
        """Under the transcription's lock: it fails, and its unfinished jobs are canceled."""
        await conn.execute(FAIL_TRANSCRIPTION, transcription_id, reason)

    async def cancel(self, transcription_id: UUID, owner: UUID | None) -> None:
        row = await self.get(transcription_id, owner)
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(LOCK_TRANSCRIPTION, transcription_id)
            canceled = await conn.fetchval(CANCEL_TRANSCRIPTION, transcription_id)
        if not canceled:
            raise Conflict(
                "already_finished", f"transcription {transcription_id} is {row['state']}"
            )

    async def retry(self, transcription_id: UUID, owner: UUID | None) -> None:
        row = await self.get(transcription_id, owner)
        async with self.pool.acquire() as conn, conn.transaction():
            if owner is not None:  # a submit key's retry is new work: held to its limits
                await limits.hold(conn, self.settings, owner)
            await conn.execute(LOCK_TRANSCRIPTION, transcription_id)
            result = await conn.fetchrow(RETRY_TRANSCRIPTION, transcription_id)
            if not result["retried"]:
                raise Conflict(
                    "not_retryable",
                    f"transcription {transcription_id} is {row['state']}; "
                    "only failed or canceled transcriptions can be retried",
                )
            await notify_jobs(conn, result["jobs"])

    async def requeue_dead_job(self, job_id: UUID) -> UUID:
        """A dead job failed its transcription (and canceled the rest of its jobs): retry
        that transcription, which requeues the dead job and the canceled ones."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(LOCK_TRANSCRIPTION_OF_JOB, job_id)
            transcription_id = await conn.fetchval(DEAD_JOB, job_id)
            if transcription_id is None:
                raise Conflict("not_dead", f"job {job_id} is not dead (any more)")
            result = await conn.fetchrow(RETRY_TRANSCRIPTION, transcription_id)
            if not result["retried"]:
                raise Conflict("not_retryable", f"the transcription of job {job_id} has not failed")
            await notify_jobs(conn, result["jobs"])
        return transcription_id

    async def delete(self, transcription_id: UUID, owner: UUID | None) -> list[str]:
        """Cancels and deletes a transcription with its jobs and webhook deliveries, and
        what the cache holds from it (its text is the user's); returns the storage keys
        of its objects, for the caller to delete."""
        await self.get(transcription_id, owner)
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(LOCK_TRANSCRIPTION, transcription_id)
            await conn.fetchval(CANCEL_TRANSCRIPTION, transcription_id)
            await cache.forget(conn, transcription_id)
            row = await conn.fetchrow(DELETE_TRANSCRIPTION, transcription_id)
        return object_keys([row] if row else [])

    async def expire(self, max_age_seconds: float) -> list[str]:
        """Deletes finished transcriptions (and cached chunks) older than the retention;
        returns the storage keys of their objects, for the caller to delete."""
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(EXPIRE_TRANSCRIPTIONS, max_age_seconds)
            await cache.expire(conn, max_age_seconds)
        return object_keys(rows)


def object_keys(rows: list[asyncpg.Record]) -> list[str]:
    return [key for row in rows for key in (row["source_key"], row["transcript_key"]) if key]
