"""The chaos scenario, shared by tests/chaos (short, in CI) and bench/chaos.py (long).

A real farm: an embedded PostgreSQL of its own (so restarting it disturbs no other
test), a `scribefarm server` process, moto's S3 server in its own process behind a
fault-injecting HTTP proxy, and worker processes that each reach the server through
their own TCP proxy. First every file is transcribed without faults (the baseline);
then the same files are submitted again while an `Injector` thread, seeded, keeps
breaking things at random moments:

- `worker_kill`: SIGKILL a worker (one holding a lease when there is one) and start
  a new one in its place;
- `server_kill`: SIGKILL the server process and start it again on the same port and
  database;
- `postgres_restart`: stop PostgreSQL (`pg_ctl stop`, fast or immediate: the latter
  is a crash, with recovery at start), keep it down a moment, start it again;
- `storage_errors`: for some seconds the S3 proxy answers a share of requests with
  500 InternalError / 503 SlowDown (uploads, presigned reads, transcripts);
- `network_cut`: one worker's connection to the server is cut (resets, then a black
  hole) for longer than a lease, then restored.

Then `check_round` compares every transcript with its baseline and the board's
counters with its rows (its comments say why each check must hold).
"""

from __future__ import annotations

import contextlib
import dataclasses
import hashlib
import json
import random
import signal
import subprocess
import sys
import threading
import time
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, TypeVar

import httpx
import numpy as np

from tests.chaos.proxies import FaultyHttpProxy, ProxyLoop, TcpProxy
from tests.farm import Postgres, Server, WorkerProcess, create_database, free_port, sql
from tests.speech import PARAGRAPHS, MediaFactory, decode
from worker.audio import SAMPLE_RATE

T = TypeVar("T")
KINDS = ("worker_kill", "server_kill", "postgres_restart", "storage_errors", "network_cut")
LABELS = {
    "worker_kill": "SIGKILL a worker, start a new one",
    "server_kill": "SIGKILL the server, restart it (same port, same database)",
    "postgres_restart": "restart PostgreSQL (pg_ctl stop -m fast or immediate, then start)",
    "storage_errors": "object storage answers 500/503 to a share of requests for a while",
    "network_cut": "cut a worker off the server for longer than a lease",
}
MOTO_SERVER = str(Path(sys.executable).parent / "moto_server")
BUCKET = "scribefarm-chaos"
S3_KEYS = {"access_key_id": "chaos-access-key", "secret_access_key": "chaos-secret-key"}
# Compared between a file's baseline and chaos transcripts: everything merge() makes.
COMPARED = ("duration_seconds", "language", "text", "segments")


def log(message: str) -> None:
    print(message, flush=True)


@dataclass
class ChaosConfig:
    seed: int
    files: int = 30
    # Paragraphs per file, cycling over the files (each about 16 s of speech).
    paragraphs: tuple[int, ...] = (1, 2)
    target_chunk_seconds: float | None = None  # None: the server's default (60 s)
    workers: int = 4
    worker_options: tuple[str, ...] = ("--threads", "1", "--batch-size", "4")
    # Short leases and backoffs keep recovery fast. max_attempts is far above what
    # chaos can use up: every attempt a job loses is one claim lost to a fault (each
    # fault costs the jobs it touches an attempt or, for storage errors, a few), so a
    # low limit would make the test measure the limit, not the farm. Poison jobs, what
    # the limit is for, do not occur here.
    lease_seconds: float = 4.0
    retry_base_seconds: float = 0.5
    retry_max_seconds: float = 2.0
    max_attempts: int = 1000
    fault_gap: tuple[float, float] = (1.0, 3.0)  # seconds between two faults
    storage_error_rate: tuple[float, float] = (0.2, 0.6)
    storage_error_seconds: tuple[float, float] = (3.0, 10.0)
    server_down_seconds: tuple[float, float] = (0.0, 2.0)
    postgres_down_seconds: tuple[float, float] = (0.5, 3.0)
    cut_extra_seconds: tuple[float, float] = (1.0, 4.0)  # a cut lasts a lease plus this
    submit_gap: tuple[float, float] = (0.2, 0.8)  # between two chaos submissions
    round_timeout: float = 300.0

    @property
    def server_settings(self) -> dict[str, str]:
        return {
            "lease_seconds": str(self.lease_seconds),
            "retry_base_seconds": str(self.retry_base_seconds),
            "retry_max_seconds": str(self.retry_max_seconds),
            "max_attempts": str(self.max_attempts),
            # Each round submits the same files again: dedup would answer them from the
            # baseline without any work.
            "dedup": "false",
            # Every transcript goes to the bucket, through the faulty proxy too.
            "inline_result_bytes": "1",
        }


