"""A real farm for the benchmarks: an embedded PostgreSQL, `scribefarm server` and its
worker processes, started the way the integration tests start them (tests/farm.py),
and speech from tests/speech.py."""

from __future__ import annotations

import subprocess
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from bench.machine import CpuWatch
from tests.farm import BURST_SETTINGS, Postgres, Server, WorkerProcess, create_database, submit
from tests.speech import MediaFactory

# Synthesized speech is named by content: kept between runs, made once.
MEDIA_DIR = Path(tempfile.gettempdir()) / "scribefarm-bench-media"


def media() -> MediaFactory:
    return MediaFactory(MEDIA_DIR)


@dataclass
class Farm:
    """An embedded PostgreSQL, a `scribefarm server` on it, and its worker processes."""

    root: Path
    server: Server | None = None
    workers: list[WorkerProcess] = field(default_factory=list)
    keys: dict[str, str] = field(default_factory=dict)
    client: httpx.Client | None = None
    batch_size: int | None = None  # the running workers' --batch-size
    settings: dict[str, object] = field(default_factory=dict)  # the server's, over BURST's
    _pg: Postgres | None = None

    def start(self) -> Farm:
        self.root.mkdir(parents=True, exist_ok=True)
        self._pg = Postgres(self.root / "postgres")
        url = create_database(self._pg.uri)
        settings = {k: str(v) for k, v in {**BURST_SETTINGS, **self.settings}.items()}
        self.server = Server(url, self.root / "farm", settings).start()
        self.keys = {role: self.server.create_key(role) for role in ("submit", "worker")}
        self.client = self.server.client(self.keys["submit"], timeout=120)
        return self

    def start_workers(self, count: int, threads: int, batch_size: int) -> list[float]:
        """Starts `count` workers and waits until each has loaded its model and registered;
        returns each one's start → registered seconds (process start, imports, model load)."""
        assert self.server is not None
        self.stop_workers()
        options = ("--threads", str(threads), "--batch-size", str(batch_size))
        tag = f"t{threads}b{batch_size}-{int(time.time() * 1000) % 100000}"
        started = time.time()
        self.workers = [
            WorkerProcess(self.server, self.keys["worker"], f"{tag}-w{i}", options).start()
            for i in range(count)
        ]
        names = [w.name for w in self.workers]
        registered = self.wait_registered(names, timeout=120)
        self.batch_size = batch_size
        return [registered[name] - started for name in names]

    def wait_registered(
        self, names: list[str], timeout: float, others: Sequence[subprocess.Popen] = ()
    ) -> dict[str, float]:
        """When each named worker registered; fails early when one of the farm's worker
        processes, or of `others` (processes running workers of their own), exits."""
        assert self.server is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.server.sql(
                "SELECT name, registered_at FROM workers WHERE name = ANY($1)", names
            )
            if len(rows) == len(names):
                return {r["name"]: r["registered_at"].timestamp() for r in rows}
            for w in self.workers:
                if w.process is not None and w.process.poll() is not None:
                    raise RuntimeError(f"worker {w.name} exited:\n{w.log[-3000:]}")
            for process in others:
                if process.poll() is not None:
                    raise RuntimeError(f"worker process {process.args} exited")
            time.sleep(0.2)
        raise TimeoutError(f"workers {names} did not register within {timeout} s")

    def cpu_watch(self) -> CpuWatch:
        return CpuWatch(self.root / "postgres")

    def worker_pids(self) -> dict[str, int]:
        return {w.name: w.process.pid for w in self.workers if w.process is not None}

    def submit(self, path: Path, **options: Any) -> tuple[str, float]:
        """Uploads `path`; returns the transcription id and when the upload began."""
        assert self.client is not None
        began = time.time()
        response = submit(self.client, path.read_bytes(), path.name, **options)
        if response.status_code != 201:
            raise RuntimeError(f"submission failed: {response.status_code} {response.text}")
        return response.json()["id"], began

    def wait_finished(self, ids: list[str], timeout: float) -> dict[str, dict[str, Any]]:
        """Polls the board's rows until every transcription has finished."""
        assert self.server is not None
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            rows = self.server.sql(
                "SELECT id::text, state, error, finished_at FROM transcriptions "
                "WHERE id::text = ANY($1)",
                ids,
            )
            if len(rows) == len(ids) and all(r["finished_at"] for r in rows):
                return {r["id"]: r for r in rows}
            time.sleep(0.1 if len(ids) == 1 else 0.5)
        raise TimeoutError(f"{len(ids)} transcription(s) not finished within {timeout} s")

    def transcript_text(self, tid: str) -> str:
        assert self.client is not None
        response = self.client.get(f"/v1/transcriptions/{tid}/transcript")
        response.raise_for_status()
        return response.json()["text"]

    def clear_cache(self) -> None:
        """Earlier results of the same audio would be reused without running the model."""
        assert self.server is not None
        self.server.sql("DELETE FROM chunk_cache")

    def stop_workers(self) -> None:
        for w in self.workers:
            w.stop()
        self.workers, self.batch_size = [], None

    def stop(self) -> None:
        self.stop_workers()
        if self.client is not None:
            self.client.close()
        if self.server is not None:
            self.server.stop()
        if self._pg is not None:
            self._pg.close()
