"""Fan-out and fan-in: a long source's first chunk job splits its planning into spans,
a chunk job each; a chunk job's plan becomes transcribe jobs (queued as chunks settle,
and with its completion), inside the chunk job's transaction, under the
transcription's lock; the transcribe job whose completion counts the last one done
(Queue.complete) has the transcript merged, in a transaction of its own."""

from __future__ import annotations

import asyncio
from uuid import UUID

import asyncpg

from server import transcripts
from server.board import cache
from server.board.locks import notify_jobs
from server.board.transcriptions import Transcriptions
from server.settings import Settings
from server.speakers import Diarization
from shared.protocol import ChunkPlan, ChunkSpan

# Fan-out: one transcribe job per planned chunk, inserted as the chunk job reports
# settled chunks and with its completion (whose plan holds them all). A chunk is the
# same whoever plans it, so ix_jobs_transcription (transcription_id, seq), unique,
# queues each once. The speech spans come as one JSON array, one entry per chunk (a
# list of lists would be taken for a multi-dimensional SQL array). Returns how many
# were new.
INSERT_TRANSCRIBE_JOBS = """
WITH inserted AS (
    INSERT INTO jobs (transcription_id, kind, state, seq, model, priority, submitted_at,
                      start_seconds, end_seconds, speech, max_attempts)
    SELECT t.id, 'transcribe', 'queued', s.seq, t.model, t.priority, t.created_at,
           s.start_seconds, s.end_seconds, nullif($5::jsonb -> (s.n - 1)::int, 'null'), $6
    FROM transcriptions t,
         unnest($2::int[], $3::float8[], $4::float8[]) WITH ORDINALITY
             AS s(seq, start_seconds, end_seconds, n)
    WHERE t.id = $1
    ON CONFLICT (transcription_id, seq) DO NOTHING
    RETURNING 1
)
SELECT count(*) FROM inserted
"""

# Primary key lookup. While planning goes on, jobs_total counts the chunks queued so
# far and duration_seconds stays NULL: a transcription is merged only once its plan is
# complete (PLAN_COMPLETE) and every job is done.
SETTLED = """
UPDATE transcriptions
SET jobs_total = jobs_total + $2, state = 'running', started_at = coalesce(started_at, now())
WHERE id = $1
"""

# Primary key lookup. Counts a chunk job's chunks not queued before; the language is
# the one the first chunk job detected (a span's plan has none).
PLANNED = """
UPDATE transcriptions
SET jobs_total = jobs_total + $2, detected_language = coalesce($3, detected_language),
    state = 'running', started_at = coalesce(started_at, now())
WHERE id = $1 AND state IN ('queued', 'running')
"""

# ix_jobs_transcription, then a primary key lookup. The plan is complete once every chunk
# job (one, or one per span of a long source) has succeeded; the source ends where the
# last span did. Returns nothing while spans are still being planned. Transcribe jobs of
# settled chunks may all be done before the plan is.
PLAN_COMPLETE = """
UPDATE transcriptions t SET duration_seconds = plans.duration_seconds
FROM (
    SELECT max((result ->> 'duration_seconds')::float8) AS duration_seconds
    FROM jobs WHERE transcription_id = $1 AND kind = 'chunk'
    HAVING bool_and(state = 'succeeded')
) AS plans
WHERE t.id = $1 AND t.state = 'running'
RETURNING t.jobs_done >= t.jobs_total AS all_done, t.duration_seconds
"""

# What a transcribe job's completion adds, whichever way it completes (the completed job
# is the CTE `job`, with its worker_id and transcription_id; $4 its audio seconds, $5 the
# worker's busy seconds, $6 whether the cache answered): its worker's statistics, and the
# transcription's count of jobs done.
CREDIT_WORKER = """
    UPDATE workers SET jobs_done = jobs_done + 1, audio_seconds = audio_seconds + $4,
                       busy_seconds = busy_seconds + $5, last_seen_at = now()
    WHERE id = (SELECT worker_id FROM job) AND NOT $6
"""
COUNT_DONE = """
    UPDATE transcriptions
    SET jobs_done = jobs_done + 1, audio_seconds_done = audio_seconds_done + $4
    WHERE id = (SELECT transcription_id FROM job) AND state = 'running'
"""

