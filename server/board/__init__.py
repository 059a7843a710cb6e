"""The job board: the only package that runs SQL against the board's tables.

Every statement names the index it relies on. Lease times come from the database
clock (now()), never from a worker's clock. Writes that name a lease are fenced:
they change a row only while that lease is the job's current one. One lock order
(locks.py), so no two transactions can deadlock.

Its parts share one connection pool:
- queue.py: workers, claims, leases, completions and failures (the job state machine);
- fanout.py: a plan's transcribe jobs queued (fan-out), their results merged (fan-in);
- transcriptions.py: the transcription life cycle, from submission to deletion;
- cache.py: earlier chunk results, scoped to their owner;
- limits.py and keys.py: what a key may submit, and the keys themselves;
- reads.py: what the dashboard, the autoscaler and /metrics read;
- errors.py: what the board refuses (server/errors.py answers it over HTTP).
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING

import asyncpg

from server.board.cache import ChunkCache
from server.board.fanout import FanOut
from server.board.keys import Keys
from server.board.locks import JOBS_CHANNEL
from server.board.queue import Queue
from server.board.reads import ReadModels
from server.board.transcriptions import Transcriptions
from server.settings import Settings

if TYPE_CHECKING:  # at run time storage is handed in: no import circle through it
    from server.storage import Storage

__all__ = ["JOBS_CHANNEL", "Board", "connected", "init_connection"]


class Board:
    """The board's parts over one connection pool."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings, storage: Storage | None = None):
        self.pool = pool
        self.keys = Keys(pool)
        self.cache = ChunkCache(pool)
        self.transcriptions = Transcriptions(pool, settings, storage)
        self.fanout = FanOut(pool, settings, self.transcriptions)
        self.queue = Queue(pool, settings, self.transcriptions, self.fanout)
        self.reads = ReadModels(pool, settings)

    async def ping(self) -> None:
        await self.pool.fetchval("SELECT 1")


async def init_connection(conn: asyncpg.Connection) -> None:
    """JSON columns travel as Python objects."""
    for kind in ("json", "jsonb"):
        await conn.set_type_codec(kind, encoder=json.dumps, decoder=json.loads, schema="pg_catalog")


@asynccontextmanager
async def connected(settings: Settings) -> AsyncIterator[Board]:
    """The board over one connection, its schema migrated first: for the CLI."""
    from server import db

    url = db.database_url(settings)
    await asyncio.to_thread(db.migrate, url)
    pool = await db.create_pool(url, 1, init_connection)
    try:
        yield Board(pool, settings)
    finally:
        await pool.close()
