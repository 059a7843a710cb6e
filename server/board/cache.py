"""Earlier chunk results, reused when the same audio comes again with the same options.

Entries are scoped to an owner (submit key): a worker's `cache_key` alone would let any
worker key plant text in, or read it from, other tenants' transcripts."""

from __future__ import annotations

import hashlib
from typing import Any
from uuid import UUID

import asyncpg

from server.board.errors import text_refused
from shared.protocol import CachedChunk, ChunkTranscript

# Primary key lookups. Keys are scoped to an owner (scoped_cache_key).
CACHE_LOOKUP = "SELECT key, result FROM chunk_cache WHERE key = ANY($1::text[])"

# The owners of jobs the calling worker key holds leases on: primary keys of jobs,
# workers and transcriptions. A worker may look up the cache only for its own jobs.
LEASED_JOB_OWNERS = """
SELECT j.id, t.api_key_id AS owner
FROM jobs j
JOIN workers w ON w.id = j.worker_id
JOIN transcriptions t ON t.id = j.transcription_id
WHERE j.id = ANY($1::uuid[]) AND j.state = 'leased' AND w.api_key_id = $2
"""

# Primary key; the first result stored for a key stays.
CACHE_STORE = """
INSERT INTO chunk_cache (key, result) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING
"""

# ix_jobs_transcription: the cache keys a transcription's chunks stored or reused.
TRANSCRIPTION_CACHE_KEYS = """
SELECT DISTINCT t.api_key_id AS owner, j.result ->> 'cache_key' AS key
FROM jobs j JOIN transcriptions t ON t.id = j.transcription_id
WHERE j.transcription_id = $1 AND j.result ->> 'cache_key' IS NOT NULL
"""

# Primary key lookups.
CACHE_DELETE = "DELETE FROM chunk_cache WHERE key = ANY($1::text[])"

# Sequential scan of a table holding one row per distinct chunk: run rarely.
EXPIRE_CHUNK_CACHE = """
DELETE FROM chunk_cache WHERE created_at < now() - make_interval(secs => $1)
"""


class ChunkCache:
    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    async def lookup(
        self, keys: list[str], job_ids: list[UUID], worker_key: UUID
    ) -> dict[str, dict[str, Any]]:
        """Earlier results for `keys[i]`, each looked up among what the owner of
        `job_ids[i]` (a job this worker key holds) stored: one tenant never reads
        another's text. Keys without a job of this worker's find nothing."""
        if any("\0" in key for key in keys):  # hashed below, but still no text to store
            raise text_refused()
        owners = {
            row["id"]: row["owner"]
            for row in await self.pool.fetch(LEASED_JOB_OWNERS, job_ids, worker_key)
        }
        key_owners: dict[str, set[UUID]] = {}
        for key, job in zip(keys, job_ids, strict=False):
            key_owners.setdefault(key, set()).add(owners.get(job))
        # Hits are answered by key: one key in jobs of two owners would hand one owner's
        # entry to the other's job too, so such a key (or one without a job) is a miss.
        scoped = {
            scoped_key(next(iter(found)), key): key
            for key, found in key_owners.items()
            if len(found) == 1 and None not in found
        }
        rows = await self.pool.fetch(CACHE_LOOKUP, list(scoped))
        return {scoped[row["key"]]: row["result"] for row in rows}


async def store(
    db: asyncpg.Pool | asyncpg.Connection,
    owner: UUID,
    start_seconds: float,
    result: ChunkTranscript,
) -> None:
    """Keeps a transcribe job's result for its owner, relative to the chunk's start, so
    the same audio elsewhere in a file reuses it."""
    entry = CachedChunk(
        segments=[s.shifted(-start_seconds) for s in result.segments],
        language=result.language,
        language_probability=result.language_probability,
    )
    await db.execute(
        CACHE_STORE, scoped_key(owner, result.cache_key), entry.model_dump(mode="json")
    )


async def forget(conn: asyncpg.Connection, transcription_id: UUID) -> None:
    """Deletes the entries a transcription's chunks stored or reused."""
    cached = await conn.fetch(TRANSCRIPTION_CACHE_KEYS, transcription_id)
    await conn.execute(CACHE_DELETE, [scoped_key(r["owner"], r["key"]) for r in cached])


async def expire(conn: asyncpg.Connection, max_age_seconds: float) -> None:
    await conn.execute(EXPIRE_CHUNK_CACHE, max_age_seconds)


def scoped_key(owner: UUID, key: str) -> str:
    return hashlib.sha256(f"{owner}:{key}".encode()).hexdigest()
