"""The migrations are the only way the schema changes: they must produce exactly the
models' schema, and the claim query must keep using its index."""

from __future__ import annotations

import asyncio
import uuid

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.ext.asyncio import create_async_engine
from sqlmodel import SQLModel

import server.models  # noqa: F401
from server import db
from server.board import queue
from tests.farm import create_database, sql


def schema_differences(url: str) -> list:
    async def compare():
        engine = create_async_engine(db.sqlalchemy_url(url))
        async with engine.connect() as conn:
            diff = await conn.run_sync(
                lambda sync: compare_metadata(MigrationContext.configure(sync), SQLModel.metadata)
            )
        await engine.dispose()
        return diff

    return asyncio.run(compare())


def test_migrations_produce_exactly_the_models_schema(postgres_url):
    url = create_database(postgres_url)
    db.migrate(url)
    assert schema_differences(url) == []
    db.migrate(url)  # idempotent: a second run has nothing to do
    assert schema_differences(url) == []


def test_claim_query_walks_the_claimable_index(postgres_url):
    url = create_database(postgres_url)
    db.migrate(url)
    key = sql(
        url,
        "INSERT INTO api_keys (name, role, key_hash, prefix) "
        "VALUES ('k', 'worker', 'h', 'p') RETURNING id",
    )[0]["id"]
    worker = sql(
        url,
        "INSERT INTO workers (api_key_id, name, engine, device, batch_size, "
        "models, kinds) VALUES ($1, 'w', 'e', 'cpu', 1, '{tiny.en}', "
        "'{chunk,transcribe}') RETURNING id",
        key,
    )[0]["id"]
    sql(
        url,
        "INSERT INTO transcriptions (id, api_key_id, state, source_key, source_bytes, "
        "options, model, priority) VALUES ($1, $2, 'running', 's', 1, '{}', 'tiny.en', 0)",
        uuid.uuid4(),
        key,
    )
    sql(
        url,
        "INSERT INTO jobs (transcription_id, kind, state, seq, model, priority, "
        "submitted_at, max_attempts) SELECT id, 'transcribe', CASE WHEN s % 10 = 0 "
        "THEN 'queued' ELSE 'succeeded' END, s, 'tiny.en', 0, now(), 3 "
        "FROM transcriptions, generate_series(1, 20000) AS s",
    )
    sql(url, "ANALYZE jobs")
    plan = sql(
        url,
        "EXPLAIN "
        + queue.CLAIM.replace("$1", f"'{worker}'::uuid")
        .replace("$2", f"'{key}'::uuid")
        .replace("$3", "10")
        .replace("$4", "30")
        .replace("$5", "NULL")
        .replace("$6", "60"),
    )
    text = "\n".join(row["QUERY PLAN"] for row in plan)
    assert "ix_jobs_claimable" in text, text
    assert "Seq Scan on jobs" not in text, text
