"""Job board benchmark: claim+complete cycles per second and claim latency, over HTTP.

Simulated workers (asyncio + httpx, an instant engine) drive a real `scribefarm server`
process and its PostgreSQL through the worker protocol. PgQueuer, dequeuing on the same
PostgreSQL, is the peer figure. Prints a table and records it in bench/RESULTS.md.

    .venv/bin/python -m bench.board                       # full run, a few minutes
    .venv/bin/python -m bench.board --quick               # smoke check, writes nothing
    .venv/bin/python -m bench.board --database-url postgresql://...   # an external server
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import shutil
import signal
import ssl
import sys
import tempfile
import time
import uuid
from collections.abc import AsyncIterator, Callable
from dataclasses import dataclass, field
from datetime import timedelta
from pathlib import Path
from typing import Any
from urllib.parse import urlsplit

import asyncpg
import httpx
import psutil

from bench import machine
from bench.results import publish, verdict
from server.settings import Settings
from shared.protocol import PROTOCOL_HEADER, PROTOCOL_VERSION
from tests.farm import BURST_SETTINGS, Server, with_database

SECTION = "## Board (bench/board.py)"
PROTOCOL = {PROTOCOL_HEADER: PROTOCOL_VERSION}

WAIT_SECONDS = 5.0  # the long poll every simulated worker asks for
CHUNKS_PER_TRANSCRIPTION = 500  # 500 one-minute chunks: an 8-hour recording
# The server runs with its defaults, but for the limits and deduplication: the bench
# submits thousands of the same bytes and registers ~1,200 simulated workers
# (tests/farm.py BURST_SETTINGS).
DB_POOL_SIZE: int = Settings.model_fields["db_pool_size"].default
MODEL: str = Settings.model_fields["default_model"].default  # what transcribe jobs need
PHASE_TIMEOUT = 180.0
PEER_MIN_JOBS = 2000  # fewer, and PgQueuer's start-up would weigh on its figure
WARMUP_SECONDS = 1.0  # connections opening, every worker's first claim
CLAIM_INDEX = "ix_jobs_claimable"  # the index the claim walks (server/board/queue.py)

TARGET_CYCLES = 2000.0
TARGET_P99_MS = 100.0
TARGET_IDLE_CPU = 5.0


# --- measurements ------------------------------------------------------------------


def percentile(values: list[float], p: float) -> float:
    """Nearest rank; NaN for no samples."""
    if not values:
        return math.nan
    ordered = sorted(values)
    return ordered[max(0, math.ceil(p / 100 * len(ordered)) - 1)]


def ms(seconds: float) -> str:
    return "n/a" if math.isnan(seconds) else f"{seconds * 1000:.1f}"


def num(value: float, digits: int = 0) -> str:
    return "n/a" if math.isnan(value) else f"{value:,.{digits}f}"


def cpu_seconds(proc: psutil.Process) -> float:
    times = proc.cpu_times()
    return times.user + times.system


class CpuMeter:
    """CPU time of process groups over a window, as % of one core (what `top` shows).

    Processes born inside the window (new PostgreSQL backends) count in full; the
    group functions are asked again at the end to find them. A group with no process
    to see (a remote PostgreSQL) is NaN, not 0.
    """

    def __init__(self, groups: dict[str, Callable[[], list[psutil.Process]]]):
        self.groups = groups
        self.before: dict[str, dict[tuple[int, float], float]] = {}
        self.started = 0.0

    def start(self) -> None:
        self.before = {name: self._sample(find) for name, find in self.groups.items()}
        self.started = time.monotonic()

    def stop(self) -> dict[str, float]:
        wall = time.monotonic() - self.started
        result = {}
        for name, find in self.groups.items():
            after, before = self._sample(find), self.before[name]
            used = sum(cpu - before.get(key, 0.0) for key, cpu in after.items())
            result[name] = 100.0 * used / wall if after or before else math.nan
        return result

    @staticmethod
    def _sample(find: Callable[[], list[psutil.Process]]) -> dict[tuple[int, float], float]:
        sample = {}
        for proc in find():
            with contextlib.suppress(psutil.Error):
                # pid and birth time: a recycled pid is another process
                sample[(proc.pid, proc.create_time())] = cpu_seconds(proc)
        return sample


def postmaster_group(data_directory: Path | None) -> Callable[[], list[psutil.Process]]:
    """The postmaster (first line of postmaster.pid) and its backends."""

    def find() -> list[psutil.Process]:
        if data_directory is None:
            return []
        try:
            pid = int((data_directory / "postmaster.pid").read_text().split()[0])
            master = psutil.Process(pid)
            return [master, *master.children(recursive=True)]
        except (OSError, ValueError, IndexError, psutil.Error):
            return []

    return find


# --- the board under test ------------------------------------------------------------


def stop_embedded_postgres(pgdata: Path) -> None:
    """The embedded PostgreSQL should stop with its last user; make sure it did, since
    the bench started it (fast shutdown, by its own pid)."""
    procs = postmaster_group(pgdata)()
    if not procs:
        return
    with contextlib.suppress(psutil.Error):
        procs[0].wait(5)
        return
    with contextlib.suppress(psutil.Error):
        procs[0].send_signal(signal.SIGINT)
        procs[0].wait(15)


async def create_database(admin_url: str, prefix: str) -> str:
    name = f"{prefix}_{uuid.uuid4().hex[:10]}"
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'CREATE DATABASE "{name}"')
    finally:
        await conn.close()
    return with_database(admin_url, name)


async def drop_database(admin_url: str, url: str) -> None:
    name = urlsplit(url).path.lstrip("/")
    conn = await asyncpg.connect(admin_url)
    try:
        await conn.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
    finally:
        await conn.close()


@contextlib.asynccontextmanager
async def running_board(database_url: str | None) -> AsyncIterator[Server]:
    """A fresh board: its own data directory, and its own database on an external server."""
    tmp = Path(tempfile.mkdtemp(prefix="scribefarm-bench-"))
    db_url = await create_database(database_url, "scribefarm_bench") if database_url else None
    board = Server(db_url, tmp, dict(BURST_SETTINGS))
    try:
        await asyncio.to_thread(board.start)
        yield board
    except BaseException:
        if board.process is not None:
            print(f"--- the server's log ends with:\n{board.log_tail()}", file=sys.stderr)
        raise
    finally:
        await asyncio.to_thread(board.stop)
        if not db_url:
            stop_embedded_postgres(tmp / "postgres")
        if database_url and db_url:
            await drop_database(database_url, db_url)
        shutil.rmtree(tmp, ignore_errors=True)


# --- the worker protocol, as a simulated worker speaks it ------------------------------


class Clients:
    """One httpx client per simulated worker, as real workers have: httpx polls every
    pooled connection on each request, so a shared pool of hundreds of connections
    costs more client CPU than the board it measures."""

    def __init__(self, board: Server, key: str, workers: int):
        headers = {**PROTOCOL, "Authorization": f"Bearer {key}"}
        timeout = httpx.Timeout(WAIT_SECONDS + 60)
        tls = ssl.create_default_context()  # unused on http://, but costly to build 500 times
        self.clients = [
            httpx.AsyncClient(base_url=board.url, headers=headers, timeout=timeout, verify=tls)
            for _ in range(workers)
        ]

    def __getitem__(self, worker: int) -> httpx.AsyncClient:
        return self.clients[worker % len(self.clients)]

    async def aclose(self) -> None:
        await asyncio.gather(*(c.aclose() for c in self.clients))


def ok(response: httpx.Response, status: int = 200) -> Any:
    if response.status_code != status:
        raise RuntimeError(f"{response.request.url.path}: {response.status_code} {response.text}")
    return response.json()


async def register(client: httpx.AsyncClient, name: str, kinds: list[str]) -> str:
    caps = {"name": name, "models": [MODEL], "kinds": kinds}
    return ok(await client.post("/v1/workers", json=caps), 201)["worker_id"]


async def register_many(clients: Clients, count: int, kinds: list[str]) -> list[str]:
    sem = asyncio.Semaphore(50)

    async def one(i: int) -> str:
        async with sem:
            return await register(clients[i], f"bench-{i}", kinds)

    return await asyncio.gather(*(one(i) for i in range(count)))


async def claim(
    client: httpx.AsyncClient, worker_id: str, max_jobs: int, wait: float
) -> list[dict[str, Any]]:
    body = {"worker_id": worker_id, "max_jobs": max_jobs, "wait_seconds": wait}
    return ok(await client.post("/v1/jobs/claim", json=body))["jobs"]


async def complete(client: httpx.AsyncClient, job: dict[str, Any], result: dict[str, Any]) -> None:
    body = {"lease_id": job["lease_id"], "result": result}
    ok(await client.post(f"/v1/jobs/{job['id']}/complete", json=body))


def chunk_plan(count: int, seconds: float = 60.0) -> dict[str, Any]:
    chunks = [{"index": i, "start": i * seconds, "end": (i + 1) * seconds} for i in range(count)]
    return {"kind": "chunk", "duration_seconds": count * seconds, "chunks": chunks}


def instant_transcript(job: dict[str, Any]) -> dict[str, Any]:
    """The instant engine: one segment per chunk, no time spent."""
    start, end = job["chunk"]["start"], job["chunk"]["end"]
    segment = {"start": start, "end": end, "text": f"chunk {job['chunk']['index']}"}
    return {
        "kind": "transcribe",
        "segments": [segment],
        "language": "en",
        "audio_seconds": end - start,
        "processing_seconds": 0,
    }


async def submit(client: httpx.AsyncClient) -> str:
    files = {"file": ("bench.wav", b"not really audio: the instant engine never reads it")}
    return ok(await client.post("/v1/transcriptions", files=files), 201)["id"]


@dataclass
class Loader:
    """Queues transcribe jobs the way users and workers do: submit, then a chunk job's
    plan fans out into one transcribe job per chunk."""

    submitter: httpx.AsyncClient
    worker: httpx.AsyncClient
    worker_id: str

    async def preload(self, jobs: int) -> list[str]:
        """Returns the transcriptions, to cancel what is left of them afterwards."""
        sizes = [CHUNKS_PER_TRANSCRIPTION] * (jobs // CHUNKS_PER_TRANSCRIPTION)
        if jobs % CHUNKS_PER_TRANSCRIPTION:
            sizes.append(jobs % CHUNKS_PER_TRANSCRIPTION)
        ids = [await submit(self.submitter) for _ in sizes]
        chunk_jobs: list[dict[str, Any]] = []
        while len(chunk_jobs) < len(sizes):
            want = min(256, len(sizes) - len(chunk_jobs))  # the protocol's max_jobs
            chunk_jobs += await claim(self.worker, self.worker_id, want, 0)
        for job, size in zip(chunk_jobs, sizes, strict=True):
            await complete(self.worker, job, chunk_plan(size))
        return ids

    async def cancel(self, transcription_ids: list[str]) -> None:
        """Clears the board for the next phase (finished ones answer 409: fine)."""
        for tid in transcription_ids:
            response = await self.submitter.post(f"/v1/transcriptions/{tid}/cancel")
            if response.status_code not in (200, 409):
                ok(response)


# --- phase 1: throughput with a full queue ----------------------------------------------


@dataclass
class Throughput:
    workers: int
    batch: int
    jobs: int  # completed inside the window
    seconds: float
    claim_latencies: list[float]
    cpu: dict[str, float]
    index_reads: float  # index entries a claim read, on average
    peer_rate: float = math.nan
    peer_sessions: int = 0
    peer_jobs: int = 0

    @property
    def rate(self) -> float:
        return self.jobs / self.seconds

    @property
    def board_ms_per_cycle(self) -> float:
        """Server + PostgreSQL CPU per cycle: what the board costs, whoever the clients are."""
        busy = board_cpu(self.cpu) / 100 * self.seconds
        return 1000 * busy / self.jobs


@dataclass
class Tally:
    """What the simulated workers did, timed, so that a window can be cut out of it."""

    target: int
    stopping: bool = False
    drained: asyncio.Event = field(default_factory=asyncio.Event)
    completions: list[float] = field(default_factory=list)
    claims: list[tuple[float, float]] = field(default_factory=list)  # (sent at, seconds)

    def window(self, start: float, end: float) -> tuple[int, list[float]]:
        done = sum(start <= t <= end for t in self.completions)
        return done, [s for t, s in self.claims if start <= t <= end]


async def drain_loop(client: httpx.AsyncClient, worker_id: str, batch: int, tally: Tally) -> None:
    """Complete what is held (the instant engine) and claim the next, in one request,
    until told to stop."""
    held: list[dict[str, Any]] = []
    while not tally.stopping:
        sent = time.perf_counter()
        jobs = await complete_and_claim(client, worker_id, held, batch)
        answered = time.perf_counter()
        tally.completions += [answered] * len(held)
        if jobs:
            tally.claims.append((sent, answered - sent))
        held = jobs
        if len(tally.completions) >= tally.target:
            tally.drained.set()


async def complete_and_claim(
    client: httpx.AsyncClient, worker_id: str, held: list[dict[str, Any]], max_jobs: int
) -> list[dict[str, Any]]:
    completions = [
        {"job_id": job["id"], "lease_id": job["lease_id"], "result": instant_transcript(job)}
        for job in held
    ]
    claim = {"worker_id": worker_id, "max_jobs": max_jobs, "wait_seconds": WAIT_SECONDS}
    reply = ok(
        await client.post("/v1/jobs/batch", json={"completions": completions, "claim": claim})
    )
    refused = [o for o in reply["outcomes"] if o["error"] is not None]
    if refused:
        raise RuntimeError(f"completions refused: {refused}")
    return reply["jobs"]


async def watch(tasks: list[asyncio.Task], seconds: float, until: asyncio.Event) -> None:
    """Waits `seconds` or until `until` is set, raising the first worker failure."""
    deadline = time.perf_counter() + seconds
    waiter = asyncio.create_task(until.wait())
    try:
        while not until.is_set() and (left := deadline - time.perf_counter()) > 0:
            done, _ = await asyncio.wait(
                [waiter, *tasks], timeout=left, return_when=asyncio.FIRST_COMPLETED
            )
            for task in done:
                if task is not waiter and not task.cancelled() and task.exception():
                    raise task.exception()  # type: ignore[misc]
    finally:
        waiter.cancel()


async def stop_all(tasks: list[asyncio.Task], grace: float) -> None:
    """Lets workers finish the cycle they are in, then cancels what still waits."""
    if tasks:
        await asyncio.wait(tasks, timeout=grace)
    for task in tasks:
        task.cancel()
    await asyncio.gather(*tasks, return_exceptions=True)


async def timed_window(
    tally: Tally, tasks: list[asyncio.Task], meter: CpuMeter, warmup: float, window: float
) -> tuple[float, float, dict[str, float]]:
    """Skips the ramp-up, then measures `window` seconds (less if the queue drains)."""
    start = time.perf_counter()
    meter.start()
    await watch(tasks, warmup, tally.drained)
    if not tally.drained.is_set():
        start = time.perf_counter()
        meter.start()
        await watch(tasks, window, tally.drained)
    end = tally.completions[-1] if tally.drained.is_set() else time.perf_counter()
    return start, end, meter.stop()


async def claim_index_reads(url: str) -> tuple[int, int] | None:
    """(scans, index tuples read) of the claim's index so far: how much of the queue a
    claim walks (flushed by PostgreSQL about once a second)."""
    conn = await asyncpg.connect(url)
    try:
        row = await conn.fetchrow(
            "SELECT idx_scan, idx_tup_read FROM pg_stat_user_indexes WHERE indexrelname = $1",
            CLAIM_INDEX,
        )
    finally:
        await conn.close()
    return (row["idx_scan"], row["idx_tup_read"]) if row else None


def per_scan(before: tuple[int, int] | None, after: tuple[int, int] | None) -> float:
    if before is None or after is None or after[0] == before[0]:
        return math.nan
    return (after[1] - before[1]) / (after[0] - before[0])


async def throughput(
    bench: Bench, workers: int, batch: int, jobs: int, window: float
) -> Throughput:
    async with bench.loader() as loader:
        transcriptions = await loader.preload(jobs)
    clients = Clients(bench.board, bench.worker_key, workers)  # after: no idle connections
    tasks: list[asyncio.Task] = []
    tally = Tally(target=jobs)
    try:
        ids = await register_many(clients, workers, ["transcribe"])
        reads_before = await claim_index_reads(bench.board.admin_url)
        tasks = [
            asyncio.create_task(drain_loop(clients[i], wid, batch, tally))
            for i, wid in enumerate(ids)
        ]
        start, end, cpu = await timed_window(tally, tasks, bench.meter, WARMUP_SECONDS, window)
        index_reads = per_scan(reads_before, await claim_index_reads(bench.board.admin_url))
    finally:
        tally.stopping = True
        # Let each worker finish its cycle: cancelling a transcription while its chunks
        # are being completed can deadlock in the server (its cancel takes the
        # transcription's row lock before the jobs', a completion the other way round).
        await stop_all(tasks, grace=WAIT_SECONDS + 60)
        await clients.aclose()
        async with bench.loader() as loader:
            await loader.cancel(transcriptions)
    done, latencies = tally.window(start, end)
    return Throughput(workers, batch, done, end - start, latencies, cpu, index_reads)


# --- phase 2: an idle board with long-polling workers, then work arriving ---------------


@dataclass
class Wakeups:
    """Timestamps that tie a job's arrival to the worker that receives it."""

    fanout: int
    submitted_at: float = 0.0
    fanout_sent: dict[str, float] = field(default_factory=dict)
    left: int = 0
    round_done: asyncio.Event = field(default_factory=asyncio.Event)
    submit_to_worker: list[float] = field(default_factory=list)
    fanout_to_worker: list[float] = field(default_factory=list)

    async def handle(self, client: httpx.AsyncClient, job: dict[str, Any], received: float):
        tid = job["transcription_id"]
        if job["kind"] == "chunk":
            self.submit_to_worker.append(received - self.submitted_at)
            self.fanout_sent[tid] = time.perf_counter()  # the jobs exist once this commits
            await complete(client, job, chunk_plan(self.fanout))
            return
        self.fanout_to_worker.append(received - self.fanout_sent[tid])
        await complete(client, job, instant_transcript(job))
        self.left -= 1
        if self.left == 0:
            self.round_done.set()


