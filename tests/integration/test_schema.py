"""The migrations are the only way the schema changes: they must produce exactly the
models' schema (the statements' plans: test_query_plans.py)."""

from __future__ import annotations

import asyncio

from alembic.autogenerate import compare_metadata
from alembic.runtime.migration import MigrationContext
from sqlalchemy.ext.asyncio import create_async_engine
from sqlmodel import SQLModel

import server.models  # noqa: F401
from server import db
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


def test_the_queue_table_is_vacuumed_and_analyzed_after_one_percent_of_it_changes(postgres_url):
    url = create_database(postgres_url)
    db.migrate(url)
    [jobs] = sql(url, "SELECT reloptions FROM pg_class WHERE relname = 'jobs'")
    assert sorted(jobs["reloptions"]) == [
        "autovacuum_analyze_scale_factor=0.01",
        "autovacuum_vacuum_scale_factor=0.01",
    ]
