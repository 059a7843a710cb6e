"""Every statement the board runs per request, per worker call or per tick keeps to its
index on a freshly filled board (no ANALYZE since: statistics lag behind a burst of
work): none walks the jobs, transcriptions, cache or webhook tables.

Each is planned for typical values of its parameters' types: a key or job id, a limit
of 10, 60 seconds (a NULL would fold its `$n IS NULL OR ...` filters away)."""

from __future__ import annotations

import asyncio
import re

import asyncpg
import pytest

from server import db
from server.board import cache, fanout, keys, limits, locks, queue, reads, transcriptions
from tests.farm import create_database

# Tables that grow with use. workers and api_keys hold a row per worker registration
# and per key: scanned whole, by design.
LARGE_TABLES = ("jobs", "transcriptions", "chunk_cache", "webhook_deliveries")

# (module, statement, an index its plan must use; None: an insert, a lock, or a small table)
STATEMENTS = [
    (queue, "CLAIM", "ix_jobs_claimable"),
    (queue, "COUNT_CLAIMABLE", "ix_jobs_claimable"),
    (queue, "REGISTER_WORKER", None),
    (locks, "LOCK_KEY", None),
    (queue, "HEARTBEAT", "jobs_pkey"),
    (queue, "COMPLETE", "jobs_pkey"),
    (queue, "COMPLETE_TRANSCRIBE", "jobs_pkey"),
    (queue, "PLANNING", "jobs_pkey"),
    (queue, "JOB_STATE", "jobs_pkey"),
    (queue, "FAIL", "jobs_pkey"),
    (queue, "RELEASE", "jobs_pkey"),
    (queue, "EXHAUSTED", "ix_jobs_leased"),
    (queue, "BURY", "jobs_pkey"),
    (locks, "LOCK_TRANSCRIPTION", "transcriptions_pkey"),
    (locks, "LOCK_TRANSCRIPTION_OF_JOB", "jobs_pkey"),
    (fanout, "INSERT_TRANSCRIBE_JOBS", "transcriptions_pkey"),
    (fanout, "SETTLED", "transcriptions_pkey"),
    (fanout, "PLANNED", "transcriptions_pkey"),
    (fanout, "PLAN_COMPLETE", "ix_jobs_transcription"),
    (fanout, "INSERT_SPAN_JOBS", "transcriptions_pkey"),
    (fanout, "SPANS", "ix_jobs_transcription"),
    (fanout, "SPLIT_LANGUAGE", "transcriptions_pkey"),
    (fanout, "DONE_BY_PLANNER", "ix_jobs_transcription"),
    (fanout, "RECORD_DURATION", "transcriptions_pkey"),
    (fanout, "MERGEABLE", "transcriptions_pkey"),
    (fanout, "UNMERGED", "ix_transcriptions_active"),
    (fanout, "CHUNK_RESULTS", "ix_jobs_transcription"),
    (fanout, "OPTIONS", "transcriptions_pkey"),
    (transcriptions, "INSERT_TRANSCRIPTION", None),
    (transcriptions, "INSERT_DUPLICATE", None),
    (transcriptions, "FIND_DUPLICATE", "ix_transcriptions_dedup"),
    (transcriptions, "GET_TRANSCRIPTION", "transcriptions_pkey"),
    (transcriptions, "LIST_TRANSCRIPTIONS", "ix_transcriptions_"),
    (transcriptions, "GET_TRANSCRIPT", "transcriptions_pkey"),
    (transcriptions, "DOCUMENT_HEADER", "transcriptions_pkey"),
    (transcriptions, "SUCCEED", "transcriptions_pkey"),
    (transcriptions, "FAIL_TRANSCRIPTION", "ix_jobs_transcription"),
    (transcriptions, "CANCEL_TRANSCRIPTION", "ix_jobs_transcription"),
    (transcriptions, "RETRY_TRANSCRIPTION", "ix_jobs_transcription"),
    (transcriptions, "DEAD_JOB", "jobs_pkey"),
    (transcriptions, "DELETE_TRANSCRIPTION", "transcriptions_pkey"),
    (transcriptions, "EXPIRE_TRANSCRIPTIONS", "ix_transcriptions_finished"),
    (cache, "CACHE_LOOKUP", "chunk_cache_pkey"),
    (cache, "LEASED_JOB_OWNERS", "jobs_pkey"),
    (cache, "CACHE_STORE", None),
    (cache, "TRANSCRIPTION_CACHE_KEYS", "ix_jobs_transcription"),
    (cache, "CACHE_DELETE", "chunk_cache_pkey"),
    (limits, "KEY_USAGE", "ix_transcriptions_active"),
    (keys, "FIND_KEY", "api_keys_key_hash_key"),
    (keys, "FIND_KEY_BY_ID", "api_keys_pkey"),
    (reads, "SERVED_MODELS", None),
    (reads, "DASHBOARD_TRANSCRIPTIONS", "ix_transcriptions_"),
    (reads, "DASHBOARD_TRANSCRIPTION", "transcriptions_pkey"),
    (reads, "DASHBOARD_WORKERS", "ix_jobs_leased"),
    (reads, "DASHBOARD_BOARD", "ix_jobs_claimable"),
    (reads, "AUTOSCALER_QUEUE", "ix_jobs_claimable"),
    (reads, "KEDA_QUEUE_DEPTH", "ix_jobs_claimable"),
    (reads, "METRICS", "ix_jobs_claimable"),
]