async def long_poll_loop(
    client: httpx.AsyncClient, worker_id: str, wake: Wakeups, wait: float
) -> None:
    # Workers start at different times: spread the first claims over one long poll,
    # so the re-polls come at their steady rate from the start.
    await asyncio.sleep(random.uniform(0, wait))
    while True:
        jobs = await claim(client, worker_id, 1, wait)
        received = time.perf_counter()
        for job in jobs:
            await wake.handle(client, job, received)


async def wake_rounds(submitter: httpx.AsyncClient, wake: Wakeups, rounds: int) -> None:
    """One transcription at a time, so each received job is tied to its round."""
    for _ in range(rounds):
        wake.left, wake.round_done = wake.fanout, asyncio.Event()
        wake.submitted_at = time.perf_counter()
        await submit(submitter)
        await asyncio.wait_for(wake.round_done.wait(), 60)
        await asyncio.sleep(0.3)  # let every worker go back to waiting


def real_worker_wait() -> float:
    """The long poll `scribefarm worker` asks for by default."""
    try:
        from worker.runner import WorkerConfig
    except ImportError:  # the worker's dependencies are not installed
        return 20.0
    return WorkerConfig.__dataclass_fields__["claim_wait_seconds"].default  # type: ignore[return-value]


@dataclass
class LongPoll:
    """An idle board's CPU, then wake-ups, with every worker long-polling `wait` s."""

    workers: int
    wait: float
    idle_seconds: float
    idle_cpu: dict[str, float]
    submit_to_worker: list[float]
    fanout_to_worker: list[float]
    fanout: int

    @property
    def wake_p99(self) -> float:
        return percentile(self.fanout_to_worker + self.submit_to_worker, 99)


