"""The board's NOTIFYs, received on one dedicated LISTEN connection per server process
and handed to whoever subscribed to each channel.

FinishedWaiter is the server-wide waiter on one of them: requests that wait for a
transcription to finish (the OpenAI endpoint's) wait on it, not on a connection each.

NOTIFY is only a hint: while the connection is down nothing arrives, so subscribers
poll meanwhile (`listening` tells them how often) and are called back when it is up
again, to catch up on what they missed."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from collections import defaultdict
from collections.abc import Callable, Iterator
from uuid import UUID

import asyncpg

log = logging.getLogger(__name__)

# A transcription reached a final state; the payload is its id (migration 0003's
# trigger sends it, in the transaction that finishes it).
FINISHED_CHANNEL = "scribefarm_finished"


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


class FinishedWaiter:
    """Wakes requests waiting for a transcription to finish, on the server's one LISTEN
    connection however many requests wait."""

    def __init__(self, notifications: Notifications) -> None:
        self._events: dict[str, set[asyncio.Event]] = defaultdict(set)
        self._notifications = notifications
        notifications.subscribe(FINISHED_CHANNEL, self.finished, self.wake_all)

    @property
    def listening(self) -> bool:
        return self._notifications.listening

    @contextlib.contextmanager
    def watch(self, transcription_id: UUID) -> Iterator[asyncio.Event]:
        """An event set when the transcription may have finished. Watch before reading
        its state, so a NOTIFY between the read and the wait is not lost."""
        key, event = str(transcription_id), asyncio.Event()
        self._events[key].add(event)
        try:
            yield event
        finally:
            waiters = self._events.get(key)
            if waiters is not None:
                waiters.discard(event)
                if not waiters:
                    del self._events[key]

    def finished(self, transcription_id: str) -> None:
        for event in self._events.get(transcription_id, ()):
            event.set()

    def wake_all(self) -> None:
        for events in self._events.values():
            for event in events:
                event.set()
