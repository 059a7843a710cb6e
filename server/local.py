"""A farm on this machine: the board's server and worker processes, for `scribefarm up`
and `scribefarm demo`."""

from __future__ import annotations

import asyncio
import json
import os
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

import httpx

from server.settings import Settings

SCRIBEFARM = str(Path(sys.executable).parent / "scribefarm")


def local_keys(settings: Settings) -> dict[str, str]:
    """An admin and a worker key for this machine's farm, made once and kept (0600) in
    the data directory."""
    path = settings.data_dir / "local-keys.json"
    if path.exists():
        return json.loads(path.read_text())
    keys = asyncio.run(create_keys(settings, ("admin", "worker")))
    path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(path, os.O_WRONLY | os.O_CREAT | os.O_TRUNC, 0o600)
    with os.fdopen(fd, "w") as f:
        json.dump(keys, f)
    return keys


async def create_keys(settings: Settings, roles: tuple[str, ...]) -> dict[str, str]:
    from server.board import connected

    async with connected(settings) as board:
        return {role: await board.keys.create(role, f"local {role}", None) for role in roles}


def wait_until_ready(url: str, server: subprocess.Popen, timeout: float) -> None:
    """Until the server at `url` answers /readyz; raises if it exits or time runs out."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if server.poll() is not None:
            raise RuntimeError(f"the server for {url} exited with status {server.returncode}")
        try:
            if httpx.get(url + "/readyz", timeout=1).status_code == 200:
                return
        except httpx.HTTPError:
            pass
        time.sleep(0.1)
    raise TimeoutError(f"the server did not become ready at {url} within {timeout:g} s")


@dataclass
class LocalFarm:
    settings: Settings
    host: str = "127.0.0.1"
    port: int = 8000
    processes: list[subprocess.Popen] = field(default_factory=list)

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    def start_server(self, timeout: float = 60, env: dict[str, str] | None = None) -> None:
        self._spawn("server", "--host", self.host, "--port", str(self.port), env=env)
        wait_until_ready(self.url, self.processes[0], timeout)

    def start_workers(self, count: int, key: str, threads: int) -> None:
        for i in range(count):
            self._spawn(
                "worker",
                "--server",
                self.url,
                "--threads",
                str(threads),
                "--name",
                f"local-{i + 1}",
                env={"SCRIBEFARM_KEY": key},  # not on the command line, where ps shows it
            )

    def _spawn(self, *args: str, env: dict[str, str] | None = None) -> None:
        environment = {**os.environ, "SCRIBEFARM_LOG_FORMAT": "text", **(env or {})}
        self.processes.append(subprocess.Popen([SCRIBEFARM, *args], env=environment))

    def stop(self, timeout: float = 30) -> None:
        """Workers first (SIGTERM: they finish or give back their jobs), then the server."""
        for process in reversed(self.processes):
            if process.poll() is None:
                process.terminate()
                try:
                    process.wait(timeout)
                except subprocess.TimeoutExpired:
                    process.kill()
        self.processes.clear()


def local_worker_shape(workers: int) -> tuple[int, int]:
    """How many local workers, with how many threads each: by default one single-threaded
    worker per core (bench/farm.py: two 1-thread workers finished a long file in 0.63 of
    the time one 2-thread worker took, each keeping its own batch busy)."""
    cores = os.cpu_count() or 1
    count = workers or cores
    return count, max(1, cores // count)
