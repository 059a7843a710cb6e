"""One server process at a time runs the board-wide duties (the autoscaler, retention,
rescuing dead jobs, the merge sweep): the one holding a session-level advisory lock on a
connection of its own. Every other replica serves HTTP and waits for the lock. When the
leader dies its connection closes, PostgreSQL releases the lock, and a waiting replica
takes it over at once; a leader that loses its connection stops its duties (the lock
went with the session).
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections.abc import Callable, Coroutine
from typing import Any

import asyncpg

log = logging.getLogger(__name__)

# The advisory lock's key: any bigint no other lock of the board uses (LOCK_KEY hashes
# text to an int4, so it never collides with a value this large).
LEADER_LOCK = 0x5C81BEFA6D

WAIT_SECONDS = 30

Duty = Callable[[], Coroutine[Any, Any, None]]


class Leadership:
    def __init__(self, url: str, duties: list[Duty], check_seconds: float) -> None:
        self.url = url
        self.duties = duties
        self.check_seconds = check_seconds
        self.leading = False

    async def run(self) -> None:
        """Waits for the lock and runs the duties while it holds it, until cancelled."""
        while True:
            try:
                await self._lead_when_possible()
            except (TimeoutError, OSError, asyncpg.PostgresError) as exc:
                log.warning("leadership: the database connection failed: %s", exc)
            await asyncio.sleep(self.check_seconds)

    async def _lead_when_possible(self) -> None:
        conn = await asyncpg.connect(self.url)
        try:
            # The wait gives up now and then, so a connection that died silently (no
            # TCP reset) is found out and replaced.
            await conn.execute(f"SET lock_timeout = '{WAIT_SECONDS}s'")
            while True:
                try:
                    await conn.execute("SELECT pg_advisory_lock($1)", LEADER_LOCK)
                    break
                except asyncpg.LockNotAvailableError:
                    await conn.fetchval("SELECT 1")  # alive: wait again
            await self._lead(conn)
        finally:
            with contextlib.suppress(Exception):
                await conn.close()

    async def _lead(self, conn: asyncpg.Connection) -> None:
        log.info("leading: this server runs the board-wide duties")
        self.leading = True
        duties = [asyncio.create_task(duty()) for duty in self.duties]
        try:
            while True:  # the lock lives as long as this connection: check it is alive
                await asyncio.sleep(self.check_seconds)
                await asyncio.wait_for(conn.fetchval("SELECT 1"), self.check_seconds)
        finally:
            self.leading = False
            for task in duties:
                task.cancel()
            await asyncio.gather(*duties, return_exceptions=True)
            log.info("no longer leading")