# --- media ---------------------------------------------------------------------------


@dataclass(frozen=True)
class SourceFile:
    index: int
    path: Path
    paragraphs: tuple[int, ...]
    words_per_minute: int

    @property
    def seconds(self) -> float:
        return (self.path.stat().st_size - 44) / 2 / SAMPLE_RATE


def make_files(media: MediaFactory, count: int, paragraphs: tuple[int, ...]) -> list[SourceFile]:
    """`count` WAV files of PARAGRAPHS in different orders and combinations.

    No two files share any audio, so no chunk of one can be answered from the chunk
    cache with another's result (the check that no job was cached relies on it): each
    file is read at its own speed (words per minute), and the pauses between its
    paragraphs have their own lengths. The recipe does not depend on the chaos seed,
    so the files are made once per media directory."""
    files = []
    for index in range(count):
        rng = random.Random(f"chaos-file-{index}")
        length = paragraphs[index % len(paragraphs)]
        order: list[int] = []
        while len(order) < length:
            choice = rng.randrange(len(PARAGRAPHS))
            if not order or choice != order[-1] or len(PARAGRAPHS) == 1:
                order.append(choice)
        wpm = 130 + index  # espeak-ng reads 80 to 450 words a minute
        gaps = [round(rng.uniform(0.6, 1.4), 2) for _ in order[1:]]
        recipe = f"chaos|{wpm}|{order}|{gaps}"
        out = media.directory / f"chaos-{hashlib.sha256(recipe.encode()).hexdigest()[:16]}.wav"
        if not out.exists():
            pieces: list[np.ndarray] = []
            for i, paragraph in enumerate(order):
                if i:
                    pieces.append(np.zeros(round(gaps[i - 1] * SAMPLE_RATE), dtype=np.float32))
                pieces.append(decode(media.speech(PARAGRAPHS[paragraph], words_per_minute=wpm)))
            media.write_wav(np.concatenate(pieces), out)
        files.append(SourceFile(index, out, tuple(order), wpm))
    return files


# --- the parts -----------------------------------------------------------------------


