"""The `local` provider: worker processes on this machine (`scribefarm up` uses it).

Each worker it starts runs `scribefarm worker --exit-when-idle`, with its share of the
cores (as `scribefarm up` sizes them), the board's URL (SCRIBEFARM_PUBLIC_URL) and a
worker key (SCRIBEFARM_AUTOSCALER_WORKER_KEY) in its environment, never on its command
line where `ps` would show it.
"""

from __future__ import annotations

import asyncio
import itertools
import logging
import os
import subprocess
from dataclasses import dataclass, field

from server.local import SCRIBEFARM, local_worker_shape
from server.settings import Settings

log = logging.getLogger(__name__)

STOP_GRACE_SECONDS = 35.0  # a worker finishes or gives back its jobs within 30 s of SIGTERM


@dataclass
class LocalProvider:
    server_url: str
    worker_key: str
    idle_seconds: float
    threads: int
    processes: list[subprocess.Popen] = field(default_factory=list)
    names: itertools.count = field(default_factory=lambda: itertools.count(1))

    @classmethod
    def from_settings(cls, settings: Settings) -> LocalProvider:
        if not (settings.public_url and settings.autoscaler_worker_key):
            raise ValueError(
                "SCRIBEFARM_AUTOSCALER=local starts workers that need the board's URL "
                "(SCRIBEFARM_PUBLIC_URL) and a worker key (SCRIBEFARM_AUTOSCALER_WORKER_KEY; "
                "make one with `scribefarm keys create --role worker`)"
            )
        _, threads = local_worker_shape(settings.max_workers)
        return cls(
            server_url=settings.public_url,
            worker_key=settings.autoscaler_worker_key.get_secret_value(),
            idle_seconds=settings.autoscaler_idle_seconds,
            threads=threads,
        )

    async def running(self) -> int:
        self.processes = [p for p in self.processes if p.poll() is None]
        return len(self.processes)

    async def start(self, count: int) -> int:
        for _ in range(count):
            self.processes.append(self._spawn(f"autoscaled-{next(self.names)}"))
        return count

    def _spawn(self, name: str) -> subprocess.Popen:
        args = [SCRIBEFARM, "worker", "--server", self.server_url, "--name", name]
        args += ["--threads", str(self.threads), "--exit-when-idle", f"{self.idle_seconds:g}"]
        env = {**os.environ, "SCRIBEFARM_KEY": self.worker_key}
        log.info("starting local worker %s", name)
        return subprocess.Popen(args, env=env)

    async def stop_all(self) -> int:
        """SIGTERM: each worker finishes what it holds (or gives it back) and exits."""
        alive = [p for p in self.processes if p.poll() is None]
        for process in alive:
            process.terminate()
        await asyncio.gather(*(asyncio.to_thread(self._reap, p) for p in alive))
        return len(alive)

    @staticmethod
    def _reap(process: subprocess.Popen) -> None:
        try:
            process.wait(STOP_GRACE_SECONDS)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()

    async def close(self) -> None:
        await self.stop_all()
