"""The one lock order, and the hint that wakes long-polling claims.

A transaction that changes a transcription and its jobs locks the transcription row
first (LOCK_TRANSCRIPTION or LOCK_TRANSCRIPTION_OF_JOB), then jobs, then workers; the
one-statement completion of a transcribe job (queue.COMPLETE_TRANSCRIBE) too.
Claims never wait on a job or transcription (SKIP LOCKED).
"""

from __future__ import annotations

import asyncpg

JOBS_CHANNEL = "scribefarm_jobs"

# Primary key lookups: the first lock of every transaction that changes a transcription
# and its jobs.
LOCK_TRANSCRIPTION = "SELECT state FROM transcriptions WHERE id = $1 FOR UPDATE"

LOCK_TRANSCRIPTION_OF_JOB = """
SELECT t.id FROM jobs j JOIN transcriptions t ON t.id = j.transcription_id
WHERE j.id = $1
FOR UPDATE OF t
"""

# Serialises what one key submits (limits) and worker registrations (their limit).
LOCK_KEY = "SELECT pg_advisory_xact_lock(hashtext($1::text))"


async def notify_jobs(conn: asyncpg.Connection, count: int) -> None:
    """A hint to long-polling claims; delivered at commit, lost if it rolls back."""
    await conn.execute("SELECT pg_notify($1, $2)", JOBS_CHANNEL, str(count))