# A short source's one chunk, transcribed by its chunk job ($3): its transcribe job is
# done on arrival with the result $7, credited to that job's worker and counted as any
# completion is, under the transcription's lock the plan's completion holds.
# ix_jobs_transcription, then primary key lookups. Returns the owner (for the cache).
DONE_BY_PLANNER = f"""
WITH planner AS (
    SELECT worker_id, leased_at FROM jobs WHERE id = $3
), job AS (
    UPDATE jobs SET state = 'succeeded', result = $7, finished_at = now(), attempts = 1,
                    worker_id = (SELECT worker_id FROM planner),
                    leased_at = (SELECT leased_at FROM planner)
    WHERE transcription_id = $1 AND seq = $2 AND state = 'queued'
    RETURNING worker_id, transcription_id
), stats AS ({CREDIT_WORKER})
{COUNT_DONE}
RETURNING api_key_id
"""

# Primary key lookup: a source found too long keeps the length found, to show why.
RECORD_DURATION = "UPDATE transcriptions SET duration_seconds = $2 WHERE id = $1"

# Fan-out of the planning itself: a chunk job for each further span of a long source
# (span k is seq -k), queued once: a retried first chunk job gets the spans of the first
# attempt (SPANS). ix_jobs_transcription.
INSERT_SPAN_JOBS = """
WITH inserted AS (
    INSERT INTO jobs (transcription_id, kind, state, seq, priority, submitted_at,
                      start_seconds, end_seconds, max_attempts)
    SELECT t.id, 'chunk', 'queued', -s.k, t.priority, t.created_at,
           s.start_seconds, s.end_seconds, $4
    FROM transcriptions t,
         unnest($2::float8[], $3::float8[]) WITH ORDINALITY AS s(start_seconds, end_seconds, k)
    WHERE t.id = $1
      AND NOT EXISTS (SELECT 1 FROM jobs WHERE transcription_id = $1 AND seq < 0)
    RETURNING 1
)
SELECT count(*) FROM inserted
"""

# ix_jobs_transcription.
SPANS = """
SELECT -seq AS index, start_seconds AS start, end_seconds AS end FROM jobs
WHERE transcription_id = $1 AND seq < 0
ORDER BY seq DESC
"""

# Primary key lookup: the language every chunk of every span is transcribed in.
SPLIT_LANGUAGE = """
UPDATE transcriptions SET detected_language = coalesce(detected_language, $2) WHERE id = $1
"""

# Primary key lookup, the first lock of the merge: a transcription whose plan is complete
# and whose jobs are all done, still running (merged once, however many ask).
MERGEABLE = """
SELECT duration_seconds FROM transcriptions
WHERE id = $1 AND state = 'running' AND duration_seconds IS NOT NULL
  AND jobs_done >= jobs_total
FOR UPDATE
"""

# ix_transcriptions_active: transcriptions whose last completion did not get to merge
# them (the server stopped in between, or the merge failed).
UNMERGED = """
SELECT id FROM transcriptions
WHERE state IN ('queued', 'running') AND state = 'running'
  AND duration_seconds IS NOT NULL AND jobs_done >= jobs_total
LIMIT 100
"""

# Uses transcriptions_pkey.
OPTIONS = "SELECT options FROM transcriptions WHERE id = $1"

# Uses ix_jobs_transcription.
CHUNK_RESULTS = """
SELECT start_seconds, end_seconds, result FROM jobs
WHERE transcription_id = $1 AND kind = 'transcribe'
ORDER BY seq
"""


