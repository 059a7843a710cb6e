"""Read models: what the dashboard (server/dashboard/), the autoscaler
(server/autoscaler/), GET /metrics and KEDA read. Each runs one statement per page
tick, autoscaler tick or scrape, however many rows it shows or the queue holds."""

from __future__ import annotations

from datetime import datetime
from uuid import UUID

import asyncpg

from server.board.errors import not_found
from server.board.fanout import CHUNK_RESULTS
from server.settings import Settings


def ran_the_model_within(seconds: str) -> str:
    """Transcribe jobs that ran the model (a cached chunk ran none) and finished within
    the last `seconds` (a parameter): what every "recent speed" is measured on, through
    ix_jobs_finished."""
    return f"""finished_at > now() - make_interval(secs => {seconds}) AND state = 'succeeded'
      AND kind = 'transcribe' AND NOT coalesce((result ->> 'cached')::boolean, false)"""


# An unfinished job's state as the dashboard and /metrics name it: leased (a live
# lease), queued (never tried) or retrying (waiting for another attempt, or its lease
# ran out).
OPEN_JOB_STATE = """CASE WHEN state = 'leased' AND lease_expires_at > now() THEN 'leased'
                WHEN state = 'queued' AND attempts = 0 THEN 'queued'
                ELSE 'retrying' END"""

# Every model a worker has registered with (a sequential scan of a small table).
SERVED_MODELS = "SELECT DISTINCT unnest(models) AS model FROM workers ORDER BY 1"

DASHBOARD_COLUMNS = """
t.id, t.state, t.filename, t.model, t.created_at, t.started_at, t.finished_at,
t.duration_seconds, t.jobs_total, t.jobs_done, t.audio_seconds_done, t.error, now() AS db_now,
k.name AS submitter, k.prefix AS submitter_prefix
"""

# Newest first, by keyset like LIST_TRANSCRIPTIONS (ix_transcriptions_owner_created for
# a submit key, ix_transcriptions_created for admin); the search ($5: part of the file
# name or the start of the id, LIKE-escaped) filters the rows that walk meets. The
# submitters are primary key lookups.
DASHBOARD_TRANSCRIPTIONS = f"""
SELECT {DASHBOARD_COLUMNS}
FROM transcriptions t JOIN api_keys k ON k.id = t.api_key_id
WHERE ($1::uuid IS NULL OR t.api_key_id = $1)
  AND ($2::text IS NULL OR t.state = $2)
  AND ($3::timestamptz IS NULL OR (t.created_at, t.id) < ($3, $4::uuid))
  AND ($5::text IS NULL OR t.filename ILIKE '%' || $5 || '%' OR t.id::text LIKE lower($5) || '%')
ORDER BY t.created_at DESC, t.id DESC
LIMIT $6
"""

# Primary key lookup (a submit key sees only its own: $2), its jobs through
# ix_jobs_transcription and their workers by primary key.
DASHBOARD_TRANSCRIPTION = f"""
SELECT {DASHBOARD_COLUMNS}, t.source_key, t.source_url,
       (SELECT coalesce(json_agg(j ORDER BY j.seq), '[]')
        FROM (SELECT jb.id, jb.kind, jb.state, jb.seq, jb.start_seconds, jb.end_seconds,
                     jb.attempts, jb.max_attempts, jb.error, w.name AS worker,
                     jb.state = 'leased' AND jb.lease_expires_at > now() AS lease_live,
                     extract(epoch FROM coalesce(jb.finished_at, now()) - jb.leased_at)::float8
                         AS attempt_seconds
              FROM jobs jb LEFT JOIN workers w ON w.id = jb.worker_id
              WHERE jb.transcription_id = t.id) AS j) AS jobs
FROM transcriptions t JOIN api_keys k ON k.id = t.api_key_id
WHERE t.id = $1 AND ($2::uuid IS NULL OR t.api_key_id = $2)
"""