def retry(what: str, fn: Callable[[], T], timeout: float = 120, every: float = 0.5) -> T:
    """`fn()` until it returns; during chaos anything may fail for a while (but a
    failed assertion is final)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            return fn()
        except AssertionError:
            raise
        except Exception as exc:  # noqa: BLE001 - reported when time runs out
            if time.monotonic() > deadline:
                raise AssertionError(f"{what} kept failing for {timeout:g} s: {exc!r}") from exc
        time.sleep(every)


@dataclass
class Slot:
    """One of the farm's worker places: its TCP proxy to the server, and the worker
    process now in it (a killed worker is replaced by a new one, with a new name)."""

    index: int
    proxy: TcpProxy
    worker: WorkerProcess | None = None
    generation: int = 0
    past: list[WorkerProcess] = field(default_factory=list)

    @property
    def name(self) -> str:
        return f"w{self.index}-{self.generation}"


@dataclass
class Fault:
    kind: str
    at: float  # seconds since the round started
    detail: str


@dataclass
class RoundReport:
    """What one chaos round did and what the checks found."""

    round: int
    seed: int
    seconds: float
    faults: list[Fault]
    storage_requests_failed: int
    storage_requests: int
    transcriptions: int = 0
    succeeded: int = 0
    cached_jobs: int = 0  # answered from the chunk cache (only a duplicate's may be)
    duplicates: int = 0  # resubmissions whose first try had created one after all
    transcribe_jobs: int = 0
    audio_seconds: float = 0.0
    claims: int = 0  # attempts over all the round's jobs
    retried_jobs: int = 0  # jobs that needed more than one claim
    max_attempts: int = 0
    submit_retries: int = 0
    differences: list[str] = field(default_factory=list)
    problems: list[str] = field(default_factory=list)

    def fault_counts(self) -> dict[str, int]:
        counted = Counter(f.kind for f in self.faults)
        return {kind: counted[kind] for kind in KINDS}

    def summary(self) -> str:
        counts = self.fault_counts()
        faults = ", ".join(f"{kind} {n}" for kind, n in counts.items())
        return (
            f"chaos round {self.round} (seed {self.seed}): {self.transcriptions} transcriptions "
            f"({self.duplicates} duplicate submissions), {self.transcribe_jobs} transcribe jobs "
            f"({self.cached_jobs} from the chunk cache), "
            f"{self.audio_seconds:.0f} s of audio in {self.seconds:.0f} s; "
            f"{sum(counts.values())} faults: {faults}; storage answered "
            f"{self.storage_requests_failed} of {self.storage_requests} requests with an error; "
            f"{self.claims} claims, {self.retried_jobs} jobs claimed more than once (at most "
            f"{self.max_attempts} times); {self.submit_retries} submissions retried; "
            f"{len(self.differences)} transcripts differ; {len(self.problems)} problems"
        )


class ChaosFarm:
    """The farm under test, and the means to break it and mend it."""

    def __init__(self, root: Path, config: ChaosConfig) -> None:
        self.root = root
        self.config = config
        self.rng = random.Random(config.seed)
        self.proxies = ProxyLoop()
        self.postgres: Postgres | None = None
        self.moto: subprocess.Popen | None = None
        self.storage: FaultyHttpProxy | None = None
        self.server: Server | None = None
        self.slots: list[Slot] = []
        self.keys: dict[str, str] = {}
        self.lock = threading.Lock()  # the injector and the mending at the end

    # --- starting and stopping -------------------------------------------------------

    def __enter__(self) -> ChaosFarm:
        try:
            self.start()
        except BaseException:
            self.close()
            raise
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def start(self) -> None:
        self.root.mkdir(parents=True, exist_ok=True)
        self.postgres = Postgres(self.root / "postgres")
        database_url = create_database(self.postgres.uri)
        moto_port = free_port()
        moto_log = open(self.root / "moto.log", "ab")  # noqa: SIM115 (kept open for the process)
        self.moto = subprocess.Popen(
            [MOTO_SERVER, "-H", "127.0.0.1", "-p", str(moto_port)],
            stdout=moto_log,
            stderr=subprocess.STDOUT,
        )
        moto_url = f"http://127.0.0.1:{moto_port}"
        retry("moto's S3 server to start", lambda: httpx.get(moto_url, timeout=2), timeout=60)
        self.s3_client(moto_url).create_bucket(Bucket=BUCKET)
        self.storage = FaultyHttpProxy(self.proxies, moto_port, self.config.seed + 1)
        settings = {
            **self.config.server_settings,
            "s3_bucket": BUCKET,
            "s3_endpoint_url": self.storage.url,
            "s3_region": "us-east-1",
            "s3_access_key_id": S3_KEYS["access_key_id"],
            "s3_secret_access_key": S3_KEYS["secret_access_key"],
        }
        self.server = Server(database_url, self.root / "farm", settings).start()
        self.keys = {role: self.server.create_key(role) for role in ("admin", "worker")}
        for index in range(self.config.workers):
            slot = Slot(index, TcpProxy(self.proxies, self.server.port))
            self.slots.append(slot)
            self.start_worker(slot)
        self.wait_registered()

    def close(self) -> None:
        for slot in self.slots:
            for worker in [*slot.past, slot.worker]:
                if worker is not None and worker.process is not None:
                    worker.stop()
        if self.server is not None:
            self.server.stop()
        if self.moto is not None:
            self.moto.kill()
            self.moto.wait()
        self.proxies.stop()
        if self.postgres is not None:
            self.postgres.close()

    @staticmethod
    def s3_client(endpoint: str):  # -> a botocore S3 client (moto brings boto3)
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=endpoint,
            region_name="us-east-1",
            aws_access_key_id=S3_KEYS["access_key_id"],
            aws_secret_access_key=S3_KEYS["secret_access_key"],
        )

    def start_worker(self, slot: Slot) -> None:
        """A worker that knows the server only through its slot's proxy, and has no
        storage settings (it reads sources through presigned URLs)."""
        assert self.server is not None
        if slot.worker is not None:
            slot.past.append(slot.worker)
            slot.generation += 1
        through_proxy = dataclasses.replace(self.server, port=slot.proxy.port, settings={})
        slot.worker = WorkerProcess(
            through_proxy, self.keys["worker"], slot.name, self.config.worker_options
        ).start()

    def wait_registered(self, timeout: float = 120) -> None:
        names = [slot.name for slot in self.slots]

        def registered() -> bool:
            rows = self.sql("SELECT name FROM workers WHERE name = ANY($1)", names)
            if len(rows) < len(names):
                for slot in self.slots:
                    assert slot.worker is not None and slot.worker.process is not None
                    if slot.worker.process.poll() is not None:
                        raise AssertionError(f"worker {slot.name} exited:\n{slot.worker.log}")
                raise RuntimeError("not yet")
            return True

        retry("the workers to register", registered, timeout=timeout)

    def start_server(self) -> float:
        """Starts the server process again (same port, same database); a supervisor
        (systemd, Fly) would do the same. Returns how long it took to be ready."""
        assert self.server is not None
        started = time.monotonic()

        def start() -> None:
            assert self.server is not None
            if self.server.process is not None and self.server.process.poll() is None:
                self.server.process.kill()
                self.server.process.wait()
            self.server.start()

        retry("the server to start", start, timeout=120, every=1)
        return time.monotonic() - started

    # --- talking to the board ----------------------------------------------------------

    def sql(self, query: str, *args: Any) -> list[dict[str, Any]]:
        assert self.server is not None
        return sql(self.server.database_url, query, *args)

    def sql_retrying(self, query: str, *args: Any, timeout: float = 120) -> list[dict[str, Any]]:
        return retry("a query on the board", lambda: self.sql(query, *args), timeout=timeout)

    def client(self) -> httpx.Client:
        assert self.server is not None
        return self.server.client(self.keys["admin"], timeout=60)

    def submit(self, source: SourceFile, name: str) -> tuple[str, int]:
        """Uploads until the server answers 201, as a user would; returns the id and how
        many tries failed. A try that failed after the server had stored the
        transcription leaves one more with this name (counted by check_round)."""
        data = {}
        if self.config.target_chunk_seconds:
            data["target_chunk_seconds"] = str(self.config.target_chunk_seconds)
        failures = 0
        content = source.path.read_bytes()
        deadline = time.monotonic() + 180
        while True:
            try:
                with self.client() as client:
                    response = client.post(
                        "/v1/transcriptions", files={"file": (name, content)}, data=data
                    )
                if response.status_code == 201:
                    return response.json()["id"], failures
                if response.status_code < 500:  # not something a retry mends: a bug
                    raise AssertionError(
                        f"submitting {name}: {response.status_code} {response.text}"
                    )
                error = f"{response.status_code} {response.text[:200]}"
            except httpx.HTTPError as exc:
                error = repr(exc)
            failures += 1
            if time.monotonic() > deadline:
                raise AssertionError(f"submitting {name} kept failing: {error}")
            time.sleep(0.5)

    def documents(self, ids: list[str]) -> dict[str, dict[str, Any]]:
        """Each transcription's transcript document (format=json)."""
        found = {}
        with self.client() as client:
            for tid in ids:

                def fetch(tid: str = tid) -> dict[str, Any]:
                    response = client.get(f"/v1/transcriptions/{tid}/transcript?format=json")
                    response.raise_for_status()
                    return response.json()

                found[tid] = retry(f"the transcript of {tid}", fetch, timeout=60)
        return found

    def wait_finished(
        self, pattern: str, expected: int, timeout: float, injector: Injector | None = None
    ) -> list[dict[str, Any]]:
        """Until at least `expected` transcriptions named like `pattern` exist and none
        is unfinished; prints progress now and then."""
        deadline = time.monotonic() + timeout
        next_note = time.monotonic() + 15
        query = "SELECT id::text, filename, state, error FROM transcriptions WHERE filename LIKE $1"
        while True:
            if injector is not None and injector.error is not None:
                raise AssertionError(f"the injector failed: {injector.error!r}")
            try:
                rows = self.sql(query, pattern)
            except Exception:  # noqa: BLE001 - the database may be down for a moment
                rows = None
            if rows is not None:
                states = Counter(r["state"] for r in rows)
                if len(rows) >= expected and not states["queued"] + states["running"]:
                    return rows
                if time.monotonic() > next_note:
                    faults = f", {len(injector.faults)} faults so far" if injector else ""
                    log(f"  {pattern}: {dict(states)}{faults}")
                    next_note = time.monotonic() + 15
            if time.monotonic() > deadline:
                raise AssertionError(
                    f"transcriptions {pattern} not finished after {timeout:g} s:\n"
                    + self.diagnosis(pattern)
                )
            time.sleep(1)

    def diagnosis(self, pattern: str) -> str:
        """What is unfinished, and the last lines of the server's log."""
        lines = []
        with contextlib.suppress(Exception):
            for row in self.sql(
                "SELECT t.filename, j.kind, j.seq, j.state, j.attempts, j.run_after, "
                "j.lease_expires_at, j.error, w.name AS worker FROM jobs j "
                "JOIN transcriptions t ON t.id = j.transcription_id "
                "LEFT JOIN workers w ON w.id = j.worker_id "
                "WHERE t.filename LIKE $1 AND j.state NOT IN ('succeeded') ORDER BY 1, 3",
                pattern,
            ):
                lines.append(str(row))
        if self.server is not None and self.server.log_path is not None:
            lines.append("server log:\n" + self.server.log_path.read_text()[-4000:])
        return "\n".join(lines)

    # --- the phases --------------------------------------------------------------------

    def baseline(self, files: list[SourceFile]) -> dict[int, dict[str, Any]]:
        """Every file transcribed without faults, by the same workers with the same
        options: what each chaos transcript must equal."""
        started = time.monotonic()
        ids = {self.submit(f, f"baseline-{f.index:03d}.wav")[0]: f.index for f in files}
        rows = self.wait_finished("baseline-%", len(files), self.config.round_timeout)
        failed = [r for r in rows if r["state"] != "succeeded"]
        assert not failed, f"the fault-free run failed: {failed}"
        documents = self.documents(list(ids))
        cached = self.sql(
            "SELECT count(*) AS n FROM jobs j JOIN transcriptions t ON t.id = j.transcription_id "
            "WHERE t.filename LIKE 'baseline-%' AND (j.result->>'cached')::boolean"
        )[0]["n"]
        assert cached == 0, f"{cached} baseline chunks came from the chunk cache: files overlap"
        log(f"baseline: {len(files)} files in {time.monotonic() - started:.0f} s")
        return {index: documents[tid] for tid, index in ids.items()}

    def chaos_round(
        self, files: list[SourceFile], number: int, baseline: dict[int, dict[str, Any]]
    ) -> RoundReport:
        """Submits every file again while the injector breaks things; mends the farm
        once all have finished, then checks the round."""
        # The baseline's chunks are in the cache: without this no model would run.
        self.sql_retrying("DELETE FROM chunk_cache")
        prefix = f"chaos{number}-"
        injector = Injector(self, random.Random(f"{self.config.seed}-{number}"))
        assert self.storage is not None
        requests_before = (self.storage.requests, self.storage.failed)
        started = time.monotonic()
        injector.start()
        submit_retries = 0
        try:
            order = list(files)
            self.rng.shuffle(order)
            for source in order:
                _, failures = self.submit(source, f"{prefix}{source.index:03d}.wav")
                submit_retries += failures
                time.sleep(self.rng.uniform(*self.config.submit_gap))
            self.wait_finished(prefix + "%", len(files), self.config.round_timeout, injector)
        finally:
            injector.stop()
            self.mend()
        report = RoundReport(
            round=number,
            seed=self.config.seed,
            seconds=time.monotonic() - started,
            faults=injector.faults,
            storage_requests=self.storage.requests - requests_before[0],
            storage_requests_failed=self.storage.failed - requests_before[1],
            submit_retries=submit_retries,
        )
        if injector.error is not None:
            report.problems.append(f"the injector failed: {injector.error!r}")
        check_round(self, prefix, files, baseline, report)
        return report

    def mend(self) -> None:
        """Everything back up: storage healthy, networks restored, PostgreSQL and the
        server running, every slot with a live worker."""
        assert self.storage is not None and self.server is not None and self.postgres
        with self.lock:
            self.storage.set_error_rate(0.0)
            for slot in self.slots:
                slot.proxy.restore()
            self.postgres.start()
            if self.server.process is None or self.server.process.poll() is not None:
                self.start_server()
            for slot in self.slots:
                if slot.worker is None or slot.worker.process.poll() is not None:
                    self.start_worker(slot)

    # --- faults ----------------------------------------------------------------------

    def busy_workers(self) -> set[str]:
        """Names of workers holding an unexpired lease (empty when the board is down)."""
        try:
            rows = self.sql(
                "SELECT DISTINCT w.name FROM jobs j JOIN workers w ON w.id = j.worker_id "
                "WHERE j.state = 'leased' AND j.lease_expires_at > now()"
            )
        except Exception:  # noqa: BLE001 - chaos: the board may be down right now
            return set()
        return {r["name"] for r in rows}

    def pick_slot(self, rng: random.Random, exclude: set[int] = frozenset()) -> Slot | None:
        """A slot whose worker holds a lease if there is one: that is where it hurts."""
        free = [s for s in self.slots if s.index not in exclude]
        busy = self.busy_workers()
        holding = [s for s in free if s.name in busy]
        pool = holding or free
        return rng.choice(pool) if pool else None


