"""The autoscaler, built into the server and off by default (SCRIBEFARM_AUTOSCALER).

Every SCRIBEFARM_AUTOSCALER_INTERVAL_SECONDS it reads the queue (one statement,
AUTOSCALER_QUEUE in server/board/reads.py), asks the policy how many workers that needs
(policy.py), and has its provider start the missing ones: `local` starts worker processes on this
machine, `fly` starts or creates Fly Machines. It never stops a worker to scale down:
the workers it starts exit by themselves after SCRIBEFARM_AUTOSCALER_IDLE_SECONDS
without work, which is how the pool returns to zero. Only when the board has had
nothing queued or leased for longer than that (plus a minute) does it stop what is
still running: a worker that failed to exit, holding no job.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from typing import Protocol

from server import metrics
from server.autoscaler.policy import QueueState, desired_workers
from server.board.reads import ReadModels
from server.settings import Settings

log = logging.getLogger(__name__)

# Leeway past the workers' own idle exit before a still-running one is a straggler:
# a long poll ends within 50 s, then the worker exits.
STRAGGLER_GRACE_SECONDS = 60.0


class Provider(Protocol):
    async def running(self) -> int:
        """Workers started or starting (not yet exited)."""

    async def start(self, count: int) -> int:
        """Starts up to `count` more workers; returns how many it started."""

    async def stop_all(self) -> int:
        """Stops every worker still running (only called while the board is idle)."""

    async def close(self) -> None: ...


class Autoscaler:
    def __init__(
        self,
        reads: ReadModels,
        provider: Provider,
        settings: Settings,
        clock: Callable[[], float] = time.monotonic,
    ):
        self.reads = reads
        self.provider = provider
        self.settings = settings
        self.clock = clock
        self.idle_since: float | None = None

    async def run(self) -> None:
        while True:
            try:
                await self.step()
            except Exception as exc:  # a provider or database hiccup: the next tick retries
                log.warning("autoscaler tick failed, trying again: %s", exc)
            await asyncio.sleep(self.settings.autoscaler_interval_seconds)

    async def step(self) -> int:
        """One tick: returns the number of workers wanted."""
        # The workers it starts run the default model: jobs for other models (GPU
        # workers' larger ones, say) are not theirs to drain.
        row = await self.reads.queue_state(
            metrics.SPEED_WINDOW_SECONDS, self.settings.default_model
        )
        state = QueueState(**dict(row))
        desired = desired_workers(
            state,
            target_seconds=self.settings.autoscaler_target_seconds,
            max_workers=self.settings.max_workers,
            assumed_speed=self.settings.autoscaler_assumed_speed,
        )
        running = await self.provider.running()
        metrics.AUTOSCALER_DESIRED.set(desired)
        metrics.AUTOSCALER_RUNNING.set(running)
        if desired > running:
            started = await self.provider.start(desired - running)
            log.info(
                "autoscaler: %d job(s) queued with %.0f s of audio want %d worker(s); "
                "%d running, started %d",
                state.queued_jobs,
                state.queued_audio_seconds,
                desired,
                running,
                started,
            )
        await self._stop_stragglers(state, running)
        return desired

    async def _stop_stragglers(self, state: QueueState, running: int) -> None:
        if not (state.idle and running):
            self.idle_since = None
            return
        now = self.clock()
        if self.idle_since is None:
            self.idle_since = now
        if now - self.idle_since > self.settings.autoscaler_idle_seconds + STRAGGLER_GRACE_SECONDS:
            stopped = await self.provider.stop_all()
            log.warning("autoscaler: stopped %d idle worker(s) that did not exit", stopped)
            self.idle_since = None


def from_settings(reads: ReadModels, settings: Settings) -> Autoscaler | None:
    if settings.autoscaler == "off":
        return None
    return Autoscaler(reads, open_provider(settings), settings)


def open_provider(settings: Settings) -> Provider:
    """The configured provider; a setting it needs and lacks stops the server, saying so."""
    if settings.autoscaler == "local":
        from server.autoscaler.local import LocalProvider

        return LocalProvider.from_settings(settings)
    from server.autoscaler.fly import FlyProvider

    return FlyProvider.from_settings(settings)