TYPICAL = {
    "uuid": "gen_random_uuid()",
    "uuid[]": "ARRAY[gen_random_uuid()]",
    "int4": "10",
    "int8": "10",
    "int4[]": "'{1}'",
    "float8": "60",
    "float8[]": "'{60}'",
    "text": "'x'",
    "varchar": "'x'",
    "text[]": "'{x}'",
    "bool": "false",
    "timestamptz": "now()",
    "jsonb": "'{}'",
}
STATEMENT = re.compile(r"\s*(WITH|SELECT|INSERT|UPDATE|DELETE)\b")
FILL = """
WITH owner AS (
    INSERT INTO api_keys (name, role, key_hash, prefix) VALUES ('k', 'submit', 'h', 'p')
    RETURNING id
), t AS (
    INSERT INTO transcriptions (id, api_key_id, state, source_key, source_bytes, options,
                                model, priority, created_at, finished_at, dedup_key)
    SELECT gen_random_uuid(), owner.id, CASE WHEN n % 50 = 0 THEN 'running' ELSE 'succeeded' END,
           's', 1, '{}', 'tiny.en', 0, now() - make_interval(secs => n),
           CASE WHEN n % 50 = 0 THEN NULL ELSE now() END, 'd' || n
    FROM owner, generate_series(1, 20000) AS n
    RETURNING id, state
), j AS (
    INSERT INTO jobs (transcription_id, kind, state, seq, model, priority, submitted_at,
                      start_seconds, end_seconds, max_attempts, finished_at, result)
    SELECT t.id, 'transcribe',
           CASE WHEN t.state = 'running' THEN 'queued' WHEN random() < 0.01 THEN 'dead'
                ELSE 'succeeded' END,
           s, 'tiny.en', 0, now(), s * 30, s * 30 + 30, 3,
           CASE WHEN t.state = 'running' THEN NULL ELSE now() - make_interval(secs => s) END,
           '{"cache_key": "c", "processing_seconds": 1}'
    FROM t, generate_series(1, 4) AS s
)
INSERT INTO webhook_deliveries (transcription_id, url, status, state)
SELECT id, 'https://example.com/', 'succeeded', 'delivered' FROM t
"""
FILL_CACHE = """
INSERT INTO chunk_cache (key, result) SELECT 'k' || n, '{}' FROM generate_series(1, 20000) AS n
"""


@pytest.fixture(scope="module")
def plans(postgres_url) -> dict[str, str]:
    url = create_database(postgres_url)
    db.migrate(url)

    async def explain_all() -> dict[str, str]:
        conn = await asyncpg.connect(url)
        try:
            await conn.execute(FILL)
            await conn.execute(FILL_CACHE)
            found = {}
            for module, name, _ in STATEMENTS:
                query = getattr(module, name)
                parameters = (await conn.prepare(query)).get_parameters()
                await conn.execute(f"PREPARE planned AS {query}")
                values = ", ".join(TYPICAL[p.name] for p in parameters)
                rows = await conn.fetch(
                    f"EXPLAIN EXECUTE planned({values})" if values else "EXPLAIN EXECUTE planned"
                )
                await conn.execute("DEALLOCATE planned")
                found[name] = "\n".join(row[0] for row in rows)
            return found
        finally:
            await conn.close()

    return asyncio.run(explain_all())


@pytest.mark.parametrize(
    "name, index", [(name, index) for _, name, index in STATEMENTS], ids=[s[1] for s in STATEMENTS]
)
def test_each_statement_keeps_to_its_index(plans, name, index):
    plan = plans[name]
    walked = [t for t in LARGE_TABLES if re.search(rf"Seq Scan on {t}\b", plan)]
    assert not walked, f"{name} walks {walked}:\n{plan}"
    if index:
        assert index in plan, f"{name} does not use {index}:\n{plan}"


def test_every_statement_of_the_board_is_listed_or_run_rarely():
    """A new statement joins the table above, or says here why it may scan."""
    rarely = {
        "EXPIRE_CHUNK_CACHE",  # a sequential scan, every few minutes at most
        "LIST_KEYS",  # the operator's CLI
        "REVOKE_KEY",
        "INSERT_KEY",
    }
    modules = (cache, fanout, keys, limits, locks, queue, reads, transcriptions)
    statements = {
        name
        for module in modules
        for name, value in vars(module).items()
        if name.isupper() and isinstance(value, str) and re.match(STATEMENT, value)
    }
    listed = {name for _, name, _ in STATEMENTS}
    parts = {"CREDIT_WORKER", "COUNT_DONE"}  # CTEs of the two completions above, never alone
    assert statements - listed - rarely - parts == set()