class Injector(threading.Thread):
    """Injects one fault at a time at random moments (seeded), kinds drawn from a
    shuffled deck so that every kind comes round once per five faults. Faults with a
    duration (storage errors, a network cut) end on their own while others follow."""

    def __init__(self, farm: ChaosFarm, rng: random.Random) -> None:
        super().__init__(daemon=True, name="chaos-injector")
        self.farm = farm
        self.config = farm.config
        self.rng = rng
        self.faults: list[Fault] = []
        self.error: BaseException | None = None
        self.stopping = threading.Event()
        self.started_at = time.monotonic()
        self.deck: list[str] = []
        self.storage_until: float | None = None
        self.cuts: dict[int, float] = {}  # slot index -> when its network comes back

    def stop(self) -> None:
        self.stopping.set()
        self.join(120)

    def run(self) -> None:
        try:
            next_at = time.monotonic() + self.rng.uniform(*self.config.fault_gap)
            while not self.stopping.wait(0.1):
                self.end_episodes()
                if time.monotonic() >= next_at:
                    with self.farm.lock:
                        self.inject(self.draw())
                    next_at = time.monotonic() + self.rng.uniform(*self.config.fault_gap)
            self.end_episodes(everything=True)
        except BaseException as exc:  # noqa: BLE001 - reported by the round
            self.error = exc

    def now(self) -> float:
        return time.monotonic() - self.started_at

    def record(self, kind: str, detail: str) -> None:
        self.faults.append(Fault(kind, self.now(), detail))
        log(f"  [{self.now():6.1f} s] {kind}: {detail}")

    def draw(self) -> str:
        for _ in range(len(KINDS)):
            if not self.deck:
                self.deck = list(KINDS)
                self.rng.shuffle(self.deck)
            kind = self.deck.pop()
            if kind == "storage_errors" and self.storage_until is not None:
                self.deck.insert(0, kind)  # already failing: later
                continue
            if kind == "network_cut" and len(self.cuts) >= len(self.farm.slots) - 1:
                self.deck.insert(0, kind)  # keep at least one worker connected
                continue
            return kind
        return "worker_kill"

    def inject(self, kind: str) -> None:
        farm, rng, config = self.farm, self.rng, self.config
        assert farm.server is not None and farm.postgres is not None and farm.storage
        if kind == "worker_kill":
            slot = farm.pick_slot(rng)
            assert slot is not None and slot.worker is not None
            victim = slot.worker.name
            slot.worker.signal(signal.SIGKILL)
            slot.worker.process.wait()
            farm.start_worker(slot)
            self.record(kind, f"SIGKILL {victim}, started {slot.name}")
        elif kind == "server_kill":
            down = rng.uniform(*config.server_down_seconds)
            farm.server.stop(signal.SIGKILL)
            time.sleep(down)
            ready = farm.start_server()
            self.record(kind, f"SIGKILL, down {down:.1f} s, restarted and ready in {ready:.1f} s")
        elif kind == "postgres_restart":
            mode = rng.choice(("fast", "immediate"))
            down = rng.uniform(*config.postgres_down_seconds)
            farm.postgres.stop(mode)
            time.sleep(down)
            farm.postgres.start()
            self.record(kind, f"stop -m {mode}, down {down:.1f} s, started")
        elif kind == "storage_errors":
            rate = rng.uniform(*config.storage_error_rate)
            seconds = rng.uniform(*config.storage_error_seconds)
            farm.storage.set_error_rate(rate)
            self.storage_until = time.monotonic() + seconds
            self.record(kind, f"{rate:.0%} of requests fail for {seconds:.1f} s")
        elif kind == "network_cut":
            slot = farm.pick_slot(rng, exclude=set(self.cuts))
            assert slot is not None
            seconds = config.lease_seconds + rng.uniform(*config.cut_extra_seconds)
            slot.proxy.cut()
            self.cuts[slot.index] = time.monotonic() + seconds
            self.record(kind, f"{slot.name} cut off the server for {seconds:.1f} s")
        else:
            raise ValueError(kind)

    def end_episodes(self, everything: bool = False) -> None:
        now = time.monotonic()
        if self.storage_until is not None and (everything or now >= self.storage_until):
            assert self.farm.storage is not None
            self.farm.storage.set_error_rate(0.0)
            self.storage_until = None
        for index, until in list(self.cuts.items()):
            if everything or now >= until:
                self.farm.slots[index].proxy.restore()
                del self.cuts[index]


