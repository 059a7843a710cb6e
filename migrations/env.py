"""Alembic environment: runs migrations over asyncpg, against the URL the caller gives."""

import asyncio

from alembic import context
from sqlalchemy.ext.asyncio import create_async_engine
from sqlmodel import SQLModel

import server.models  # noqa: F401  (registers the tables on SQLModel.metadata)

target_metadata = SQLModel.metadata


# Servers starting together must not migrate at once: a transaction-scoped advisory
# lock makes the second wait, then find nothing left to do.
MIGRATION_LOCK = 0x5C81BEFA


def run_in_transaction(connection) -> None:
    context.configure(connection=connection, target_metadata=target_metadata)
    with context.begin_transaction():
        connection.exec_driver_sql(f"SELECT pg_advisory_xact_lock({MIGRATION_LOCK})")
        context.run_migrations()


async def run_online() -> None:
    engine = create_async_engine(context.config.attributes["database_url"])
    async with engine.connect() as connection:
        await connection.run_sync(run_in_transaction)
    await engine.dispose()


asyncio.run(run_online())