# Workers heard from in the last $1 seconds or holding a live lease (a sequential scan of
# a small table: one row per registration), with their live leases (ix_jobs_leased) and
# what their model transcribed in the last $2 seconds (ix_jobs_finished; cached chunks
# ran no model).
DASHBOARD_WORKERS = f"""
WITH live AS (
    SELECT j.worker_id, count(*) AS n,
           json_agg(json_build_object(
               'transcription_id', j.transcription_id, 'kind', j.kind, 'seq', j.seq,
               'start', j.start_seconds, 'end', j.end_seconds,
               -- a lookup per live lease, whatever the planner thinks of the table
               'filename', (SELECT filename FROM transcriptions WHERE id = j.transcription_id)
           ) ORDER BY j.leased_at, j.seq) AS jobs
    FROM jobs j
    WHERE j.state = 'leased' AND j.lease_expires_at > now()
    GROUP BY j.worker_id
), recent AS (
    SELECT worker_id, sum(end_seconds - start_seconds) AS audio_seconds,
           sum((result ->> 'processing_seconds')::float8) AS busy_seconds
    FROM jobs
    WHERE {ran_the_model_within("$2")}
    GROUP BY worker_id
)
SELECT w.id, w.name, w.engine, w.device, w.models, w.batch_size, w.jobs_done,
       w.audio_seconds, w.busy_seconds,
       extract(epoch FROM now() - w.last_seen_at)::float8 AS seen_seconds_ago,
       extract(epoch FROM now() - w.registered_at)::float8 AS age_seconds,
       coalesce(live.n, 0) AS current, coalesce(live.jobs, '[]') AS current_jobs,
       recent.audio_seconds AS recent_audio_seconds, recent.busy_seconds AS recent_busy_seconds
FROM workers w
LEFT JOIN live ON live.worker_id = w.id
LEFT JOIN recent ON recent.worker_id = w.id
WHERE w.last_seen_at > now() - make_interval(secs => $1) OR live.n > 0
ORDER BY w.name, w.registered_at DESC
LIMIT 500
"""

# The board page's tick in one statement: unfinished jobs by kind and state
# (ix_jobs_claimable holds exactly the queued and leased ones) and dead ones
# (ix_jobs_dead); for each of the last $1 minutes, the audio seconds transcribed and the
# most jobs unfinished at once (from each job's creation and end: ix_jobs_finished for
# the jobs finished since, plus the unfinished ones); the newest $2 dead jobs
# (ix_jobs_dead, then primary key lookups).
DASHBOARD_BOARD = f"""
WITH open_jobs AS (
    SELECT kind, state, attempts, lease_expires_at, created_at
    FROM jobs WHERE state IN ('queued', 'leased')
), counts AS (
    SELECT kind,
           {OPEN_JOB_STATE} AS state,
           count(*) AS n
    FROM open_jobs GROUP BY 1, 2
    UNION ALL
    SELECT kind, 'dead', count(*) FROM jobs WHERE state = 'dead' GROUP BY kind
), since AS (
    SELECT date_trunc('minute', now()) - make_interval(mins => $1 - 1) AS at
), finished AS (
    SELECT kind, state, created_at, finished_at, end_seconds - start_seconds AS seconds
    FROM jobs
    -- since.at again, written out: a value from another CTE would not reach the index
    WHERE finished_at >= date_trunc('minute', now()) - make_interval(mins => $1 - 1)
      AND state IN ('succeeded', 'dead', 'canceled')
), events AS (
    SELECT greatest(c.created_at, since.at) AS at, 1 AS delta, 0::float8 AS audio
    FROM (SELECT created_at FROM open_jobs UNION ALL SELECT created_at FROM finished) AS c,
         since
    UNION ALL
    SELECT finished_at, -1,
           CASE WHEN kind = 'transcribe' AND state = 'succeeded' THEN seconds ELSE 0 END
    FROM finished
), levels AS (
    SELECT date_trunc('minute', at) AS minute, delta, audio,
           sum(delta) OVER (ORDER BY at, delta DESC ROWS UNBOUNDED PRECEDING) AS level
    FROM events
), minutes AS (
    SELECT m.minute, coalesce(sum(l.audio), 0) AS audio_seconds,
           coalesce(sum(l.delta), 0) AS net, coalesce(max(l.level), 0) AS peak
    FROM since, generate_series(since.at, date_trunc('minute', now()), interval '1 minute')
         AS m(minute)
    LEFT JOIN levels l ON l.minute = m.minute
    GROUP BY m.minute
), history AS (
    -- the level carried into the minute, or the most it reached within it
    SELECT minute, audio_seconds, greatest(sum(net) OVER (ORDER BY minute) - net, peak) AS depth
    FROM minutes
), dead AS (
    SELECT j.id, j.kind, j.seq, j.start_seconds, j.end_seconds, j.attempts, j.error,
           j.transcription_id, t.filename, w.name AS worker,
           extract(epoch FROM now() - j.finished_at)::float8 AS seconds_ago
    FROM jobs j JOIN transcriptions t ON t.id = j.transcription_id
    LEFT JOIN workers w ON w.id = j.worker_id
    WHERE j.state = 'dead'
    ORDER BY j.finished_at DESC
    LIMIT $2
)
SELECT (SELECT coalesce(json_agg(counts), '[]') FROM counts) AS counts,
       (SELECT json_agg(history ORDER BY minute) FROM history) AS history,
       (SELECT coalesce(json_agg(dead ORDER BY seconds_ago), '[]') FROM dead) AS dead
"""

