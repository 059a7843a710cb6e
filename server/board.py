"""The job board: the only module that runs SQL against the board's tables.

Every statement names the index it relies on. Lease times come from the database
clock (now()), never from a worker's clock. Writes that name a lease are fenced:
they change a row only while that lease is the job's current one.

One lock order, so no two transactions can deadlock: a transaction that changes a
transcription and its jobs locks the transcription row first (LOCK_TRANSCRIPTION),
then jobs, then workers. Claims never wait on a job or transcription (SKIP LOCKED).
"""

from __future__ import annotations

import hashlib
import json
import math
from datetime import datetime
from typing import Any
from uuid import UUID

import asyncpg

from server import metrics, transcripts
from server.errors import ApiError, text_refused
from server.protocol import CachedChunk, ChunkPlan, ChunkSpan, ChunkTranscript
from server.settings import Settings
from server.storage import Storage

JOBS_CHANNEL = "scribefarm_jobs"

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
    SELECT greatest(sum(seconds) / (SELECT workers FROM live), $5::float8 / 2) AS seconds
    FROM (
        SELECT coalesce(end_seconds - start_seconds, 0) AS seconds FROM jobs, worker
        WHERE {CLAIMABLE_BY_WORKER}
        ORDER BY priority DESC, submitted_at, seq
        LIMIT $3 * (SELECT workers FROM live)
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

# Primary key lookups: the first lock of every transaction that changes a transcription
# and its jobs.
LOCK_TRANSCRIPTION = "SELECT state FROM transcriptions WHERE id = $1 FOR UPDATE"
LOCK_TRANSCRIPTION_OF_JOB = """
SELECT t.id FROM jobs j JOIN transcriptions t ON t.id = j.transcription_id
WHERE j.id = $1
FOR UPDATE OF t
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

# Primary key lookup; fenced on the lease.
COMPLETE = """
UPDATE jobs SET state = 'succeeded', result = $3, finished_at = now(), lease_expires_at = NULL
WHERE id = $1 AND lease_id = $2 AND state = 'leased'
RETURNING kind, transcription_id, worker_id, start_seconds, end_seconds,
          extract(epoch FROM now() - leased_at)::float8 AS lease_seconds
"""

# Primary key lookup: why a fenced write matched nothing.
JOB_STATE = "SELECT state, lease_id FROM jobs WHERE id = $1"

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

# Walks ix_jobs_claimable; capped, it only tells the doorbell how many to wake.
COUNT_CLAIMABLE = f"""
SELECT count(*) FROM (SELECT 1 FROM jobs WHERE {CLAIMABLE} LIMIT $1) AS claimable
"""

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

# Primary key lookups; fenced on the chunk job's lease, under its transcription's lock.
SETTLING = """
SELECT j.transcription_id, j.kind FROM jobs j JOIN transcriptions t ON t.id = j.transcription_id
WHERE j.id = $1 AND j.lease_id = $2 AND j.state = 'leased' AND t.state IN ('queued', 'running')
"""

# Primary key lookup. While planning goes on, jobs_total counts the chunks queued so
# far and duration_seconds stays NULL: a transcription is merged only once its plan is
# complete (PLANNED) and every job is done.
SETTLED = """
UPDATE transcriptions
SET jobs_total = jobs_total + $2, state = 'running', started_at = coalesce(started_at, now())
WHERE id = $1
"""

# Primary key lookup. Returns the counts: transcribe jobs of settled chunks may all be
# done before the plan is.
PLANNED = """
UPDATE transcriptions
SET duration_seconds = $2, jobs_total = $3, detected_language = $4, state = 'running',
    started_at = coalesce(started_at, now())
WHERE id = $1 AND state IN ('queued', 'running')
RETURNING jobs_done, jobs_total, duration_seconds
"""

# Fan-in, under the transcription's lock (taken first), which serialises concurrent
# completions: exactly one of them sees jobs_done reach jobs_total. One statement, so
# the lock is held for one round trip. Primary key lookups.
COUNT_DONE = """
WITH stats AS (
    UPDATE workers SET jobs_done = jobs_done + 1, audio_seconds = audio_seconds + $3,
                       busy_seconds = busy_seconds + $4, last_seen_at = now()
    WHERE id = $2 AND NOT $5
)
UPDATE transcriptions
SET jobs_done = jobs_done + 1, audio_seconds_done = audio_seconds_done + $3
WHERE id = $1 AND state = 'running'
RETURNING jobs_done, jobs_total, duration_seconds
"""

# Uses ix_jobs_transcription.
CHUNK_RESULTS = """
SELECT start_seconds, end_seconds, result FROM jobs
WHERE transcription_id = $1 AND kind = 'transcribe'
ORDER BY seq
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

# Uses ix_transcriptions_dedup. Only the same key's own: a match across keys would tell
# one tenant that another transcribed the same bytes (issue 13).
FIND_DUPLICATE = """
SELECT id, transcript, transcript_key, duration_seconds FROM transcriptions
WHERE dedup_key = $1 AND state = 'succeeded' AND api_key_id = $2
ORDER BY finished_at DESC
LIMIT 1
"""

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

# Primary key.
TRANSCRIPTION_OWNER = "SELECT api_key_id FROM transcriptions WHERE id = $1"

# ix_jobs_transcription: the cache keys a transcription's chunks stored or reused.
TRANSCRIPTION_CACHE_KEYS = """
SELECT DISTINCT t.api_key_id AS owner, j.result ->> 'cache_key' AS key
FROM jobs j JOIN transcriptions t ON t.id = j.transcription_id
WHERE j.transcription_id = $1 AND j.result ->> 'cache_key' IS NOT NULL
"""

# Primary key lookups.
CACHE_DELETE = "DELETE FROM chunk_cache WHERE key = ANY($1::text[])"

# Primary key; the first result stored for a key stays.
CACHE_STORE = """
INSERT INTO chunk_cache (key, result) VALUES ($1, $2) ON CONFLICT (key) DO NOTHING
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

# Primary key lookup, under the transcription's lock (cancel first).
DELETE_TRANSCRIPTION = """
DELETE FROM transcriptions WHERE id = $1
RETURNING source_key, transcript_key
"""

# Uses ix_transcriptions_finished; SKIP LOCKED lets servers share the work.
EXPIRE_TRANSCRIPTIONS = """
DELETE FROM transcriptions WHERE id IN (
    SELECT id FROM transcriptions
    WHERE finished_at IS NOT NULL AND finished_at < now() - make_interval(secs => $1)
    LIMIT 100
    FOR UPDATE SKIP LOCKED
)
RETURNING source_key, transcript_key
"""

# Sequential scan of a table holding one row per distinct chunk: run rarely.
EXPIRE_CHUNK_CACHE = """
DELETE FROM chunk_cache WHERE created_at < now() - make_interval(secs => $1)
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

# Every model a worker has registered with (a sequential scan of a small table).
SERVED_MODELS = "SELECT DISTINCT unnest(models) AS model FROM workers ORDER BY 1"

# Serialises what one key submits (limits) and worker registrations (their limit).
LOCK_KEY = "SELECT pg_advisory_xact_lock(hashtext($1::text))"

# A key's active transcriptions (ix_transcriptions_active) and its submissions in the
# last minute, retries included (ix_transcriptions_owner_created, ix_transcriptions_retried),
# with when the oldest of those leaves the minute.
KEY_USAGE = """
SELECT (SELECT count(*) FROM transcriptions
        WHERE api_key_id = $1 AND state IN ('queued', 'running')) AS active,
       count(*) AS last_minute,
       extract(epoch FROM min(submitted) + interval '1 minute' - now()) AS window_left
FROM (SELECT created_at FROM transcriptions
      WHERE api_key_id = $1 AND created_at > now() - interval '1 minute'
      UNION ALL
      SELECT retried_at FROM transcriptions
      WHERE api_key_id = $1 AND retried_at > now() - interval '1 minute') AS recent(submitted)
"""

# key_hash is unique (its index): one lookup per uncached key.
FIND_KEY = """
SELECT id, role, key_hash, (expires_at IS NOT NULL AND expires_at <= now()) AS expired,
       revoked_at IS NOT NULL AS revoked
FROM api_keys WHERE key_hash = $1
"""

# A handful of rows: the operator's listing.
LIST_KEYS = """
SELECT id, name, role, prefix, created_at, expires_at, revoked_at,
       (expires_at IS NOT NULL AND expires_at <= now()) AS expired
FROM api_keys ORDER BY created_at
"""

# The one active key with this id, prefix or hash (several matches: none revoked).
REVOKE_KEY = """
WITH matches AS (
    SELECT id FROM api_keys
    WHERE revoked_at IS NULL AND (id::text = $1 OR prefix = $1 OR key_hash = $2)
)
UPDATE api_keys SET revoked_at = now()
WHERE id = (SELECT id FROM matches) AND (SELECT count(*) FROM matches) = 1
RETURNING prefix
"""

INSERT_KEY = """
INSERT INTO api_keys (name, role, key_hash, prefix, expires_at) VALUES ($1, $2, $3, $4, $5)
RETURNING id
"""

# --- dashboard ----------------------------------------------------------------------
# What the web dashboard (server/dashboard/) reads. A page's live stream runs one of
# these statements per tick, however many rows the page shows.

# Primary key lookup: a dashboard session names its key by id, never by the key.
FIND_KEY_BY_ID = """
SELECT id, role, name, prefix, (expires_at IS NOT NULL AND expires_at <= now()) AS expired,
       revoked_at IS NOT NULL AS revoked
FROM api_keys WHERE id = $1
"""

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
DASHBOARD_WORKERS = """
WITH live AS (
    SELECT j.worker_id, count(*) AS n,
           json_agg(json_build_object(
               'transcription_id', j.transcription_id, 'filename', t.filename, 'kind', j.kind,
               'seq', j.seq, 'start', j.start_seconds, 'end', j.end_seconds
           ) ORDER BY j.leased_at, j.seq) AS jobs
    FROM jobs j JOIN transcriptions t ON t.id = j.transcription_id
    WHERE j.state = 'leased' AND j.lease_expires_at > now()
    GROUP BY j.worker_id
), recent AS (
    SELECT worker_id, sum(end_seconds - start_seconds) AS audio_seconds,
           sum((result ->> 'processing_seconds')::float8) AS busy_seconds
    FROM jobs
    WHERE finished_at > now() - make_interval(secs => $2) AND state = 'succeeded'
      AND kind = 'transcribe' AND NOT coalesce((result ->> 'cached')::boolean, false)
    GROUP BY worker_id
)
SELECT w.id, w.name, w.engine, w.device, w.models, w.batch_size, w.jobs_done,
       w.audio_seconds, w.busy_seconds,
       extract(epoch FROM now() - w.last_seen_at)::float8 AS seen_seconds_ago,
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
DASHBOARD_BOARD = """
WITH open_jobs AS (
    SELECT kind, state, attempts, lease_expires_at, created_at
    FROM jobs WHERE state IN ('queued', 'leased')
), counts AS (
    SELECT kind,
           CASE WHEN state = 'leased' AND lease_expires_at > now() THEN 'leased'
                WHEN state = 'queued' AND attempts = 0 THEN 'queued'
                ELSE 'retrying' END AS state,
           count(*) AS n
    FROM open_jobs GROUP BY 1, 2
    UNION ALL
    SELECT kind, 'dead', count(*) FROM jobs WHERE state = 'dead' GROUP BY kind
), since AS (
    SELECT date_trunc('minute', now()) - make_interval(mins => $1 - 1) AS at
), finished AS (
    SELECT kind, state, created_at, finished_at, end_seconds - start_seconds AS seconds
    FROM jobs, since
    WHERE finished_at >= since.at AND state IN ('succeeded', 'dead', 'canceled')
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

# Primary key lookup, under the transcription's lock (LOCK_TRANSCRIPTION_OF_JOB first).
DEAD_JOB = "SELECT transcription_id FROM jobs WHERE id = $1 AND state = 'dead'"


# --- autoscaler and metrics (issue 7) ------------------------------------------------
# What the autoscaler (server/autoscaler/), GET /metrics and KEDA read: each runs one
# statement per tick or scrape, however long the queue.

# Unfinished jobs (ix_jobs_claimable holds exactly the queued and leased ones): what
# waits for a worker (queued, retrying, or leased by a worker that is gone) and what is
# being worked on; and, per worker, the audio it transcribed in the last $1 seconds over
# the time from its first claim to its last completion in them (ix_jobs_finished;
# cached chunks ran no model).
AUTOSCALER_QUEUE = """
WITH open_jobs AS (
    SELECT state = 'leased' AND lease_expires_at > now() AS live,
           coalesce(end_seconds - start_seconds, 0) AS seconds
    FROM jobs WHERE state IN ('queued', 'leased') AND (model IS NULL OR model = $2)
), recent AS (
    SELECT sum(end_seconds - start_seconds) AS audio_seconds,
           extract(epoch FROM max(finished_at) - min(leased_at))::float8 AS busy_seconds
    FROM jobs
    WHERE finished_at > now() - make_interval(secs => $1) AND state = 'succeeded'
      AND kind = 'transcribe' AND NOT coalesce((result ->> 'cached')::boolean, false)
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
METRICS = """
WITH open_jobs AS (
    SELECT kind, coalesce(end_seconds - start_seconds, 0) AS seconds,
           CASE WHEN state = 'leased' AND lease_expires_at > now() THEN 'leased'
                WHEN state = 'queued' AND attempts = 0 THEN 'queued'
                ELSE 'retrying' END AS state,
           state = 'leased' AND lease_expires_at <= now() AS expired_lease
    FROM jobs WHERE state IN ('queued', 'leased')
), by_state AS (
    SELECT kind, state, count(*) AS jobs, sum(seconds) AS audio_seconds
    FROM open_jobs GROUP BY kind, state
    UNION ALL
    SELECT kind, 'dead', count(*), coalesce(sum(end_seconds - start_seconds), 0)
    FROM jobs WHERE state = 'dead' GROUP BY kind
), speed AS (
    SELECT model, sum(end_seconds - start_seconds)
                  / nullif(sum((result ->> 'processing_seconds')::float8), 0) AS realtime
    FROM jobs
    WHERE finished_at > now() - make_interval(secs => $1) AND state = 'succeeded'
      AND kind = 'transcribe' AND NOT coalesce((result ->> 'cached')::boolean, false)
    GROUP BY model
)
SELECT (SELECT coalesce(json_agg(by_state), '[]') FROM by_state) AS jobs,
       (SELECT coalesce(json_agg(speed), '[]') FROM speed WHERE realtime IS NOT NULL) AS speed,
       (SELECT count(*) FROM open_jobs WHERE state = 'leased') AS live_leases,
       (SELECT count(*) FROM open_jobs WHERE expired_lease) AS expired_leases,
       (SELECT count(*) FROM workers
        WHERE last_seen_at > now() - make_interval(secs => $2)) AS workers,
       (SELECT count(*) FROM webhook_deliveries WHERE state = 'failed') AS webhooks_failed,
       (SELECT count(*) FROM webhook_deliveries
        WHERE state = 'pending' AND attempts > 0) AS webhooks_retrying
"""


class Board:
    """Claims, leases and the transcription life cycle, over one connection pool."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings, storage: Storage | None = None):
        self.pool = pool
        self.settings = settings
        self.storage = storage  # for transcripts over settings.inline_result_bytes
        self.jobs_added = 0  # since the last ANALYZE, by this process

    async def ping(self) -> None:
        await self.pool.fetchval("SELECT 1")

    # --- submission ---------------------------------------------------------

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
        transcript. A `limited` key is held to its limits (429 when over)."""
        row = (transcription_id, owner, filename, source_key, source_url, source_bytes)
        row += (options, model, options.get("priority", 0), dedup_key)
        async with self.pool.acquire() as conn, conn.transaction():
            if limited:
                await conn.execute(LOCK_KEY, str(owner))
                await self._check_limits(conn, owner)
            original = None
            if dedup_key and self.settings.dedup:
                original = await conn.fetchrow(FIND_DUPLICATE, dedup_key, owner)
            if original is None:
                await conn.execute(INSERT_TRANSCRIPTION, *row, self.settings.max_attempts)
                await notify_jobs(conn, 1)
                return
            await conn.execute(INSERT_DUPLICATE, *row, original["duration_seconds"])
            merged = transcripts.merged_part(await self.document(original))
            await self._succeed(
                conn, transcription_id, merged, {"deduplicated_from": original["id"]}
            )

    async def served_models(self) -> list[str]:
        return [row["model"] for row in await self.pool.fetch(SERVED_MODELS)]

    async def check_limits(self, owner: UUID) -> None:
        """The same check as at submission, without its lock: refuses early, before an
        upload is streamed, what would be refused at the end."""
        async with self.pool.acquire() as conn:
            await self._check_limits(conn, owner)

    async def _check_limits(self, conn: asyncpg.Connection, owner: UUID) -> None:
        usage = await conn.fetchrow(KEY_USAGE, owner)
        active_limit = self.settings.max_active_per_key
        if usage["active"] >= active_limit:
            raise ApiError(
                429,
                "too_many_active",
                f"this key has {usage['active']} transcriptions queued or running; the limit "
                f"is {active_limit} (SCRIBEFARM_MAX_ACTIVE_PER_KEY). Submit more as they finish.",
                {"Retry-After": "30"},
            )
        rate_limit = self.settings.submissions_per_minute
        if usage["last_minute"] >= rate_limit:
            wait = max(1, math.ceil(usage["window_left"] or 1))
            raise ApiError(
                429,
                "too_many_submissions",
                f"this key submitted {usage['last_minute']} transcriptions in the last minute; "
                f"the limit is {rate_limit} a minute (SCRIBEFARM_SUBMISSIONS_PER_MINUTE). "
                f"Try again in {wait} s.",
                {"Retry-After": str(wait)},
            )

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
            raise ApiError(
                409,
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

    async def delete(self, transcription_id: UUID, owner: UUID | None) -> list[str]:
        """Cancels and deletes a transcription with its jobs and webhook deliveries;
        returns the storage keys of its objects, for the caller to delete."""
        await self.get(transcription_id, owner)
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(LOCK_TRANSCRIPTION, transcription_id)
            await conn.fetchval(CANCEL_TRANSCRIPTION, transcription_id)
            # What the cache holds from it goes too (its text is the user's).
            cached = await conn.fetch(TRANSCRIPTION_CACHE_KEYS, transcription_id)
            scoped = [scoped_cache_key(r["owner"], r["key"]) for r in cached]
            await conn.execute(CACHE_DELETE, scoped)
            row = await conn.fetchrow(DELETE_TRANSCRIPTION, transcription_id)
        return object_keys([row] if row else [])

    async def expire(self, max_age_seconds: float) -> list[str]:
        """Deletes finished transcriptions (and cached chunks) older than the retention;
        returns the storage keys of their objects, for the caller to delete."""
        async with self.pool.acquire() as conn, conn.transaction():
            rows = await conn.fetch(EXPIRE_TRANSCRIPTIONS, max_age_seconds)
            await conn.execute(EXPIRE_CHUNK_CACHE, max_age_seconds)
        return object_keys(rows)

    async def cancel(self, transcription_id: UUID, owner: UUID | None) -> None:
        row = await self.get(transcription_id, owner)
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(LOCK_TRANSCRIPTION, transcription_id)
            canceled = await conn.fetchval(CANCEL_TRANSCRIPTION, transcription_id)
        if not canceled:
            raise ApiError(
                409, "already_finished", f"transcription {transcription_id} is {row['state']}"
            )

    async def retry_transcription(self, transcription_id: UUID, owner: UUID | None) -> None:
        row = await self.get(transcription_id, owner)
        async with self.pool.acquire() as conn, conn.transaction():
            if owner is not None:  # a submit key's retry is new work: held to its limits
                await conn.execute(LOCK_KEY, str(owner))
                await self._check_limits(conn, owner)
            await conn.execute(LOCK_TRANSCRIPTION, transcription_id)
            result = await conn.fetchrow(RETRY_TRANSCRIPTION, transcription_id)
            if not result["retried"]:
                raise ApiError(
                    409,
                    "not_retryable",
                    f"transcription {transcription_id} is {row['state']}; "
                    "only failed or canceled transcriptions can be retried",
                )
            await notify_jobs(conn, result["jobs"])

    # --- workers ------------------------------------------------------------

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
            raise ApiError(
                429,
                "too_many_workers",
                f"the board already has {limit} live workers; the limit is {limit} "
                "(SCRIBEFARM_MAX_WORKERS). This worker will try again.",
                {"Retry-After": "60"},
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
            raise ApiError(
                404,
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
            await self._raise_fenced(self.pool, job_id, lease_id)
        return expires

    async def complete(self, job_id: UUID, lease_id: UUID, result: ChunkPlan | ChunkTranscript):
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(LOCK_TRANSCRIPTION_OF_JOB, job_id)
            job = await conn.fetchrow(COMPLETE, job_id, lease_id, result.model_dump(mode="json"))
            if job is None:
                return await self._repeated_completion(conn, job_id, lease_id)
            if job["kind"] != result.kind:
                raise ApiError(422, "wrong_result_kind", f"job {job_id} is a {job['kind']} job")
            if isinstance(result, ChunkPlan):
                await self._fan_out(conn, job["transcription_id"], result)
            else:
                await self._fan_in(conn, job, result)
        metrics.observe_job(job["kind"], job["lease_seconds"])
        return "succeeded"

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
                await self._raise_fenced(conn, job_id, lease_id)
            if job["state"] == "dead":
                await conn.execute(
                    FAIL_TRANSCRIPTION, job["transcription_id"], failure_reason(job, error)
                )
        return job["state"], job["run_after"] if job["state"] == "queued" else None

    async def release(self, job_id: UUID, lease_id: UUID) -> None:
        async with self.pool.acquire() as conn, conn.transaction():
            if await conn.fetchval(RELEASE, job_id, lease_id) is None:
                await self._raise_fenced(conn, job_id, lease_id)
            await notify_jobs(conn, 1)

    async def refresh_statistics(self, threshold: int = 1000) -> None:
        """A large fan-out between autovacuum's visits leaves the planner thinking the
        queue is tiny, and the claim query then sorts the whole queue instead of walking
        ix_jobs_claimable in order: refresh the statistics once many jobs arrived."""
        if self.jobs_added >= threshold:
            self.jobs_added = 0
            await self.pool.execute("ANALYZE jobs")

    async def rescue_exhausted(self) -> int:
        """Jobs whose last lease expired are dead; their transcriptions fail."""
        buried = 0
        for candidate in await self.pool.fetch(EXHAUSTED):
            async with self.pool.acquire() as conn, conn.transaction():
                await conn.execute(LOCK_TRANSCRIPTION_OF_JOB, candidate["id"])
                job = await conn.fetchrow(BURY, candidate["id"])
                if job is not None:
                    reason = failure_reason(job, job["error"])
                    await conn.execute(FAIL_TRANSCRIPTION, job["transcription_id"], reason)
                    buried += 1
        return buried

    # --- keys ---------------------------------------------------------------

    async def find_key(self, key_hash: str) -> asyncpg.Record | None:
        return await self.pool.fetchrow(FIND_KEY, key_hash)

    async def create_key(
        self, name: str, role: str, key_hash: str, prefix: str, expires_at: datetime | None
    ) -> UUID:
        return await self.pool.fetchval(INSERT_KEY, name, role, key_hash, prefix, expires_at)

    async def list_keys(self) -> list[asyncpg.Record]:
        return await self.pool.fetch(LIST_KEYS)

    async def revoke_key(self, id_or_prefix: str, key_hash: str) -> str | None:
        """Revokes the one active key matching an id, a prefix or a key's hash."""
        return await self.pool.fetchval(REVOKE_KEY, id_or_prefix, key_hash)

    async def cached_chunks(
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
            scoped_cache_key(next(iter(found)), key): key
            for key, found in key_owners.items()
            if len(found) == 1 and None not in found
        }
        rows = await self.pool.fetch(CACHE_LOOKUP, list(scoped))
        return {scoped[row["key"]]: row["result"] for row in rows}

    # --- dashboard ----------------------------------------------------------

    async def find_key_by_id(self, key_id: UUID) -> asyncpg.Record | None:
        return await self.pool.fetchrow(FIND_KEY_BY_ID, key_id)

    async def dashboard_transcriptions(
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

    async def dashboard_transcription(
        self, transcription_id: UUID, owner: UUID | None
    ) -> asyncpg.Record:
        row = await self.pool.fetchrow(DASHBOARD_TRANSCRIPTION, transcription_id, owner)
        if row is None:
            raise not_found(transcription_id)
        return row

    async def chunk_results(self, transcription_id: UUID) -> list[asyncpg.Record]:
        """Each transcribe job's range and result (None until it has succeeded)."""
        return await self.pool.fetch(CHUNK_RESULTS, transcription_id)

    async def dashboard_workers(self, shown_seconds: float, recent_seconds: float):
        return await self.pool.fetch(DASHBOARD_WORKERS, shown_seconds, recent_seconds)

    async def dashboard_board(self, minutes: int, dead_limit: int) -> asyncpg.Record:
        return await self.pool.fetchrow(DASHBOARD_BOARD, minutes, dead_limit)

    async def requeue_dead_job(self, job_id: UUID) -> UUID:
        """A dead job failed its transcription (and canceled the rest of its jobs): retry
        that transcription, which requeues the dead job and the canceled ones."""
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(LOCK_TRANSCRIPTION_OF_JOB, job_id)
            transcription_id = await conn.fetchval(DEAD_JOB, job_id)
            if transcription_id is None:
                raise ApiError(409, "not_dead", f"job {job_id} is not dead (any more)")
            result = await conn.fetchrow(RETRY_TRANSCRIPTION, transcription_id)
            if not result["retried"]:
                raise ApiError(
                    409, "not_retryable", f"the transcription of job {job_id} has not failed"
                )
            await notify_jobs(conn, result["jobs"])
        return transcription_id

    # --- autoscaler and metrics ---------------------------------------------

    async def queue_state(self, window_seconds: float, model: str) -> asyncpg.Record:
        """The jobs workers of `model` can run (the ones the autoscaler starts)."""
        return await self.pool.fetchrow(AUTOSCALER_QUEUE, window_seconds, model)

    async def metrics(self, window_seconds: float) -> asyncpg.Record:
        return await self.pool.fetchrow(METRICS, window_seconds, self.settings.worker_gone_seconds)

    # --- fan-out and fan-in -------------------------------------------------

    async def settle(self, job_id: UUID, lease_id: UUID, chunks: list[ChunkSpan]) -> None:
        """Queues the transcribe jobs of chunks a chunk job settled while still planning.
        Fenced on its lease: a chunk job that is not the caller's any more queues nothing."""
        limit = self.settings.max_audio_seconds
        if chunks[-1].end > limit:
            raise ApiError(
                422,
                "audio_too_long",
                f"a chunk ends at {chunks[-1].end:.0f} s; the limit is {limit:.0f} s "
                "(SCRIBEFARM_MAX_AUDIO_SECONDS)",
            )
        async with self.pool.acquire() as conn, conn.transaction():
            await conn.execute(LOCK_TRANSCRIPTION_OF_JOB, job_id)
            job = await conn.fetchrow(SETTLING, job_id, lease_id)
            if job is None:
                await self._raise_fenced(conn, job_id, lease_id)
            if job["kind"] != "chunk":
                raise ApiError(422, "wrong_result_kind", f"job {job_id} is a {job['kind']} job")
            added = await self._insert_chunks(conn, job["transcription_id"], chunks)
            await conn.execute(SETTLED, job["transcription_id"], added)

    async def _insert_chunks(
        self, conn: asyncpg.Connection, transcription_id: UUID, chunks: list[ChunkSpan]
    ) -> int:
        """Queues a transcribe job per chunk not queued yet; returns how many were new."""
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
        if added:
            await notify_jobs(conn, added)
        return added

    async def _fan_out(self, conn: asyncpg.Connection, transcription_id: UUID, plan: ChunkPlan):
        limit = self.settings.max_audio_seconds
        if plan.duration_seconds > limit:
            reason = (
                f"the audio is {plan.duration_seconds / 3600:.2f} h long; the limit is "
                f"{limit / 3600:.2f} h (SCRIBEFARM_MAX_AUDIO_SECONDS). Split the recording."
            )
            await conn.execute(PLANNED, transcription_id, plan.duration_seconds, 0, None)
            await conn.execute(FAIL_TRANSCRIPTION, transcription_id, reason)
            return
        await self._insert_chunks(conn, transcription_id, plan.chunks)
        counts = await conn.fetchrow(
            PLANNED, transcription_id, plan.duration_seconds, len(plan.chunks), plan.language
        )
        await self._merge_when_done(conn, transcription_id, counts)

    async def _fan_in(self, conn: asyncpg.Connection, job: asyncpg.Record, result: ChunkTranscript):
        counts = await conn.fetchrow(
            COUNT_DONE,
            job["transcription_id"],
            job["worker_id"],
            result.audio_seconds,
            result.processing_seconds,
            result.cached,
        )
        if result.cache_key and not result.cached:
            owner = await conn.fetchval(TRANSCRIPTION_OWNER, job["transcription_id"])
            key = scoped_cache_key(owner, result.cache_key)
            await conn.execute(CACHE_STORE, key, cache_entry(result, job))
        await self._merge_when_done(conn, job["transcription_id"], counts)

    async def _merge_when_done(
        self, conn: asyncpg.Connection, transcription_id: UUID, counts: asyncpg.Record | None
    ) -> None:
        """Merges the transcript once the plan is complete (duration known) and every
        transcribe job is done; a plan of no chunks is an empty transcript, done now."""
        if counts is None or counts["duration_seconds"] is None:
            return
        if counts["jobs_done"] < counts["jobs_total"]:
            return
        rows = await conn.fetch(CHUNK_RESULTS, transcription_id)
        chunks = [(r["start_seconds"], r["end_seconds"], r["result"]) for r in rows]
        merged = transcripts.merge(chunks, counts["duration_seconds"])
        await self._succeed(conn, transcription_id, merged)

    async def _succeed(
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

    # --- fencing ------------------------------------------------------------

    async def _repeated_completion(self, conn, job_id: UUID, lease_id: UUID) -> str:
        row = await conn.fetchrow(JOB_STATE, job_id)
        if row is not None and row["state"] == "succeeded" and row["lease_id"] == lease_id:
            return "succeeded"  # the same completion again: idempotent
        await self._raise_fenced(conn, job_id, lease_id)

    @staticmethod
    async def _raise_fenced(conn, job_id: UUID, lease_id: UUID):
        row = await conn.fetchrow(JOB_STATE, job_id)
        if row is None:  # never existed, or its transcription was deleted: drop the work
            raise ApiError(409, "job_gone", f"job {job_id} does not exist (any more)")
        if row["state"] == "canceled":
            raise ApiError(409, "job_canceled", f"job {job_id} was canceled; drop its work")
        raise ApiError(
            409,
            "lease_lost",
            f"lease {lease_id} is no longer current for job {job_id} "
            f"(the job is {row['state']}); drop its work",
        )


async def notify_jobs(conn: asyncpg.Connection, count: int) -> None:
    """A hint to long-polling claims; delivered at commit, lost if it rolls back."""
    await conn.execute("SELECT pg_notify($1, $2)", JOBS_CHANNEL, str(count))


def failure_reason(job: asyncpg.Record, error: str) -> str:
    if job["kind"] == "chunk":
        return error
    return (
        f"chunk {job['seq'] - 1} ({job['start_seconds']:.1f}-{job['end_seconds']:.1f} s) "
        f"failed after {job['attempts']} attempt(s): {error}"
    )


def scoped_cache_key(owner: UUID, key: str) -> str:
    """The chunk cache is per owner (submit key): a worker's `cache_key` alone would let
    any worker key plant text in, or read it from, other tenants' transcripts."""
    return hashlib.sha256(f"{owner}:{key}".encode()).hexdigest()


def cache_entry(result: ChunkTranscript, job: asyncpg.Record) -> dict[str, Any]:
    """Stored relative to the chunk's start, so the same audio elsewhere reuses it."""
    return CachedChunk(
        segments=[s.shifted(-job["start_seconds"]) for s in result.segments],
        language=result.language,
        language_probability=result.language_probability,
    ).model_dump(mode="json")


def object_keys(rows: list[asyncpg.Record]) -> list[str]:
    return [key for row in rows for key in (row["source_key"], row["transcript_key"]) if key]


def not_found(transcription_id: UUID) -> ApiError:
    return ApiError(404, "not_found", f"no transcription {transcription_id}")


async def init_connection(conn: asyncpg.Connection) -> None:
    """JSON columns travel as Python objects."""
    for kind in ("json", "jsonb"):
        await conn.set_type_codec(kind, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")