async def long_poll(
    bench: Bench,
    clients: Clients,
    ids: list[str],
    wait: float,
    opts: Options,
) -> LongPoll:
    """Idle CPU over an empty queue, then wake-up rounds, the workers long-polling."""
    wake = Wakeups(opts.fanout)
    tasks = [
        asyncio.create_task(long_poll_loop(clients[i], wid, wake, wait))
        for i, wid in enumerate(ids)
    ]
    never = asyncio.Event()
    try:
        await watch(tasks, 1.0, never)
        bench.meter.start()
        await watch(tasks, opts.idle_seconds, never)
        idle = bench.meter.stop()
        await watch(tasks, wait, never)  # past every worker's first claim
        async with bench.loader() as loader:
            rounds = asyncio.create_task(wake_rounds(loader.submitter, wake, opts.rounds))
            finished = asyncio.Event()
            rounds.add_done_callback(lambda _t: finished.set())
            await watch([*tasks, rounds], PHASE_TIMEOUT, finished)
            await rounds
    finally:
        await stop_all(tasks, grace=0)
    return LongPoll(
        len(ids),
        wait,
        opts.idle_seconds,
        idle,
        wake.submit_to_worker,
        wake.fanout_to_worker,
        opts.fanout,
    )


async def long_polls(bench: Bench, workers: int, opts: Options) -> list[LongPoll]:
    """At the real worker's long poll, then at the bench's (more re-polls)."""
    clients = Clients(bench.board, bench.worker_key, workers)
    try:
        ids = await register_many(clients, workers, ["chunk", "transcribe"])
        waits = sorted({real_worker_wait(), WAIT_SECONDS}, reverse=True)
        return [await long_poll(bench, clients, ids, wait, opts) for wait in waits]
    finally:
        await clients.aclose()


