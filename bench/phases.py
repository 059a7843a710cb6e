"""Where the time goes, from the board's own rows: per transcription (queued, planned,
transcribed, merged) and per worker (busy, idle, claims)."""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass
from typing import Any

from tests.farm import Server


@dataclass
class WorkerTimes:
    name: str
    batches: int = 0
    jobs: int = 0
    audio: float = 0.0  # seconds of audio transcribed
    engine: float = 0.0  # the model's own time (the jobs' processing_seconds)
    busy: float = 0.0  # time holding a claimed batch (read ahead: batches overlap, once)
    chunking: float = 0.0  # claim → last chunk job's completion, summed over claims
    first_lease: float = 0.0
    last_finish: float = 0.0


@dataclass
class Phases:
    """Per-phase timings of a set of transcriptions, from the board's rows (DB clock)."""

    window: float  # first submission → last transcription finished
    upload: float  # submission start → the row exists (median per transcription)
    to_chunk_claim: float  # row created → chunk job claimed (median)
    chunking: float  # chunk job claimed → plan stored (median of files in two hops)
    to_first_transcribe: float  # plan stored → first transcribe job claimed (the same)
    merge: float  # last transcribe job done → transcription finished (median)
    workers: list[WorkerTimes]
    batch_sizes: list[int]  # transcribe jobs per claimed batch
    overhead: float  # busy − engine, all workers: planning, ffmpeg reads, HTTP, cache
    one_hop: int = 0  # files whose chunk job transcribed their one chunk itself

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
        chunking=_median(p[1] for p in per),
        to_first_transcribe=_median(p[2] for p in per),
        merge=statistics.median(p[3] for p in per),
        one_hop=sum(p[1] is None for p in per),
        workers=workers,
        batch_sizes=sizes,
        # Not less planning: a worker reading ahead plans while its model runs.
        overhead=busy - sum(w.engine for w in workers),
    )


def _transcription_phases(
    row: dict[str, Any], jobs: list[dict[str, Any]]
) -> tuple[float, float | None, float | None, float]:
    """Row → chunk job claimed, → planned (every span), → first transcribe claim (None,
    None for a file in one hop: its planning and its model share the chunk job's lease),
    last chunk → merged."""
    planners = [j for j in jobs if j["kind"] == "chunk"]
    claimed = min(float(j["leased"]) for j in planners)
    planned = max(float(j["finished"]) for j in planners)
    transcribe = [j for j in jobs if j["kind"] == "transcribe"] or planners
    first = min(float(j["leased"]) for j in transcribe)
    one_hop = first == claimed and transcribe is not planners
    return (
        claimed - float(row["created"]),
        None if one_hop else planned - claimed,
        None if one_hop else first - planned,
        float(row["finished"]) - max(float(j["finished"]) for j in transcribe),
    )


def _median(values) -> float:
    known = [v for v in values if v is not None]
    return statistics.median(known) if known else 0.0


def _worker_times(jobs: list[dict[str, Any]]) -> tuple[list[WorkerTimes], list[int]]:
    # Jobs one worker claimed in one request share their leased_at: that is a batch.
    batches: dict[tuple[str, float], list[dict[str, Any]]] = defaultdict(list)
    for job in jobs:
        batches[(job["worker"], float(job["leased"]))].append(job)
    times: dict[str, WorkerTimes] = {}
    held: dict[str, list[tuple[float, float]]] = defaultdict(list)
    sizes = []
    for (name, leased), batch in sorted(batches.items(), key=lambda b: b[0][1]):
        w = times.setdefault(name, WorkerTimes(name, first_lease=leased))
        finished = max(float(j["finished"]) for j in batch)
        w.batches += 1
        held[name].append((leased, finished))
        w.last_finish = max(w.last_finish, finished)
        # A claim's chunk jobs run first, one after another: planning ends with the last.
        # A short source's chunk job completes after the model ran its one chunk, in
        # this batch (its transcribe job shares the lease time): not planning alone.
        one_hop = {j["tid"] for j in batch if j["kind"] == "transcribe"}
        planned = [
            float(j["finished"]) for j in batch if j["kind"] == "chunk" and j["tid"] not in one_hop
        ]
        if planned:
            w.chunking += max(planned) - leased
        for job in batch:
            if job["kind"] == "transcribe":
                w.jobs += 1
                w.audio += float(job["audio"])
                w.engine += float(job["engine"])
        if n := sum(j["kind"] == "transcribe" for j in batch):
            sizes.append(n)
    for name, spans in held.items():
        times[name].busy = covered(spans)
    return sorted(times.values(), key=lambda w: w.name), sizes


def covered(spans: list[tuple[float, float]]) -> float:
    """The length of the union of (start, end) spans sorted by start."""
    total, reach = 0.0, float("-inf")
    for start, end in spans:
        if end > reach:
            total += end - max(start, reach)
            reach = end
    return total


def phase_lines(p: Phases, start: float | None = None) -> list[str]:
    """A readable breakdown, as Markdown list items."""
    lines = [
        f"- window {p.window:.2f} s; upload {p.upload:.2f} s, row → chunk job claimed "
        f"{p.to_chunk_claim:.2f} s, chunk job claimed → planned {p.chunking:.2f} s, plan → "
        f"first transcribe claim {p.to_first_transcribe:.2f} s, last chunk → merged "
        f"{p.merge * 1000:.0f} ms (medians per transcription; planning times over the "
        f"files in two hops: {p.one_hop} were short, planned and transcribed in one job)",
        f"- transcribe batches: {len(p.batch_sizes)}, jobs per batch "
        f"{_spread(p.batch_sizes)}; worker time holding work outside the model (planning, "
        f"ffmpeg range reads, cache lookups, HTTP) {p.overhead:.2f} s in all",
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


def breakdown(settings: dict[str, list[Phases]]) -> list[str]:
    """A table of where the workers' time went, one row per farm setting (its label →
    the phases of its runs)."""
    lines = ["", "Where each farm setting's time goes (medians; from the board's rows):", ""]
    lines += [
        "| setting | window s | model s (all workers) | model × realtime per worker | "
        "planning s | outside the model s (planning included) | idle s (all workers) | tail s | "
        "jobs per claim |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    return lines + [breakdown_row(label, runs) for label, runs in settings.items()]


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
