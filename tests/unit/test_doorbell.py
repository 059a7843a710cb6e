"""Waking long polls (server/doorbell.py): first in, first out, only as many as rung."""

from __future__ import annotations

import asyncio

from server.doorbell import Doorbell


def test_ringing_wakes_the_longest_waiting_first_and_only_as_many_as_rung():
    async def scenario() -> list[bool]:
        bell = Doorbell()
        waits = [asyncio.create_task(bell.wait(0.5)) for _ in range(3)]
        await asyncio.sleep(0.01)
        assert bell.waiting == 3
        bell.notified("2")  # a NOTIFY: two jobs queued
        woken = await asyncio.gather(*waits)
        assert bell.waiting == 0  # every waiter leaves the queue, woken or not
        return woken

    assert asyncio.run(scenario()) == [True, True, False]


def test_a_payload_that_is_not_a_count_wakes_one():
    async def scenario() -> list[bool]:
        bell = Doorbell()
        waits = [asyncio.create_task(bell.wait(0.3)) for _ in range(2)]
        await asyncio.sleep(0.01)
        bell.notified("")
        return await asyncio.gather(*waits)

    assert asyncio.run(scenario()) == [True, False]
