"""Real parts for the tests: PostgreSQL databases, server processes, API clients."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx

from server.protocol import PROTOCOL_HEADER, PROTOCOL_VERSION

SCRIBEFARM = str(Path(sys.executable).parent / "scribefarm")
WORKER_HEADERS = {PROTOCOL_HEADER: PROTOCOL_VERSION}


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def with_database(url: str, name: str) -> str:
    parts = urlsplit(url)
    return urlunsplit((parts.scheme, parts.netloc, "/" + name, parts.query, parts.fragment))


def create_database(admin_url: str) -> str:
    name = "sf_test_" + uuid.uuid4().hex[:12]

    async def create() -> None:
        conn = await asyncpg.connect(admin_url)
        try:
            await conn.execute(f'CREATE DATABASE "{name}"')
        finally:
            await conn.close()

    asyncio.run(create())
    return with_database(admin_url, name)


def sql(url: str, query: str, *args: Any) -> list[dict[str, Any]]:
    """Runs one statement on the board's database (for assertions on its rows)."""

    async def run() -> list[dict[str, Any]]:
        conn = await asyncpg.connect(url)
        try:
            return [dict(r) for r in await conn.fetch(query, *args)]
        finally:
            await conn.close()

    return asyncio.run(run())


@dataclass
class Server:
    """A real `scribefarm server` process on a free loopback port."""

    database_url: str
    data_dir: Path
    settings: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SCRIBEFARM_")}
        env.update(
            DATABASE_URL=self.database_url,
            SCRIBEFARM_DATA_DIR=str(self.data_dir),
            SCRIBEFARM_LOG_FORMAT="text",
        )
        env.update({f"SCRIBEFARM_{k.upper()}": str(v) for k, v in self.settings.items()})
        return env

    def start(self) -> Server:
        self.data_dir.mkdir(parents=True, exist_ok=True)
        self.log_path = self.data_dir / f"server-{self.port}.log"
        log = open(self.log_path, "ab")  # noqa: SIM115 (kept open for the process)
        self.process = subprocess.Popen(
            [SCRIBEFARM, "server", "--host", "127.0.0.1", "--port", str(self.port)],
            env=self.env,
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        self.wait_ready()
        return self

    def wait_ready(self, timeout: float = 60) -> None:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                raise RuntimeError(f"server exited:\n{self.log_path.read_text()[-4000:]}")
            try:
                if httpx.get(self.url + "/readyz", timeout=1).status_code == 200:
                    return
            except httpx.HTTPError:
                pass
            time.sleep(0.1)
        raise TimeoutError(f"server not ready:\n{self.log_path.read_text()[-4000:]}")

    def stop(self, sig: int = signal.SIGTERM) -> None:
        if self.process and self.process.poll() is None:
            self.process.send_signal(sig)
            try:
                self.process.wait(15)
            except subprocess.TimeoutExpired:
                self.process.kill()
                self.process.wait()

    def cli(self, *args: str) -> str:
        result = subprocess.run(
            [SCRIBEFARM, *args], env=self.env, capture_output=True, text=True, timeout=120
        )
        assert result.returncode == 0, result.stderr + result.stdout
        return result.stdout

    def create_key(self, role: str) -> str:
        """Through the real CLI; the key is alone on the last line."""
        return self.cli("keys", "create", "--role", role).strip().splitlines()[-1]

    def client(self, key: str | None, **kwargs: Any) -> httpx.Client:
        headers = dict(WORKER_HEADERS)
        if key:
            headers["Authorization"] = f"Bearer {key}"
        return httpx.Client(base_url=self.url, headers=headers, timeout=60, **kwargs)

    def sql(self, query: str, *args: Any) -> list[dict[str, Any]]:
        return sql(self.database_url, query, *args)


def submit(client: httpx.Client, content: bytes, filename: str = "a.wav", **options: Any):
    data = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in options.items()}
    return client.post("/v1/transcriptions", files={"file": (filename, content)}, data=data)