# --- phase 3: the peer, PgQueuer on the same PostgreSQL ---------------------------------


async def pgqueuer_rate(url: str, jobs: int, sessions: int, batch: int) -> float:
    """Dequeue+complete jobs/s of PgQueuer's QueueManager with an instant entrypoint:
    `sessions` managers, one connection each, draining `jobs` enqueued beforehand."""
    from pgqueuer import Queries, QueueManager
    from pgqueuer.types import QueueExecutionMode

    admin = await asyncpg.connect(url)
    try:
        queries = Queries.from_asyncpg_connection(admin)
        for start in range(0, jobs, 5000):
            n = min(5000, jobs - start)
            await queries.enqueue(["bench"] * n, [None] * n, [0] * n)
    finally:
        await admin.close()

    conns = [await asyncpg.connect(url) for _ in range(sessions)]
    first: list[float] = []

    async def instant(_job: Any) -> None:
        if not first:
            first.append(time.perf_counter())

    managers = [QueueManager(Queries.from_asyncpg_connection(c)) for c in conns]
    for qm in managers:
        qm.entrypoint("bench")(instant)
    try:
        await asyncio.gather(
            *(
                qm.run(
                    mode=QueueExecutionMode.drain,
                    batch_size=batch,
                    dequeue_timeout=timedelta(seconds=1),
                )
                for qm in managers
            )
        )
        return jobs / (time.perf_counter() - first[0])  # until every completion is logged
    finally:
        await asyncio.gather(*(c.close() for c in conns))


