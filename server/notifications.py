"""The board's NOTIFYs, received on one dedicated LISTEN connection per server process
and handed to whoever subscribed to each channel.

NOTIFY is only a hint: while the connection is down nothing arrives, so subscribers
poll meanwhile (`listening` tells them how often) and are called back when it is up
again, to catch up on what they missed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable

import asyncpg

log = logging.getLogger(__name__)


class Notifications:
    def __init__(self) -> None:
        self._handlers: dict[str, list[Callable[[str], None]]] = defaultdict(list)
        self._on_connect: list[Callable[[], None]] = []
        self.listening = False

    def subscribe(
        self,
        channel: str,
        handler: Callable[[str], None],
        on_connect: Callable[[], None] | None = None,
    ) -> None:
        """`handler(payload)` for each NOTIFY on `channel`; `on_connect()` each time the
        connection is (re)established. Subscribe before `run` starts."""
        self._handlers[channel].append(handler)
        if on_connect:
            self._on_connect.append(on_connect)

    async def run(self, url: str, retry_seconds: float) -> None:
        """Listens until cancelled, reconnecting `retry_seconds` after a drop."""
        while True:
            try:
                await self._listen_until_closed(url)
            except (OSError, asyncpg.PostgresError) as exc:
                log.warning("notifications unavailable, polling meanwhile: %s", exc)
            finally:
                self.listening = False
            await asyncio.sleep(retry_seconds)

    async def _listen_until_closed(self, url: str) -> None:
        conn = await asyncpg.connect(url)
        closed = asyncio.Event()
        conn.add_termination_listener(lambda _conn: closed.set())
        try:
            for channel in self._handlers:
                await conn.add_listener(channel, self._dispatch)
            self.listening = True
            for catch_up in self._on_connect:
                catch_up()
            await closed.wait()
        finally:
            with contextlib.suppress(Exception):
                await conn.close()

    def _dispatch(self, _conn: object, _pid: int, channel: str, payload: str) -> None:
        for handler in self._handlers[channel]:
            handler(payload)
