"""The job state machine: workers register and claim jobs under leases, keep them
alive, and complete, fail or release them; a job whose last lease expired is dead."""

from __future__ import annotations

import contextlib
import itertools
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from server import metrics
from server.board import cache
from server.board.errors import Conflict, Invalid, NotFound, OverLimit
from server.board.fanout import COUNT_DONE, CREDIT_WORKER, FanOut
from server.board.locks import LOCK_KEY, LOCK_TRANSCRIPTION_OF_JOB, notify_jobs
from server.board.transcriptions import Transcriptions
from server.settings import Settings
from shared.protocol import ChunkPlan, ChunkSpan, ChunkTranscript

# A job a worker may take now: queued and due, or leased with its lease run out and
# attempts left (CLAIM takes those over). ix_jobs_claimable holds exactly the queued and
# leased rows. One definition for every statement that looks for work.
CLAIMABLE = """
    state IN ('queued', 'leased')
    AND ((state = 'queued' AND run_after <= now())
         OR (state = 'leased' AND lease_expires_at <= now() AND attempts < max_attempts))
"""

# ... that the claiming worker (the CTE `worker`) can run.
CLAIMABLE_BY_WORKER = f"""{CLAIMABLE}
    AND kind = ANY(worker.kinds) AND (model IS NULL OR model = ANY(worker.models))
"""

HEAD_CAP = 1024

# Claims up to $3 jobs the worker can run, and takes over expired leases in the same
# statement. Walks ix_jobs_claimable (priority DESC, submitted_at, seq) over the
# queued/leased rows only; SKIP LOCKED lets concurrent claimers pass each other.
# The audio claimed is at most $5 seconds. Past half of that, it is at most this
# worker's share of the head of the queue (the audio all live workers like it, seen
# within $6 seconds, would claim at once, split between them): N idle workers split the
# last long chunks of a file N ways instead of one taking them all while the others
# wait, and short jobs still go in batches (a smaller share of them only made smaller
# batches: bench/many_short.py). Always at least one job.
# Returns no row at all when the worker is unknown, one all-NULL row when there is
# no work.
CLAIM = f"""
WITH worker AS (
    UPDATE workers SET last_seen_at = now()
    WHERE id = $1 AND api_key_id = $2
    RETURNING models, kinds
), live AS (
    -- Workers that could take the same jobs (a model and a kind in common).
    SELECT greatest(count(*), 1) AS workers FROM workers, worker
    WHERE workers.last_seen_at > now() - make_interval(secs => $6)
      AND workers.models && worker.models AND workers.kinds && worker.kinds
), share AS (
    -- None (NULL) once the head holds {HEAD_CAP} jobs: with that much queued, no claim
    -- leaves other workers idle, and reading the head costs each claim O(workers).
    SELECT CASE WHEN count(*) < {HEAD_CAP}
                THEN greatest(sum(seconds) / (SELECT workers FROM live), $5::float8 / 2)
           END AS seconds
    FROM (
        SELECT coalesce(end_seconds - start_seconds, 0) AS seconds FROM jobs, worker
        WHERE {CLAIMABLE_BY_WORKER}
        ORDER BY priority DESC, submitted_at, seq
        LIMIT least($3 * (SELECT workers FROM live), {HEAD_CAP})
    ) AS head
), candidates AS (
    SELECT jobs.id, jobs.priority, jobs.submitted_at, jobs.seq,
           coalesce(jobs.end_seconds - jobs.start_seconds, 0) AS seconds
    FROM jobs, worker
    WHERE {CLAIMABLE_BY_WORKER}
    ORDER BY jobs.priority DESC, jobs.submitted_at, jobs.seq
    LIMIT $3
    FOR UPDATE OF jobs SKIP LOCKED
), chosen AS (
    -- The audio budget: rows locked above but not chosen are unlocked at commit.
    SELECT id FROM (
        SELECT id, row_number() OVER queue AS n, sum(seconds) OVER queue AS running
        FROM candidates
        WINDOW queue AS (ORDER BY priority DESC, submitted_at, seq)
    ) AS queue
    WHERE n = 1 OR $5::float8 IS NULL
       OR running <= least($5, coalesce((SELECT seconds FROM share), $5))
), claimed AS (
    UPDATE jobs j
    SET state = 'leased', lease_id = gen_random_uuid(), worker_id = $1,
        lease_expires_at = now() + make_interval(secs => $4), leased_at = now(),
        attempts = j.attempts + 1
    FROM chosen c WHERE j.id = c.id
    RETURNING j.id, j.kind, j.lease_id, j.lease_expires_at, j.attempts, j.transcription_id,
              j.seq, j.model, j.start_seconds, j.end_seconds, j.speech
), started AS (
    -- Primary key lookups. SKIP LOCKED: a claim never waits (lock order); a
    -- transcription skipped here is marked running when its plan fans out.
    UPDATE transcriptions t SET state = 'running', started_at = now()
    WHERE t.id IN (
        SELECT s.id FROM transcriptions s
        WHERE s.id IN (SELECT transcription_id FROM claimed) AND s.state = 'queued'
        FOR UPDATE SKIP LOCKED
    )
)
SELECT c.*, t.source_key, t.source_url, t.options, t.detected_language
FROM worker
LEFT JOIN (claimed c JOIN transcriptions t ON t.id = c.transcription_id) ON true
"""