async def install_pgqueuer(admin_url: str) -> str:
    from pgqueuer import Queries

    url = await create_database(admin_url, "pgqueuer_bench")
    conn = await asyncpg.connect(url)
    try:
        await Queries.from_asyncpg_connection(conn).install()
    finally:
        await conn.close()
    return url


# --- the run ---------------------------------------------------------------------------


@dataclass
class Bench:
    board: Server
    worker_key: str
    submit_key: str
    meter: CpuMeter

    @contextlib.asynccontextmanager
    async def loader(self) -> AsyncIterator[Loader]:
        """Fresh connections each phase: the server closes keep-alive connections idle
        for 5 s, and a request racing that close fails."""
        headers = {**PROTOCOL, "Authorization": f"Bearer {self.submit_key}"}
        submitter = httpx.AsyncClient(base_url=self.board.url, headers=headers, timeout=60)
        worker = Clients(self.board, self.worker_key, 1)
        try:
            loader_id = await register(worker[0], "bench-loader", ["chunk"])
            yield Loader(submitter, worker[0], loader_id)
        finally:
            await submitter.aclose()
            await worker.aclose()


@dataclass
class Options:
    workers: list[int]
    jobs: int
    seconds: float
    database_url: str | None
    quick: bool
    idle_seconds: float
    rounds: int
    fanout: int