# --- the checks ----------------------------------------------------------------------

ROUND_TRANSCRIPTIONS = """
SELECT id::text, filename, state, error, jobs_total, jobs_done, audio_seconds_done,
       duration_seconds
FROM transcriptions WHERE filename LIKE $1
"""
ROUND_JOBS = """
SELECT j.transcription_id::text AS tid, j.kind, j.seq, j.state, j.attempts,
       j.start_seconds, j.end_seconds, coalesce((j.result->>'cached')::boolean, false) AS cached
FROM jobs j JOIN transcriptions t ON t.id = j.transcription_id
WHERE t.filename LIKE $1
"""
# Per worker: its counters, and the rows they must agree with. A job redone after a
# lost lease ran on two (or more) workers, but only the completion fenced on its
# current lease counts, and it counts for the worker holding that lease (jobs.worker_id
# of a succeeded job): each worker's counters equal its succeeded, uncached jobs.
WORKER_COUNTERS = """
SELECT w.name, w.jobs_done, w.audio_seconds,
       count(j.id) AS succeeded, coalesce(sum(j.end_seconds - j.start_seconds), 0) AS audio
FROM workers w
LEFT JOIN jobs j ON j.worker_id = w.id AND j.kind = 'transcribe' AND j.state = 'succeeded'
                AND NOT coalesce((j.result->>'cached')::boolean, false)
GROUP BY w.id
"""