# Walks ix_jobs_claimable; capped, it only tells the doorbell how many to wake.
COUNT_CLAIMABLE = f"""
SELECT count(*) FROM (SELECT 1 FROM jobs WHERE {CLAIMABLE} LIMIT $1) AS claimable
"""

# Counts live workers (a sequential scan of a small table) and registers one more only
# below the limit ($8), in one statement; serialised by an advisory lock.
REGISTER_WORKER = """
WITH live AS (
    SELECT count(*) AS n FROM workers
    WHERE last_seen_at > now() - make_interval(secs => $9)
)
INSERT INTO workers (api_key_id, name, engine, device, batch_size, models, kinds)
SELECT $1, $2, $3, $4, $5, $6, $7 FROM live WHERE $8::int IS NULL OR live.n < $8
RETURNING id
"""

# Primary key lookup; fenced on the lease. The lease is not extended past the job's
# wall-clock deadline (leased_at + SCRIBEFARM_MAX_JOB_SECONDS), and past it the heartbeat
# is refused (409): the lease expires, and the job is retried elsewhere or, out of
# attempts, dead.
HEARTBEAT = """
UPDATE jobs SET lease_expires_at = least(now() + make_interval(secs => $3),
                                         leased_at + make_interval(secs => $4))
WHERE id = $1 AND lease_id = $2 AND state = 'leased'
  AND leased_at + make_interval(secs => $4) > now()
RETURNING lease_expires_at
"""

# Primary key lookup; fenced on the lease. A chunk job's completion: its plan fans out in
# the same transaction, under its transcription's lock.
COMPLETE = """
UPDATE jobs SET state = 'succeeded', result = $3, finished_at = now(), lease_expires_at = NULL
WHERE id = $1 AND lease_id = $2 AND state = 'leased'
RETURNING kind, transcription_id, extract(epoch FROM now() - leased_at)::float8 AS lease_seconds
"""

# A transcribe job's completion in one statement, so its transcription's row is locked
# for one round trip, not across a transaction's (all workers complete chunks of the
# same transcription at once). Primary key lookups, in the one lock order: the
# transcription (the job's update waits on `transcription`), the job (fenced on the
# lease), the worker's statistics, then the fan-in count; the completion that sees
# jobs_done reach jobs_total merges, in a transaction of its own (FanOut.merge).
COMPLETE_TRANSCRIBE = f"""
WITH transcription AS (
    SELECT t.id, t.api_key_id FROM jobs j JOIN transcriptions t ON t.id = j.transcription_id
    WHERE j.id = $1
    FOR NO KEY UPDATE OF t
), job AS (
    UPDATE jobs SET state = 'succeeded', result = $3, finished_at = now(),
                    lease_expires_at = NULL
    WHERE id = $1 AND lease_id = $2 AND state = 'leased' AND kind = 'transcribe'
      AND transcription_id = (SELECT id FROM transcription)
    RETURNING transcription_id, worker_id, start_seconds,
              extract(epoch FROM now() - leased_at)::float8 AS lease_seconds
), stats AS ({CREDIT_WORKER}), counted AS ({COUNT_DONE}
    RETURNING jobs_done >= jobs_total AND duration_seconds IS NOT NULL AS all_done
)
SELECT job.transcription_id, job.start_seconds, job.lease_seconds,
       (SELECT api_key_id FROM transcription) AS owner,
       coalesce((SELECT all_done FROM counted), false) AS all_done
FROM job
"""