@dataclass
class Report:
    options: Options
    machine: dict[str, str]
    rows: list[Throughput] = field(default_factory=list)
    long_polls: list[LongPoll] = field(default_factory=list)


@contextlib.asynccontextmanager
async def bench_setup(board: Server) -> AsyncIterator[Bench]:
    worker_key = await asyncio.to_thread(board.create_key, "worker")
    submit_key = await asyncio.to_thread(board.create_key, "submit")
    server = psutil.Process(board.process.pid)  # type: ignore[union-attr]
    meter = CpuMeter(
        {
            "bench": lambda: [psutil.Process()],
            "server": lambda: [server, *server.children(recursive=True)],
            "postgres": postmaster_group(await data_directory(board.admin_url)),
        }
    )
    yield Bench(board, worker_key, submit_key, meter)


async def data_directory(url: str) -> Path | None:
    """Where the PostgreSQL lives, to find its processes (needs a superuser or
    pg_read_all_settings; without it PostgreSQL's CPU is not measured)."""
    conn = await asyncpg.connect(url)
    try:
        return Path(await conn.fetchval("SHOW data_directory"))
    except asyncpg.PostgresError:
        return None
    finally:
        await conn.close()


async def run(opts: Options) -> Report:
    report = Report(opts, machine_info())
    async with running_board(opts.database_url) as board, bench_setup(board) as bench:
        report.machine["postgres"] = await postgres_version(board.admin_url)
        # First, while the board is at rest: after the throughput runs, autovacuum
        # works through their dead rows for a while, which is not an idle board.
        report.long_polls = await long_polls(bench, max(opts.workers), opts)
        print("long-poll phase done", flush=True)
        for batch in (1, 8):
            for workers in opts.workers:
                row = await throughput(bench, workers, batch, opts.jobs, opts.seconds)
                print(progress(row), flush=True)
                report.rows.append(row)
        await run_peer(board.admin_url, report)
    report.machine["load_end"] = machine.load_average()
    return report


async def run_peer(admin_url: str, report: Report) -> None:
    """PgQueuer with as many database sessions as our server can use for the same
    number of workers (its pool), and the same batch size."""
    url = await install_pgqueuer(admin_url)
    try:
        for row in report.rows:
            row.peer_sessions = min(row.workers, DB_POOL_SIZE)
            row.peer_jobs = max(PEER_MIN_JOBS, row.jobs)  # as many as ours did, or more
            row.peer_rate = await pgqueuer_rate(url, row.peer_jobs, row.peer_sessions, row.batch)
            print(
                f"pgqueuer sessions={row.peer_sessions} batch={row.batch}: "
                f"{row.peer_rate:,.0f} jobs/s",
                flush=True,
            )
    finally:
        await drop_database(admin_url, url)


async def postgres_version(url: str) -> str:
    conn = await asyncpg.connect(url)
    try:
        return (await conn.fetchval("SHOW server_version")).split()[0]
    finally:
        await conn.close()


def progress(row: Throughput) -> str:
    return (
        f"workers={row.workers} max_jobs={row.batch}: {row.rate:,.0f} cycles/s, claim p50 "
        f"{ms(percentile(row.claim_latencies, 50))} ms p99 "
        f"{ms(percentile(row.claim_latencies, 99))} ms"
    )


def machine_info() -> dict[str, str]:
    """The shared machine description, plus the load average: other work on the machine
    takes cores from the board."""
    return {**machine.machine_info(), "load": machine.load_average()}


# --- the report ----------------------------------------------------------------------------