def check_round(
    farm: ChaosFarm,
    prefix: str,
    files: list[SourceFile],
    baseline: dict[int, dict[str, Any]],
    report: RoundReport,
) -> None:
    """Fills `report` with the round's figures and every broken invariant."""
    problems = report.problems
    rows = farm.sql_retrying(ROUND_TRANSCRIPTIONS, prefix + "%")
    jobs = farm.sql_retrying(ROUND_JOBS, prefix + "%")
    by_tid: dict[str, list[dict[str, Any]]] = {r["id"]: [] for r in rows}
    for job in jobs:
        by_tid[job["tid"]].append(job)

    names = Counter(r["filename"] for r in rows)
    report.transcriptions = len(rows)
    report.duplicates = sum(n - 1 for n in names.values())
    missing = {f"{prefix}{f.index:03d}.wav" for f in files} - set(names)
    if missing:
        problems.append(f"never submitted successfully: {sorted(missing)}")

    for row in rows:
        name, own = row["filename"], by_tid[row["id"]]
        if row["state"] != "succeeded":
            problems.append(f"{name}: {row['state']} ({row['error']})")
            continue
        chunk = [j for j in own if j["kind"] == "chunk"]
        transcribe = sorted((j for j in own if j["kind"] == "transcribe"), key=lambda j: j["seq"])
        if len(chunk) != 1 or chunk[0]["state"] != "succeeded":
            problems.append(f"{name}: chunk jobs {chunk}")
        not_done = [(j["seq"], j["state"]) for j in own if j["state"] != "succeeded"]
        if not_done:
            problems.append(f"{name}: jobs not succeeded (seq, state): {not_done}")
        if [j["seq"] for j in transcribe] != list(range(1, len(transcribe) + 1)):
            problems.append(f"{name}: transcribe job seqs {[j['seq'] for j in transcribe]}")
        counted = (row["jobs_total"], row["jobs_done"], len(transcribe))
        if len(set(counted)) != 1:
            problems.append(f"{name}: jobs_total, jobs_done, transcribe jobs = {counted}")
        audio = sum(j["end_seconds"] - j["start_seconds"] for j in transcribe)
        if abs(row["audio_seconds_done"] - audio) > 1e-6:
            problems.append(
                f"{name}: audio_seconds_done {row['audio_seconds_done']} but its chunks "
                f"sum to {audio}"
            )
        # Chunks run from speech to speech (worker/chunking.py): in order, apart, and
        # inside the source.
        bounds = [(j["start_seconds"], j["end_seconds"]) for j in transcribe]
        edges = [t for bound in bounds for t in bound]
        if edges != sorted(edges) or (edges and edges[-1] > row["duration_seconds"] + 1e-6):
            problems.append(f"{name}: chunks {bounds} in {row['duration_seconds']} s")
        cached = [j["seq"] for j in transcribe if j["cached"]]
        report.cached_jobs += len(cached)
        # Files share no audio, so only a twin of the same file (a submission whose
        # answer was lost, tried again) can have put these chunks in the cache.
        if cached and names[name] == 1:
            problems.append(f"{name}: chunks {cached} answered from the cache: no model ran")
        report.transcribe_jobs += len(transcribe)
        report.audio_seconds += audio
    report.claims = sum(j["attempts"] for j in jobs)
    report.retried_jobs = sum(j["attempts"] > 1 for j in jobs)
    report.max_attempts = max((j["attempts"] for j in jobs), default=0)

    # Nothing anywhere on the board is left queued or leased.
    left = farm.sql_retrying(
        "SELECT state, count(*) AS n FROM jobs WHERE state IN ('queued', 'leased') GROUP BY 1"
    )
    if left:
        problems.append(f"jobs left on the board: {left}")

    for worker in farm.sql_retrying(WORKER_COUNTERS):
        if worker["jobs_done"] != worker["succeeded"]:
            problems.append(
                f"worker {worker['name']}: jobs_done {worker['jobs_done']} but it holds "
                f"{worker['succeeded']} succeeded jobs"
            )
        if abs(worker["audio_seconds"] - worker["audio"]) > 1e-6:
            problems.append(
                f"worker {worker['name']}: audio_seconds {worker['audio_seconds']} but its "
                f"jobs hold {worker['audio']}"
            )

    succeeded = [r for r in rows if r["state"] == "succeeded"]
    report.succeeded = len(succeeded)
    documents = farm.documents([r["id"] for r in succeeded])
    for row in succeeded:
        index = int(row["filename"].removeprefix(prefix).removesuffix(".wav"))
        difference = compare(baseline[index], documents[row["id"]])
        if difference:
            report.differences.append(f"{row['filename']} ({row['id']}): {difference}")
    problems.extend(report.differences)

    counts = report.fault_counts()
    never = [kind for kind, n in counts.items() if not n]
    if never:
        problems.append(f"faults never injected: {never} (the work finished first: make it longer)")


def compare(expected: dict[str, Any], got: dict[str, Any]) -> str | None:
    """None when the two documents agree on everything the merge produced, else where
    they first differ."""
    for key in COMPARED:
        if key == "segments":
            continue
        if expected[key] != got[key]:
            return f"{key}: {expected[key]!r} (baseline) != {got[key]!r}"
    a, b = expected["segments"], got["segments"]
    for i, (x, y) in enumerate(zip(a, b, strict=False)):
        if x != y:
            return f"segment {i}: {json.dumps(x)} (baseline) != {json.dumps(y)}"
    if len(a) != len(b):
        return f"{len(a)} segments in the baseline, {len(b)} here"
    return None