# Unfinished jobs (ix_jobs_claimable holds exactly the queued and leased ones): what
# waits for a worker (queued, retrying, or leased by a worker that is gone) and what is
# being worked on; and, per worker, the audio it transcribed in the last $1 seconds over
# the time from its first claim to its last completion in them (ix_jobs_finished;
# cached chunks ran no model).
AUTOSCALER_QUEUE = f"""
WITH open_jobs AS (
    SELECT state = 'leased' AND lease_expires_at > now() AS live,
           coalesce(end_seconds - start_seconds, 0) AS seconds
    FROM jobs WHERE state IN ('queued', 'leased') AND (model IS NULL OR model = $2)
), recent AS (
    SELECT sum(end_seconds - start_seconds) AS audio_seconds,
           extract(epoch FROM max(finished_at) - min(leased_at))::float8 AS busy_seconds
    FROM jobs
    WHERE {ran_the_model_within("$1")}
    GROUP BY worker_id
)
SELECT (SELECT count(*) FILTER (WHERE NOT live) FROM open_jobs) AS queued_jobs,
       (SELECT coalesce(sum(seconds) FILTER (WHERE NOT live), 0) FROM open_jobs)
           AS queued_audio_seconds,
       (SELECT count(*) FILTER (WHERE live) FROM open_jobs) AS leased_jobs,
       (SELECT coalesce(sum(audio_seconds), 0) FROM recent) AS recent_audio_seconds,
       (SELECT coalesce(sum(busy_seconds), 0) FROM recent) AS recent_busy_seconds
"""

# KEDA's PostgreSQL scaler runs this one (deploy/keda-scaledobject.yaml holds a copy;
# tests/unit/test_deploy_files.py keeps them equal): the audio seconds of every
# unfinished transcribe job, queued or in progress (so a busy pool is not scaled down
# under its workers), plus 60 s for each unfinished chunk job (a file not yet chunked:
# its length is unknown, and it must wake the pool from zero). Walks ix_jobs_claimable.
KEDA_QUEUE_DEPTH = """
SELECT ceil(coalesce(sum(CASE WHEN kind = 'chunk' THEN 60
                              ELSE end_seconds - start_seconds END), 0))::bigint
FROM jobs WHERE state IN ('queued', 'leased')
"""