class FanOut:
    def __init__(self, pool: asyncpg.Pool, settings: Settings, transcriptions: Transcriptions):
        self.pool = pool
        self.settings = settings
        self.transcriptions = transcriptions
        self.jobs_added = 0  # since the last ANALYZE, by this process

    async def settled(
        self, conn: asyncpg.Connection, transcription_id: UUID, chunks: list[ChunkSpan]
    ):
        """Chunks a chunk job settled while still planning: their jobs are queued now."""
        added = await self._insert(conn, transcription_id, chunks)
        await conn.execute(SETTLED, transcription_id, added)

    async def split(
        self,
        conn: asyncpg.Connection,
        transcription_id: UUID,
        cuts: list[float],
        language: str | None,
    ) -> list[dict]:
        """Queues a chunk job per further span (once); returns the spans queued."""
        ends = [*cuts[1:], None]
        added = await conn.fetchval(
            INSERT_SPAN_JOBS, transcription_id, cuts, ends, self.settings.max_attempts
        )
        if added:
            await notify_jobs(conn, added)
        if language is not None:
            await conn.execute(SPLIT_LANGUAGE, transcription_id, language)
        return [dict(row) for row in await conn.fetch(SPANS, transcription_id)]

    async def planned(
        self, conn: asyncpg.Connection, transcription_id: UUID, job_id: UUID, plan: ChunkPlan
    ):
        """A chunk job's plan (of the whole source, or of one span): its chunks are
        queued (a short source's one chunk done already, when the job transcribed it),
        and once every span is planned the transcription has its duration."""
        limit = self.settings.max_audio_seconds
        if plan.duration_seconds > limit:
            reason = (
                f"the audio is {plan.duration_seconds / 3600:.2f} h long; the limit is "
                f"{limit / 3600:.2f} h (SCRIBEFARM_MAX_AUDIO_SECONDS). Split the recording."
            )
            await conn.execute(RECORD_DURATION, transcription_id, plan.duration_seconds)
            await self.transcriptions.fail(conn, transcription_id, reason)
            return
        added = await self._insert(conn, transcription_id, plan.chunks, plan.transcript is None)
        if plan.transcript is not None:
            await self._done_by_planner(conn, transcription_id, job_id, plan)
        await conn.execute(PLANNED, transcription_id, added, plan.language)
        complete = await conn.fetchrow(PLAN_COMPLETE, transcription_id)
        # A plan of no chunks is an empty transcript, done now.
        if complete is not None and complete["all_done"]:
            await self._merge(conn, transcription_id, complete["duration_seconds"])

    async def merge(self, transcription_id: UUID) -> bool:
        """Merges the transcript of a transcription whose jobs are all done, once: in a
        transaction of its own, after the last transcribe job's completion committed."""
        async with self.pool.acquire() as conn, conn.transaction():
            duration = await conn.fetchval(MERGEABLE, transcription_id)
            if duration is None:
                return False
            await self._merge(conn, transcription_id, duration)
            return True

    async def merge_unmerged(self) -> int:
        """The sweep for completions that counted the last job but did not merge."""
        return sum([await self.merge(row["id"]) for row in await self.pool.fetch(UNMERGED)])

    async def refresh_statistics(self, threshold: int = 1000) -> None:
        """A large fan-out between autovacuum's visits leaves the planner thinking the
        queue is tiny, and the claim query then sorts the whole queue instead of walking
        ix_jobs_claimable in order: refresh the statistics once many jobs arrived."""
        if self.jobs_added >= threshold:
            self.jobs_added = 0
            await self.pool.execute("ANALYZE jobs")

    async def _done_by_planner(
        self, conn: asyncpg.Connection, transcription_id: UUID, job_id: UUID, plan: ChunkPlan
    ) -> None:
        result, chunk = plan.transcript, plan.chunks[0]
        owner = await conn.fetchval(
            DONE_BY_PLANNER,
            transcription_id,
            chunk.index + 1,
            job_id,
            result.audio_seconds,
            result.processing_seconds,
            result.cached,
            result.model_dump(mode="json"),
        )
        if owner is not None and result.cache_key and not result.cached:
            await cache.store(conn, owner, chunk.start, result)

    async def _insert(
        self,
        conn: asyncpg.Connection,
        transcription_id: UUID,
        chunks: list[ChunkSpan],
        notify: bool = True,
    ) -> int:
        """Queues a transcribe job per chunk not queued yet; returns how many were new.
        Workers are told, unless the jobs are done before anyone could claim them."""
        added = await conn.fetchval(
            INSERT_TRANSCRIBE_JOBS,
            transcription_id,
            [c.index + 1 for c in chunks],
            [c.start for c in chunks],
            [c.end for c in chunks],
            [c.speech for c in chunks],
            self.settings.max_attempts,
        )
        self.jobs_added += added
        if added and notify:
            await notify_jobs(conn, added)
        return added

    async def _merge(self, conn: asyncpg.Connection, transcription_id: UUID, duration: float):
        rows = await conn.fetch(CHUNK_RESULTS, transcription_id)
        chunks = [(r["start_seconds"], r["end_seconds"], r["result"]) for r in rows]
        speakers = Diarization.from_options(await conn.fetchval(OPTIONS, transcription_id))
        # Clustering a long file's voices takes a while: off the event loop.
        merged = await asyncio.to_thread(transcripts.merge, chunks, duration, speakers)
        await self.transcriptions.succeed(conn, transcription_id, merged)
