"""Background duties. Every server process wakes its long-polling claims when work may
have arrived without a NOTIFY; the leader (server/leadership.py) rescues jobs whose
last lease expired, merges transcripts whose last completion did not get to, and
expires old transcriptions."""

from __future__ import annotations

import asyncio
import logging

import asyncpg

from server.board import Board
from server.doorbell import Doorbell
from server.storage import Storage

log = logging.getLogger(__name__)


async def poll(board: Board, doorbell: Doorbell, every_seconds: float) -> None:
    """The fallback NOTIFY cannot be: backoffs ending and leases expiring send none."""
    while True:
        await asyncio.sleep(every_seconds)
        try:
            await board.fanout.refresh_statistics()
            if doorbell.waiting:
                doorbell.ring(await board.queue.count_claimable(doorbell.waiting))
        except (OSError, asyncpg.PostgresError) as exc:
            log.warning("board poll failed, trying again: %s", exc)


async def sweep(board: Board, every_seconds: float) -> None:
    """What no request finishes: jobs whose last lease expired are dead, and a transcript
    whose last completion did not get to merge it (the server stopped) is merged."""
    while True:
        await asyncio.sleep(every_seconds)
        try:
            if await board.queue.rescue_exhausted():
                log.info("jobs whose last lease expired were marked dead")
            if await board.fanout.merge_unmerged():
                log.info("merged transcripts whose last completion did not")
        except Exception:  # a merge's storage or a bug: the sweep itself must go on
            log.exception("board sweep failed, trying again")


async def expire(board: Board, storage: Storage, max_age_seconds: float) -> None:
    """Retention (SCRIBEFARM_RETENTION_DAYS): deletes finished transcriptions older than
    it, with their stored objects, a batch at a time."""
    every_seconds = min(600.0, max(1.0, max_age_seconds / 10))
    while True:
        try:
            while keys := await board.transcriptions.expire(max_age_seconds):
                for key in keys:
                    await storage.delete(key)
        except (OSError, asyncpg.PostgresError) as exc:
            log.warning("retention pass failed, trying again later: %s", exc)
        await asyncio.sleep(every_seconds)