# One scrape of GET /metrics. Unfinished jobs by kind and state with their audio
# (ix_jobs_claimable) and dead ones (ix_jobs_dead); live and expired leases; each
# model's × realtime over the last $1 seconds (ix_jobs_finished); live workers (a
# sequential scan of a small table); failed webhook deliveries
# (ix_webhook_deliveries_failed) and pending ones already tried (ix_webhook_deliveries_due).
METRICS = f"""
WITH open_jobs AS (
    SELECT kind, coalesce(end_seconds - start_seconds, 0) AS seconds,
           {OPEN_JOB_STATE} AS state,
           state = 'leased' AND lease_expires_at <= now() AS expired_lease
    FROM jobs WHERE state IN ('queued', 'leased')
), by_state AS (
    SELECT kind, state, count(*) AS jobs, sum(seconds) AS audio_seconds
    FROM open_jobs GROUP BY kind, state
    UNION ALL
    SELECT kind, 'dead', count(*), coalesce(sum(end_seconds - start_seconds), 0)
    FROM jobs WHERE state = 'dead' GROUP BY kind
), ran AS (
    SELECT model, worker_id, end_seconds - start_seconds AS audio_seconds,
           (result ->> 'processing_seconds')::float8 AS model_seconds
    FROM jobs
    WHERE {ran_the_model_within("$1")}
), speed AS (
    SELECT model, sum(audio_seconds) / nullif(sum(model_seconds), 0) AS realtime
    FROM ran GROUP BY model
), engine AS (
    -- Each live worker's model time over the window, and how long it has lived.
    SELECT w.name, sum(ran.model_seconds) AS model_seconds,
           extract(epoch FROM now() - w.registered_at)::float8 AS age_seconds
    FROM ran JOIN workers w ON w.id = ran.worker_id
    WHERE w.last_seen_at > now() - make_interval(secs => $2)
    GROUP BY w.id, w.name, w.registered_at
)
SELECT (SELECT coalesce(json_agg(by_state), '[]') FROM by_state) AS jobs,
       (SELECT coalesce(json_agg(speed), '[]') FROM speed WHERE realtime IS NOT NULL) AS speed,
       (SELECT coalesce(json_agg(engine), '[]') FROM engine) AS engine,
       (SELECT count(*) FROM open_jobs WHERE state = 'leased') AS live_leases,
       (SELECT count(*) FROM open_jobs WHERE expired_lease) AS expired_leases,
       (SELECT count(*) FROM workers
        WHERE last_seen_at > now() - make_interval(secs => $2)) AS workers,
       (SELECT count(*) FROM webhook_deliveries WHERE state = 'failed') AS webhooks_failed,
       (SELECT count(*) FROM webhook_deliveries
        WHERE state = 'pending' AND attempts > 0) AS webhooks_retrying
"""


class ReadModels:
    def __init__(self, pool: asyncpg.Pool, settings: Settings):
        self.pool = pool
        self.settings = settings

    async def served_models(self) -> list[str]:
        return [row["model"] for row in await self.pool.fetch(SERVED_MODELS)]

    async def transcriptions(
        self,
        owner: UUID | None,
        state: str | None,
        search: str | None,
        after: tuple[datetime, UUID] | None,
        limit: int,
    ) -> list[asyncpg.Record]:
        created, last_id = after or (None, None)
        return await self.pool.fetch(
            DASHBOARD_TRANSCRIPTIONS, owner, state, created, last_id, search, limit
        )

    async def transcription(self, transcription_id: UUID, owner: UUID | None) -> asyncpg.Record:
        row = await self.pool.fetchrow(DASHBOARD_TRANSCRIPTION, transcription_id, owner)
        if row is None:
            raise not_found(transcription_id)
        return row

    async def chunk_results(self, transcription_id: UUID) -> list[asyncpg.Record]:
        """Each transcribe job's range and result (None until it has succeeded)."""
        return await self.pool.fetch(CHUNK_RESULTS, transcription_id)

    async def workers(self, shown_seconds: float, recent_seconds: float) -> list[asyncpg.Record]:
        return await self.pool.fetch(DASHBOARD_WORKERS, shown_seconds, recent_seconds)

    async def board(self, minutes: int, dead_limit: int) -> asyncpg.Record:
        return await self.pool.fetchrow(DASHBOARD_BOARD, minutes, dead_limit)

    async def queue_state(self, window_seconds: float, model: str) -> asyncpg.Record:
        """The jobs workers of `model` can run (the ones the autoscaler starts)."""
        return await self.pool.fetchrow(AUTOSCALER_QUEUE, window_seconds, model)

    async def metrics(self, window_seconds: float) -> asyncpg.Record:
        return await self.pool.fetchrow(METRICS, window_seconds, self.settings.worker_gone_seconds)