# Primary key lookups; fenced on the chunk job's lease, under its transcription's lock.
PLANNING = """
SELECT j.transcription_id, j.kind, j.seq
FROM jobs j JOIN transcriptions t ON t.id = j.transcription_id
WHERE j.id = $1 AND j.lease_id = $2 AND j.state = 'leased' AND t.state IN ('queued', 'running')
"""

# Primary key lookup: why a fenced write matched nothing.
JOB_STATE = "SELECT state, lease_id, kind FROM jobs WHERE id = $1"

# Primary key lookup; fenced on the lease. Exponential backoff with jitter, from the
# database clock; permanent errors and exhausted attempts go straight to dead.
FAIL = """
UPDATE jobs SET
    state = CASE WHEN $4 OR attempts >= max_attempts THEN 'dead' ELSE 'queued' END,
    run_after = now() + make_interval(secs =>
        least($6, $5 * power(2, attempts - 1)) * (0.5 + random())),
    error = $3, lease_expires_at = NULL, finished_at = now()
WHERE id = $1 AND lease_id = $2 AND state = 'leased'
RETURNING state, run_after, transcription_id, kind, seq, start_seconds, end_seconds, attempts
"""

# Primary key lookup; fenced. A worker shutting down gives a job back at once, and the
# attempt it used does not count against the job.
RELEASE = """
UPDATE jobs SET state = 'queued', run_after = now(), lease_expires_at = NULL,
                attempts = greatest(attempts - 1, 0)
WHERE id = $1 AND lease_id = $2 AND state = 'leased'
RETURNING id
"""

# Uses ix_jobs_leased: expired leases whose attempts are used up will never be claimed
# again (CLAIM skips them), so they are dead.
EXHAUSTED = """
SELECT id FROM jobs
WHERE state = 'leased' AND lease_expires_at <= now() AND attempts >= max_attempts
LIMIT 100
"""

# Primary key lookup; checked again under the transcription's lock.
BURY = """
UPDATE jobs SET state = 'dead', finished_at = now(), lease_expires_at = NULL,
    error = coalesce(error || '; ', '') || 'lease expired on the last attempt (worker lost)'
WHERE id = $1 AND state = 'leased' AND lease_expires_at <= now() AND attempts >= max_attempts
RETURNING transcription_id, kind, seq, start_seconds, end_seconds, attempts, error
"""


