"""Background duties of every server process: listen for new work, wake long-polling
claims, and rescue jobs whose last lease expired."""

from __future__ import annotations

import asyncio
import contextlib
import logging

import asyncpg

from server.board import JOBS_CHANNEL, Board
from server.doorbell import Doorbell

log = logging.getLogger(__name__)


async def listen(url: str, doorbell: Doorbell, retry_seconds: float) -> None:
    """LISTEN for NOTIFYs on one dedicated connection; reconnect when it drops (the poll
    covers the gap)."""
    while True:
        try:
            await listen_until_closed(url, doorbell)
        except (OSError, asyncpg.PostgresError) as exc:
            log.warning("job notifications unavailable, polling meanwhile: %s", exc)
        await asyncio.sleep(retry_seconds)


async def listen_until_closed(url: str, doorbell: Doorbell) -> None:
    def on_notify(_conn, _pid, _channel, payload: str) -> None:
        doorbell.ring(int(payload) if payload.isdigit() else 1)

    conn = await asyncpg.connect(url)
    closed = asyncio.Event()
    conn.add_termination_listener(lambda _conn: closed.set())
    try:
        await conn.add_listener(JOBS_CHANNEL, on_notify)
        await closed.wait()
    finally:
        with contextlib.suppress(Exception):
            await conn.close()


async def poll(board: Board, doorbell: Doorbell, every_seconds: float) -> None:
    """The fallback NOTIFY cannot be: backoffs ending and leases expiring send none."""
    while True:
        await asyncio.sleep(every_seconds)
        try:
            await board.refresh_statistics()
            if await board.rescue_exhausted():
                log.info("jobs whose last lease expired were marked dead")
            if doorbell.waiting:
                doorbell.ring(await board.count_claimable(doorbell.waiting))
        except (OSError, asyncpg.PostgresError) as exc:
            log.warning("board poll failed, trying again: %s", exc)