def throughput_table(rows: list[Throughput]) -> list[str]:
    lines = [
        "| workers | claim max_jobs | jobs done (s) | cycles/s | claim p50 ms | claim p99 ms "
        "| CPU % bench / server / postgres | board CPU ms/cycle | index entries read "
        "per claim | PgQueuer jobs/s (sessions) | ours / PgQueuer |",
        "|---:|---:|---:|---:|---:|---:|---|---:|---:|---:|---:|",
    ]
    for r in rows:
        cpu = " / ".join(num(r.cpu[k]) for k in ("bench", "server", "postgres"))
        lines.append(
            f"| {r.workers} | {r.batch} | {r.jobs:,} ({r.seconds:.1f}) | {r.rate:,.0f} "
            f"| {ms(percentile(r.claim_latencies, 50))} | {ms(percentile(r.claim_latencies, 99))} "
            f"| {cpu} | {num(r.board_ms_per_cycle, 2)} | {num(r.index_reads)} "
            f"| {r.peer_rate:,.0f} ({r.peer_sessions}) "
            f"| {r.rate / r.peer_rate:.2f} |"
        )
    return lines


def board_cpu(cpu: dict[str, float]) -> float:
    """Server + PostgreSQL; the server alone when PostgreSQL's processes are not visible."""
    return cpu["server"] + (0.0 if math.isnan(cpu["postgres"]) else cpu["postgres"])


def long_poll_lines(polls: list[LongPoll]) -> list[str]:
    lines = [
        "| workers' wait_seconds | idle board CPU, % of one core (server + postgres) "
        "| submit → worker holds the chunk job, p50 / p99 ms "
        "| fan-out → workers hold the new jobs, p50 / p99 ms |",
        "|---|---:|---:|---:|",
    ]
    for lp in polls:
        who = "real worker's default" if lp.wait == real_worker_wait() else "bench's"
        cpu = lp.idle_cpu
        lines.append(
            f"| {lp.wait:g} ({who}) | **{board_cpu(cpu):.1f}** ({num(cpu['server'], 1)} + "
            f"{num(cpu['postgres'], 1)}) | {ms(percentile(lp.submit_to_worker, 50))} / "
            f"{ms(percentile(lp.submit_to_worker, 99))} ({len(lp.submit_to_worker)} samples) "
            f"| {ms(percentile(lp.fanout_to_worker, 50))} / "
            f"{ms(percentile(lp.fanout_to_worker, 99))} ({len(lp.fanout_to_worker)} samples) |"
        )
    return lines


def targets(report: Report) -> list[str]:
    unbatched = [r for r in report.rows if r.batch == 1]
    best = max(unbatched, key=lambda r: r.rate)
    most = max(unbatched, key=lambda r: r.workers)
    loaded_p99 = percentile(most.claim_latencies, 99)
    lines = [
        "| target | measured | |",
        "|---|---|---|",
        f"| ≥ {TARGET_CYCLES:,.0f} claim+complete cycles/s (max_jobs=1) | {best.rate:,.0f} "
        f"(at {best.workers} workers) | {verdict(best.rate >= TARGET_CYCLES)} |",
        f"| p99 claim latency < {TARGET_P99_MS:.0f} ms, {most.workers} workers, full queue "
        f"| {ms(loaded_p99)} ms | {verdict(loaded_p99 * 1000 < TARGET_P99_MS)} |",
    ]
    for lp in report.long_polls:
        lines.append(
            f"| p99 wake-up latency < {TARGET_P99_MS:.0f} ms, {lp.workers} workers "
            f"long-polling (wait_seconds={lp.wait:g}) | {ms(lp.wake_p99)} ms "
            f"| {verdict(lp.wake_p99 * 1000 < TARGET_P99_MS)} |"
        )
    for lp in report.long_polls:
        idle = board_cpu(lp.idle_cpu)
        lines.append(
            f"| idle board CPU < {TARGET_IDLE_CPU:g} % with {lp.workers} workers "
            f"long-polling (wait_seconds={lp.wait:g}) | {idle:.1f} % "
            f"| {verdict(idle < TARGET_IDLE_CPU)} |"
        )
    return lines