class Queue:
    def __init__(
        self,
        pool: asyncpg.Pool,
        settings: Settings,
        transcriptions: Transcriptions,
        fanout: FanOut,
    ):
        self.pool = pool
        self.settings = settings
        self.transcriptions = transcriptions
        self.fanout = fanout

    async def register_worker(self, key_id: UUID, caps: dict[str, Any]) -> UUID:
        limit = self.settings.max_workers
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(LOCK_KEY, "workers")
            worker_id = await conn.fetchval(
                REGISTER_WORKER,
                key_id,
                caps["name"],
                caps["engine"],
                caps["device"],
                caps["batch_size"],
                caps["models"],
                caps["kinds"],
                limit,
                self.settings.worker_gone_seconds,
            )
        if worker_id is None:
            raise OverLimit(
                "too_many_workers",
                f"the board already has {limit} live workers; the limit is {limit} "
                "(SCRIBEFARM_MAX_WORKERS). This worker will try again.",
                retry_after=60,
            )
        return worker_id

    async def claim(
        self,
        worker_id: UUID,
        key_id: UUID,
        max_jobs: int,
        max_audio_seconds: float | None,
        lease_seconds: float,
    ) -> list[asyncpg.Record]:
        rows = await self.pool.fetch(
            CLAIM,
            worker_id,
            key_id,
            max_jobs,
            lease_seconds,
            max_audio_seconds,
            self.settings.worker_gone_seconds,
        )
        if not rows:
            raise NotFound(
                "unknown_worker",
                f"worker {worker_id} is not registered with this key; register again",
            )
        return [row for row in rows if row["id"] is not None]

    async def count_claimable(self, cap: int) -> int:
        return await self.pool.fetchval(COUNT_CLAIMABLE, cap)

    async def heartbeat(self, job_id: UUID, lease_id: UUID, lease_seconds: float) -> datetime:
        deadline = self.settings.max_job_seconds  # never extended past it: see HEARTBEAT
        expires = await self.pool.fetchval(HEARTBEAT, job_id, lease_id, lease_seconds, deadline)
        if expires is None:
            await raise_fenced(self.pool, job_id, lease_id)
        return expires

    async def complete(self, job_id: UUID, lease_id: UUID, result: ChunkPlan | ChunkTranscript):
        if isinstance(result, ChunkPlan):
            lease_seconds = await self._complete_plan(job_id, lease_id, result)
        else:
            lease_seconds = await self._complete_transcript(job_id, lease_id, result)
        if lease_seconds is not None:  # None: the same completion again
            metrics.observe_job(result.kind, lease_seconds)
        return "succeeded"

    async def _complete_plan(self, job_id: UUID, lease_id: UUID, plan: ChunkPlan):
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(LOCK_TRANSCRIPTION_OF_JOB, job_id)
            job = await conn.fetchrow(COMPLETE, job_id, lease_id, plan.model_dump(mode="json"))
            if job is None:
                return await repeated_completion(conn, job_id, lease_id, plan.kind)
            if job["kind"] != plan.kind:
                raise wrong_kind(job_id, job["kind"])
            await self.fanout.planned(conn, job["transcription_id"], job_id, plan)
        return job["lease_seconds"]

    async def _complete_transcript(self, job_id: UUID, lease_id: UUID, result: ChunkTranscript):
        job = await self.pool.fetchrow(
            COMPLETE_TRANSCRIBE,
            job_id,
            lease_id,
            result.model_dump(mode="json"),
            result.audio_seconds,
            result.processing_seconds,
            result.cached,
        )
        if job is None:
            return await repeated_completion(self.pool, job_id, lease_id, result.kind)
        if result.cache_key and not result.cached:
            await cache.store(self.pool, job["owner"], job["start_seconds"], result)
        if job["all_done"]:
            await self.fanout.merge(job["transcription_id"])
        return job["lease_seconds"]

    async def settle(self, job_id: UUID, lease_id: UUID, chunks: list[ChunkSpan]) -> None:
        """Queues the transcribe jobs of chunks a chunk job settled while still planning.
        Fenced on its lease: a chunk job that is not the caller's any more queues nothing."""
        limit = self.settings.max_audio_seconds
        if chunks[-1].end > limit:
            raise Invalid(
                "audio_too_long",
                f"a chunk ends at {chunks[-1].end:.0f} s; the limit is {limit:.0f} s "
                "(SCRIBEFARM_MAX_AUDIO_SECONDS)",
            )
        async with self._planning(job_id, lease_id) as (conn, job):
            if job["kind"] != "chunk":
                raise wrong_kind(job_id, job["kind"])
            await self.fanout.settled(conn, job["transcription_id"], chunks)

    async def split(
        self, job_id: UUID, lease_id: UUID, cuts: list[float], language: str | None
    ) -> list[dict]:
        """Queues a chunk job for each further span of a long source, once; fenced on the
        lease of the source's first chunk job. Returns the spans queued."""
        limit = self.settings.max_audio_seconds
        increasing = all(a < b for a, b in itertools.pairwise(cuts))
        if cuts[0] <= 0 or not increasing or cuts[-1] >= limit:
            raise Invalid(
                "invalid_cuts",
                f"cuts must increase from above 0 s to below {limit:.0f} s "
                "(SCRIBEFARM_MAX_AUDIO_SECONDS)",
            )
        async with self._planning(job_id, lease_id) as (conn, job):
            if job["kind"] != "chunk" or job["seq"] != 0:
                raise Invalid("not_splittable", f"job {job_id} is not a source's first chunk job")
            return await self.fanout.split(conn, job["transcription_id"], cuts, language)

    @contextlib.asynccontextmanager
    async def _planning(self, job_id: UUID, lease_id: UUID):
        """A transaction under the job's transcription's lock, the job fenced on its
        lease: what a chunk job reports while it plans."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(LOCK_TRANSCRIPTION_OF_JOB, job_id)
            job = await conn.fetchrow(PLANNING, job_id, lease_id)
            if job is None:
                await raise_fenced(conn, job_id, lease_id)
            yield conn, job

    async def fail(self, job_id: UUID, lease_id: UUID, error: str, permanent: bool):
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(LOCK_TRANSCRIPTION_OF_JOB, job_id)
            job = await conn.fetchrow(
                FAIL,
                job_id,
                lease_id,
                error,
                permanent,
                self.settings.retry_base_seconds,
                self.settings.retry_max_seconds,
            )
            if job is None:
                await raise_fenced(conn, job_id, lease_id)
            if job["state"] == "dead":
                await self.transcriptions.fail(
                    conn, job["transcription_id"], failure_reason(job, error)
                )
        return job["state"], job["run_after"] if job["state"] == "queued" else None

    async def release(self, job_id: UUID, lease_id: UUID) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            if await conn.fetchval(RELEASE, job_id, lease_id) is None:
                await raise_fenced(conn, job_id, lease_id)
            await notify_jobs(conn, 1)

    async def rescue_exhausted(self) -> int:
        """Jobs whose last lease expired are dead; their transcriptions fail."""
        buried = 0
        for candidate in await self.pool.fetch(EXHAUSTED):
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute(LOCK_TRANSCRIPTION_OF_JOB, candidate["id"])
                job = await conn.fetchrow(BURY, candidate["id"])
                if job is not None:
                    reason = failure_reason(job, job["error"])
                    await self.transcriptions.fail(conn, job["transcription_id"], reason)
                    buried += 1
        return buried


async def repeated_completion(conn, job_id: UUID, lease_id: UUID, kind: str) -> None:
    """Why a completion matched nothing: the same completion again (idempotent), a
    result of the wrong kind, or a lease that is not current."""
    row = await conn.fetchrow(JOB_STATE, job_id)
    if row is not None and row["lease_id"] == lease_id:
        if row["kind"] != kind:
            raise wrong_kind(job_id, row["kind"])
        if row["state"] == "succeeded":
            return None
    await raise_fenced(conn, job_id, lease_id)


async def raise_fenced(conn, job_id: UUID, lease_id: UUID):
    """Why a write naming a lease matched nothing."""
    row = await conn.fetchrow(JOB_STATE, job_id)
    if row is None:  # never existed, or its transcription was deleted: drop the work
        raise Conflict("job_gone", f"job {job_id} does not exist (any more)")
    if row["state"] == "canceled":
        raise Conflict("job_canceled", f"job {job_id} was canceled; drop its work")
    raise Conflict(
        "lease_lost",
        f"lease {lease_id} is no longer current for job {job_id} "
        f"(the job is {row['state']}); drop its work",
    )


def wrong_kind(job_id: UUID, kind: str) -> Invalid:
    return Invalid("wrong_result_kind", f"job {job_id} is a {kind} job")


def failure_reason(job: asyncpg.Record, error: str) -> str:
    if job["kind"] == "chunk":
        return error
    return (
        f"the chunk at {job['start_seconds']:.1f}-{job['end_seconds']:.1f} s "
        f"failed after {job['attempts']} attempt(s): {error}"
    )
