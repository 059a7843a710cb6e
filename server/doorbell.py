"""Wakes long-polling claims when work may have arrived.

NOTIFY from the database and a periodic poll both ring it; neither is trusted alone
(a NOTIFY can be missed while reconnecting, and backoffs and expired leases make work
claimable without one). Waiters wake first in, first out, only as many as there may
be jobs, so hundreds of idle workers do not all query the board at once.
"""

from __future__ import annotations

import asyncio
from collections import deque


class Doorbell:
    def __init__(self) -> None:
        self._waiters: deque[asyncio.Future[None]] = deque()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    async def wait(self, seconds: float) -> bool:
        """Waits until rung (True) or for `seconds` (False), whichever is first."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await asyncio.wait_for(waiter, seconds)
            return True
        except TimeoutError:
            return False
        finally:
            if not waiter.done():
                waiter.cancel()
            try:
                self._waiters.remove(waiter)
            except ValueError:
                pass

    def notified(self, payload: str) -> None:
        """A NOTIFY on the board's jobs channel: its payload is how many jobs were queued."""
        self.ring(int(payload) if payload.isdigit() else 1)

    def ring(self, count: int) -> None:
        woken = 0
        for waiter in list(self._waiters):
            if woken >= count:
                break
            if not waiter.done():
                waiter.set_result(None)
                woken += 1
