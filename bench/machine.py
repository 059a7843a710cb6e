"""The machine a benchmark runs on: its description, waiting until it is quiet, and
the CPU other processes take while a round is measured."""

from __future__ import annotations

import contextlib
import os
import platform
import re
import statistics
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import TypeVar

import psutil

from bench import ROOT, log

T = TypeVar("T")


QUIET_LOAD = 0.7  # 1-minute load average under which the machine counts as quiet


# Other processes' CPU (% of one core) above which a measured round is run again.
OTHERS_LIMIT = 25.0


COMPETING = re.compile(
    r"scribefarm (server|worker|up|demo)|/pytest(\s|$)|-m pytest|bench\.(board|farm|many_short)"
)


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