NOTES = """\
How it was measured:
- A real `scribefarm server` process (one uvicorn process, default settings: a pool of
  {pool} database connections) and its PostgreSQL; simulated workers are asyncio tasks
  in the bench process speaking the worker protocol over HTTP with httpx, with an
  instant engine, one httpx client each. Each run queues {jobs:,} jobs the real way
  before it starts (transcriptions submitted over the API, their chunk jobs completed
  with {chunks}-chunk plans: fan-out), skips {warmup:g} s of ramp-up, then counts the
  cycles completed in a {seconds:g} s window (shorter if the queue drains); what is left
  is canceled. A cycle is one job claimed and completed; each completion fans in
  (one statement that locks its transcription's row) and the last one merges the
  transcript. As the real worker does, each simulated worker sends the completions of
  the jobs it holds with its next claim, in one request (`POST /v1/jobs/batch`).
- Claim latency is that request's round trip when it returned work (the completions it
  carried included). Each worker long-polls with `wait_seconds={wait:g}`.
- Everything shares the machine's {cpus} cores: the CPU column (% of one core, as `top`
  shows it) splits them between the simulated workers (bench), the server and
  PostgreSQL. "Board CPU ms/cycle" is server + PostgreSQL CPU per cycle: the cost of a
  cycle to the board, wherever the workers run. "Index entries read per claim" is
  `idx_tup_read / idx_scan` of `{index}` over the run: near the number of workers
  when a claim walks the index in order, near the queue's length when it reads all of
  it (a bitmap scan and a sort).
- Idle, measured first on a board at rest: every worker long-polls an empty queue
  (their first claims spread over one long poll, as workers start at different
  times); server + PostgreSQL CPU over {idle:g} s. Measured at the real worker's long
  poll and at the bench's shorter one.
- Wake-up: with the long-polling workers waiting and nothing queued, a transcription is
  submitted (clock starts when the POST starts) and a waiting worker receives its chunk
  job; that worker completes it with a {fanout}-chunk plan (clock starts when the
  complete request is sent) and waiting workers receive the new jobs. Both include the
  producing request's own time, so they are upper bounds of the wake-up.
- Peer: PgQueuer {pgq} on the same PostgreSQL (its own database), `QueueManager`s in drain
  mode with an instant entrypoint, one connection each, as many as our server's pool
  can use for that many workers, with the same batch size; as many jobs as ours
  completed (at least {peer_min:,}), enqueued beforehand, timed from the first job to
  the last completion logged. It is an in-process library
  running its SQL directly (and buffers completion writes); ours pays for HTTP, JSON,
  authentication and the transcription bookkeeping (fan-in) on every cycle, so the
  ratio shows what the HTTP board costs over a bare PostgreSQL queue."""


def render(report: Report) -> str:
    m, o = report.machine, report.options
    from importlib.metadata import version

    lines = [
        f"Run {m['date']} at commit {m['commit']}: {m['cpus']} × {m['cpu']}, {m['ram']} RAM, "
        f"Python {m['python']}, PostgreSQL {m.get('postgres', '?')} "
        f"({'external' if o.database_url else 'embedded'}); load average (1, 5, 15 min) "
        f"{m['load']} at start, {m['load_end']} at the end.",
        f"Command: `.venv/bin/python -m bench.board --workers "
        f"{','.join(map(str, o.workers))} --jobs {o.jobs} --seconds {o.seconds:g}`",
        "",
        "### Targets",
        "",
        *targets(report),
        "",
        "### Throughput: claim → complete, queue full",
        "",
        *throughput_table(report.rows),
        "",
        "### Long-polling workers",
        "",
        *long_poll_lines(report.long_polls),
        "",
        NOTES.format(
            pool=DB_POOL_SIZE,
            chunks=CHUNKS_PER_TRANSCRIPTION,
            wait=WAIT_SECONDS,
            cpus=m["cpus"],
            fanout=o.fanout,
            idle=o.idle_seconds,
            pgq=version("pgqueuer"),
            jobs=o.jobs,
            warmup=WARMUP_SECONDS,
            seconds=o.seconds,
            peer_min=PEER_MIN_JOBS,
            index=CLAIM_INDEX,
        ),
    ]
    return "\n".join(lines) + "\n"


def parse(argv: list[str] | None) -> Options:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--workers", default="10,100,500", help="concurrent simulated workers")
    p.add_argument(
        "--jobs", type=int, default=10_000, help="jobs queued before each throughput run"
    )
    p.add_argument("--seconds", type=float, default=12.0, help="timed window of a throughput run")
    p.add_argument("--quick", action="store_true", help="a small run; RESULTS.md untouched")
    p.add_argument("--database-url", help="an external PostgreSQL (a database is created)")
    p.add_argument("--idle-seconds", type=float, default=10.0)
    p.add_argument("--rounds", type=int, default=40, help="wake-up rounds")
    p.add_argument("--fanout", type=int, default=16, help="transcribe jobs per wake-up round")
    a = p.parse_args(argv)
    workers = [int(w) for w in a.workers.split(",")]
    if a.quick:
        workers = [min(w, 50) for w in workers[:2]]
        a.jobs, a.seconds, a.idle_seconds, a.rounds = 1000, 3.0, 3.0, 5
    return Options(
        workers, a.jobs, a.seconds, a.database_url, a.quick, a.idle_seconds, a.rounds, a.fanout
    )


def main(argv: list[str] | None = None) -> None:
    opts = parse(argv)
    report = event_loop_run(run(opts))
    publish(SECTION, render(report), record=not opts.quick)


def event_loop_run(coro: Any) -> Report:
    """uvloop when present: the simulated workers share the cores with the board, so
    their own overhead is kept low."""
    try:
        import uvloop
    except ImportError:
        return asyncio.run(coro)
    return uvloop.run(coro)


if __name__ == "__main__":
    main()
