"""The autoscaler's tick against a board and a provider that only record (no I/O)."""

import asyncio

import pytest

from server.autoscaler import STRAGGLER_GRACE_SECONDS, Autoscaler
from server.settings import Settings

SETTINGS = Settings(
    max_workers=3,
    autoscaler_target_seconds=60,
    autoscaler_assumed_speed=10,
    autoscaler_idle_seconds=30,
)


class Board:
    def __init__(self):
        self.row = {"queued_jobs": 0, "queued_audio_seconds": 0.0, "leased_jobs": 0}

    async def queue_state(self, window_seconds, model):
        return self.row


class Provider:
    def __init__(self):
        self.workers = 0
        self.calls: list[str] = []

    async def running(self):
        return self.workers

    async def start(self, count):
        self.calls.append(f"start {count}")
        self.workers += count
        return count

    async def stop_all(self):
        self.calls.append(f"stop {self.workers}")
        stopped, self.workers = self.workers, 0
        return stopped

    async def close(self):
        pass


def scaler(clock=lambda: 0.0):
    board, provider = Board(), Provider()
    return Autoscaler(board, provider, SETTINGS, clock=clock), board, provider


def test_starts_only_the_missing_workers_up_to_the_ceiling():
    autoscaler, board, provider = scaler()
    board.row = {"queued_jobs": 20, "queued_audio_seconds": 1200.0, "leased_jobs": 0}
    assert asyncio.run(autoscaler.step()) == 2
    assert asyncio.run(autoscaler.step()) == 2  # both running: nothing more
    board.row["queued_audio_seconds"] = 20 * 600.0
    assert asyncio.run(autoscaler.step()) == 3
    assert provider.calls == ["start 2", "start 1"]


def test_never_stops_a_worker_while_work_is_queued_or_leased():
    now = [0.0]
    autoscaler, board, provider = scaler(clock=lambda: now[0])
    provider.workers = 2
    board.row = {"queued_jobs": 0, "queued_audio_seconds": 0.0, "leased_jobs": 1}
    for now[0] in (0.0, 1000.0, 2000.0):
        assert asyncio.run(autoscaler.step()) == 0
    assert provider.calls == []


def test_stops_stragglers_only_after_the_idle_window_and_its_grace():
    now = [0.0]
    autoscaler, _, provider = scaler(clock=lambda: now[0])
    provider.workers = 2
    window = SETTINGS.autoscaler_idle_seconds + STRAGGLER_GRACE_SECONDS
    for now[0] in (0.0, window - 1, window):
        asyncio.run(autoscaler.step())
    assert provider.calls == []
    now[0] = window + 1
    asyncio.run(autoscaler.step())
    assert provider.calls == ["stop 2"]


def test_the_local_provider_says_what_it_lacks():
    from server.autoscaler.local import LocalProvider

    with pytest.raises(ValueError, match="SCRIBEFARM_PUBLIC_URL.*SCRIBEFARM_AUTOSCALER_WORKER_KEY"):
        LocalProvider.from_settings(Settings(autoscaler="local", public_url="http://127.0.0.1:1"))
