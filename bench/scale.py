"""Scale-out: one long file finished by many workers at once, and how busy a worker
keeps its engine. The project's real Worker (worker.runner.Worker: claims, ffmpeg range
reads, the chunk cache, completions with the next claim) runs with an engine that sleeps
audio/SPEED seconds per batch, a GPU at SPEED× realtime, several Workers per process in
several processes, against a real `scribefarm server` and its PostgreSQL. Beside it, a
6 s clip through the OpenAI endpoint of a farm of real workers, against faster-whisper
run directly. The board's own cycles per second and claim latency at 10 to 500
workers: bench/board.py.

    .venv/bin/python -m bench.scale             # full run, records in bench/RESULTS.md
    .venv/bin/python -m bench.scale --quick     # smoke check, writes nothing
"""

from __future__ import annotations

import asyncio
import os
import statistics
import subprocess
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path

from faster_whisper import BatchedInferencePipeline, WhisperModel

from bench import ROOT, log
from bench.farm import long_speech
from bench.harness import Farm, media
from bench.results import (
    TARGETS_HEADER,
    bench_parser,
    command_line,
    header_lines,
    run,
    run_options,
    verdict,
)
from shared.protocol import Segment
from tests.speech import decode
from worker.audio import probe_source
from worker.chunking import plan_source, quiet_cuts, span_starts
from worker.engines import EngineInput, EngineOutput, resolve_model

SECTION = "## Scale-out: one long file, many workers (bench/scale.py)"
PROCESSES = 4  # the Workers of a run are spread over this many processes
TARGET_SECONDS = 3.0  # 1-hour file, 30 workers at 200×: submit → succeeded
TARGET_FIRST_CLAIM = 0.5  # upload stored → first transcribe job claimed
TARGET_BUSY = 0.90  # one worker at 200×: engine busy share of its transcribing time
TARGET_CLIP_RATIO = 1.1  # a 6 s clip through the OpenAI endpoint / direct faster-whisper
CLIP_TEXT = (
    "Please send the quarterly figures to the whole team before noon on Friday, "
    "and copy me on the reply."
)
CLIP_RUNS = 7
SPAN_SECONDS = 300.0  # the server's default SCRIBEFARM_PLAN_SPAN_SECONDS


class SleepingEngine:
    """Takes audio/speed seconds per batch, as a GPU at `speed`× realtime would, and
    returns one segment per chunk."""

    name = "sleeping"
    device = "cpu"
    multilingual = False

    def __init__(self, speed: float, batch_size: int = 8, model: str = "tiny.en") -> None:
        self.speed, self.batch_size, self.models = speed, batch_size, [model]

    def transcribe_batch(self, items: Sequence[EngineInput]) -> list[EngineOutput]:
        time.sleep(sum(len(item.audio) for item in items) / 16000 / self.speed)
        return [
            EngineOutput(
                segments=[Segment(start=i.offset, end=i.offset + len(i.audio) / 16000, text="x")],
                language="en",
            )
            for i in items
        ]

    def detect_language(self, item: EngineInput) -> None:
        return None


def run_workers(server: str, key: str, names: list[str], speed: float) -> None:
    """One process's share of the workers (this module run as `worker`)."""
    from worker.runner import Worker, WorkerConfig

    async def all_of_them() -> None:
        workers = [
            Worker(WorkerConfig(server=server, key=key, name=name), SleepingEngine(speed))
            for name in names
        ]
        await asyncio.gather(*(w.run() for w in workers))

    asyncio.run(all_of_them())


@dataclass
class SleepingWorkers:
    """`count` Workers over PROCESSES processes, killed when done and then marked gone
    on the board (as they would be once unheard of), so that the next run's claims do
    not share the queue with them."""

    farm: Farm
    count: int
    speed: float
    processes: list[subprocess.Popen] = field(default_factory=list)

    def __enter__(self) -> SleepingWorkers:
        assert self.farm.server is not None
        tag = f"s{self.speed:g}-{self.count}-{int(time.time() * 1000) % 100000}"
        names = [f"{tag}-w{i}" for i in range(self.count)]
        env = {**os.environ, "PYTHONPATH": str(ROOT)}
        for part in range(min(PROCESSES, self.count)):
            share = names[part::PROCESSES]
            command = [sys.executable, "-m", "bench.scale", "worker", self.farm.server.url]
            command += [self.farm.keys["worker"], str(self.speed), *share]
            self.processes.append(subprocess.Popen(command, env=env, cwd=ROOT))
        self.farm.wait_registered(names, timeout=120, others=self.processes)
        return self

    def __exit__(self, *_: object) -> None:
        assert self.farm.server is not None
        for p in self.processes:
            p.kill()
            p.wait()
        self.farm.server.sql("UPDATE workers SET last_seen_at = now() - interval '1 day'")


@dataclass
class LongFile:
    workers: int
    speed: float
    seconds: float  # submit → succeeded
    first_claim: float  # upload stored (row created) → first transcribe job claimed
    planned: float  # row created → the last chunk job completed
    chunks: int
    busy: float  # the workers' engine time / (their transcribe time), all together
    planners: int  # chunk jobs: 1 when the file is planned whole, else one per span


@dataclass
class PlanningAlone:
    """Planning the file in this process with nothing else running: what one worker
    with a core of its own takes for the whole file, for its cuts, and for each span."""

    whole: float
    cuts: float
    spans: list[float]


@dataclass
class ClipLatency:
    """One short clip, on a warm farm and directly: seconds per request (medians)."""

    clip: float  # its length
    farm: list[float]
    direct: list[float]

    @property
    def ratio(self) -> float:
        return statistics.median(self.farm) / statistics.median(self.direct)


@dataclass
class Results:
    audio: float
    runs: list[LongFile] = field(default_factory=list)
    alone: PlanningAlone | None = None
    clip: ClipLatency | None = None


def clip_latency(work: Path) -> ClipLatency:
    """A 6 s clip through the OpenAI endpoint of a farm of real workers (the local
    default: a 1-thread worker per core, model loaded, registered), the request's whole
    time; beside faster-whisper transcribing the same file in this process (model
    loaded, 2 threads), the way bench/farm.py runs it directly. Alternating, after one
    warm-up each."""
    path = media().speech(CLIP_TEXT, words_per_minute=140)
    model = WhisperModel(resolve_model("tiny.en"), device="cpu", compute_type="int8", cpu_threads=2)
    pipeline = BatchedInferencePipeline(model)

    def direct() -> float:
        began = time.monotonic()
        segments, _ = pipeline.transcribe(str(path), batch_size=8)
        list(segments)
        return time.monotonic() - began

    farm = Farm(work / "openai").start()
    try:
        farm.start_workers(2, threads=1, batch_size=8)
        assert farm.client is not None

        def through_openai() -> float:
            farm.clear_cache()  # the same clip again would come from the cache
            began = time.monotonic()
            response = farm.client.post(
                "/v1/audio/transcriptions",
                files={"file": (path.name, path.read_bytes())},
                data={"model": "whisper-1"},
            )
            response.raise_for_status()
            return time.monotonic() - began

        through_openai(), direct()  # warm-up
        runs = [(through_openai(), direct()) for _ in range(CLIP_RUNS)]
    finally:
        farm.stop()
    seconds = len(decode(path)) / 16000
    return ClipLatency(seconds, [f for f, _ in runs], [d for _, d in runs])


def plan_alone(path: Path) -> PlanningAlone:
    def timed(work) -> tuple[float, object]:
        began = time.monotonic()
        result = work()
        return time.monotonic() - began, result

    source = str(path)
    whole, _ = timed(lambda: plan_source(source, 60, 120))
    declared = probe_source(source).declared_seconds
    cuts_seconds, cuts = timed(lambda: quiet_cuts(source, span_starts(declared, SPAN_SECONDS)))
    bounds = [0.0, *cuts, None]
    spans = [
        timed(lambda k=k: plan_source(source, 60, 120, start=bounds[k], end=bounds[k + 1]))[0]
        for k in range(len(bounds) - 1)
    ]
    return PlanningAlone(whole, cuts_seconds, spans)


TIMINGS_SQL = """
SELECT extract(epoch FROM t.created_at) AS created,
       extract(epoch FROM t.finished_at) AS finished, t.state,
       (SELECT extract(epoch FROM min(j.leased_at)) FROM jobs j
        WHERE j.transcription_id = t.id AND j.kind = 'transcribe') AS first_claim,
       (SELECT extract(epoch FROM max(j.finished_at)) FROM jobs j
        WHERE j.transcription_id = t.id AND j.kind = 'chunk') AS planned,
       (SELECT count(*) FROM jobs j
        WHERE j.transcription_id = t.id AND j.kind = 'chunk') AS planners,
       (SELECT count(*) FROM jobs j
        WHERE j.transcription_id = t.id AND j.kind = 'transcribe') AS chunks
FROM transcriptions t WHERE t.id = $1
"""

# Per worker: its engine time over the span from its first transcribe claim to its last
# completion (planning, which a chunk job does before it, is not engine work to wait on).
BUSY_SQL = """
SELECT sum((j.result->>'processing_seconds')::float8) AS engine,
       extract(epoch FROM max(j.finished_at) - min(j.leased_at)) AS span
FROM jobs j
WHERE j.transcription_id = $1 AND j.kind = 'transcribe' AND j.state = 'succeeded'
GROUP BY j.worker_id
"""


def one_file(farm: Farm, path: Path, workers: int, speed: float) -> LongFile:
    assert farm.server is not None
    farm.clear_cache()
    with SleepingWorkers(farm, workers, speed):
        tid, began = farm.submit(path)
        [row] = farm.wait_finished([tid], timeout=600).values()
        assert row["state"] == "succeeded", row
        [t] = farm.server.sql(TIMINGS_SQL, tid)
        busy = farm.server.sql(BUSY_SQL, tid)
    engine = sum(b["engine"] for b in busy)
    span = sum(float(b["span"]) for b in busy)
    return LongFile(
        workers=workers,
        speed=speed,
        seconds=float(t["finished"]) - began,
        first_claim=float(t["first_claim"]) - float(t["created"]),
        planned=float(t["planned"]) - float(t["created"]),
        chunks=t["chunks"],
        busy=engine / span if span else 0.0,
        planners=t["planners"],
    )


def measure(options: Options, work: Path) -> Results:
    path, _ = long_speech(media(), options.audio_seconds)
    results = Results(audio=options.audio_seconds, alone=plan_alone(path))
    results.clip = clip_latency(work)
    clip = results.clip
    log(f"{clip.clip:.1f} s clip: OpenAI endpoint {statistics.median(clip.farm):.2f} s, "
        f"direct {statistics.median(clip.direct):.2f} s, ratio {clip.ratio:.2f}")  # fmt: skip
    alone = results.alone
    log(f"planning alone: whole {alone.whole:.2f} s, cuts {alone.cuts:.2f} s, spans "
        f"{', '.join(f'{s:.2f}' for s in alone.spans)} s")  # fmt: skip
    farm = Farm(work / "spans").start()
    try:
        for speed in options.speeds:
            for workers in options.workers:
                if speed != options.speeds[0] and workers != 1:
                    continue  # other speeds: one worker's engine-busy share only
                results.runs.append(logged(one_file(farm, path, workers, speed)))
    finally:
        farm.stop()
    # Side by side: the most workers, the file planned whole by one chunk job.
    farm = Farm(work / "whole", settings={"plan_span_seconds": 0}).start()
    try:
        results.runs.append(logged(one_file(farm, path, max(options.workers), options.speeds[0])))
    finally:
        farm.stop()
    return results


def logged(result: LongFile) -> LongFile:
    log(
        f"{result.workers} worker(s) at {result.speed:g}×, {result.planners} planner(s): "
        f"{result.seconds:.2f} s, first transcribe claim {result.first_claim:.2f} s, "
        f"planned {result.planned:.2f} s, engine busy {result.busy:.0%}"
    )
    return result


def report(results: Results, info: dict[str, str], load_start: str, quiet: bool) -> str:
    base = [r for r in results.runs if r.speed == 200 and r.planners > 1]
    at_30 = [r for r in base if r.workers == 30]
    one = [r for r in base if r.workers == 1]
    lines = header_lines(info, command_line(), load_start, quiet) + TARGETS_HEADER
    if at_30:
        lines.append(
            f"| {results.audio / 60:.0f}-minute file, 30 workers at 200×: submit → succeeded "
            f"≤ {TARGET_SECONDS:g} s | {at_30[0].seconds:.2f} s | "
            f"{verdict(at_30[0].seconds <= TARGET_SECONDS)} |"
        )
    first = statistics.median(r.first_claim for r in base)
    lines.append(
        f"| first transcribe job claimed ≤ {TARGET_FIRST_CLAIM:g} s after the upload is "
        f"stored (median of the runs) | {first:.2f} s | {verdict(first <= TARGET_FIRST_CLAIM)} |"
    )
    if one:
        lines.append(
            f"| one worker at 200×: engine busy ≥ {TARGET_BUSY:.0%} of its transcribing time "
            f"| {one[0].busy:.0%} | {verdict(one[0].busy >= TARGET_BUSY)} |"
        )
    clip = results.clip
    if clip is not None:
        lines.append(
            f"| a {clip.clip:.0f} s clip through the OpenAI endpoint, warm farm: ≤ "
            f"{TARGET_CLIP_RATIO:g}× direct faster-whisper's time (medians of {CLIP_RUNS}) | "
            f"{clip.ratio:.2f}× ({statistics.median(clip.farm):.2f} s against "
            f"{statistics.median(clip.direct):.2f} s; each: "
            f"{', '.join(f'{f:.2f}' for f in clip.farm)} s against "
            f"{', '.join(f'{d:.2f}' for d in clip.direct)} s) | "
            f"{verdict(clip.ratio <= TARGET_CLIP_RATIO)} |"
        )
    lines += [
        "",
        f"### One {results.audio / 60:.0f}-minute file",
        "",
        "| workers | engine speed | planned by (chunk jobs) | submit → succeeded s | "
        "upload stored → first transcribe claim s | → planned s | chunks | engine busy |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in results.runs:
        planners = f"{r.planners} spans" if r.planners > 1 else "1 (whole: spans off)"
        lines.append(
            f"| {r.workers} | {r.speed:g}× | {planners} | {r.seconds:.2f} | "
            f"{r.first_claim:.2f} | {r.planned:.2f} | {r.chunks} | {r.busy:.0%} |"
        )
    alone = results.alone
    if alone is not None:
        lines += [
            "",
            "Planning alone (in the benchmark's process, nothing else running: what a "
            "worker with a core of its own takes):",
            "",
            "| the file planned whole | its cuts found | its spans, each | all planned, "
            "a core per span (the cuts, then the longest span) |",
            "|---:|---:|---:|---:|",
            f"| {alone.whole:.2f} s | {alone.cuts:.2f} s | "
            f"{min(alone.spans):.2f}–{max(alone.spans):.2f} s ({len(alone.spans)}) | "
            f"{alone.cuts + max(alone.spans):.2f} s |",
        ]
    lines += [
        "",
        "How it was measured:",
        f"- Speech: espeak-ng reading the tests' paragraphs over and over "
        f"({results.audio:.0f} s, one 16 kHz WAV), uploaded once per run; the chunk cache is "
        "emptied before each run.",
        f"- Workers: the project's `worker.runner.Worker`, with an engine that sleeps "
        f"audio/speed seconds per batch (a GPU at that speed), {PROCESSES} processes with "
        "several Workers each, registered before the upload; everything else is real: "
        "the chunk job plans with ffmpeg and the VAD, transcribe jobs read their range "
        "with ffmpeg, the board is a real server on an embedded PostgreSQL.",
        "- Times come from the board's rows (the transcription's created_at and "
        "finished_at, its jobs' leased_at and finished_at; submit → succeeded starts "
        "when the upload starts). Engine busy: the engine time the transcribe jobs report, "
        "over each worker's span from its first transcribe claim to its last completion, "
        "summed over workers.",
        "- The clip: espeak-ng reading one sentence; through `POST /v1/audio/transcriptions` "
        "(`model=whisper-1`, JSON) of a third farm whose 2 real `scribefarm worker "
        "--threads 1` processes have loaded tiny.en and registered, from the request's start "
        "to its answer (the chunk cache emptied before each); directly: "
        "`BatchedInferencePipeline.transcribe` with tiny.en, int8, 2 threads, loaded once "
        "in the benchmark's process, as bench/farm.py runs it. The two alternate.",
        "- Planning: the server's default SCRIBEFARM_PLAN_SPAN_SECONDS (300 s) has the "
        "file planned in spans, a chunk job each, at once; the last row plans it whole "
        "(0), on a second farm, for comparison.",
        f"- Everything shares this machine's {info['cpus']} cores: with many workers, "
        "their processes, the server and PostgreSQL compete for them.",
    ]
    return "\n".join(lines)


@dataclass
class Options:
    audio_seconds: float
    workers: list[int]
    speeds: list[float]
    quiet_timeout: float
    record: bool


def parse(argv: list[str] | None) -> Options:
    p = bench_parser(__doc__, "10-minute file", quiet_timeout=1800)
    p.add_argument("--workers", default="1,10,30", help="worker counts at the first speed")
    p.add_argument("--speeds", default="200,1000", help="engine speeds (× realtime)")
    args = p.parse_args(argv)
    return Options(
        audio_seconds=600 if args.quick else 3600,
        workers=[int(w) for w in args.workers.split(",")],
        speeds=[float(s) for s in args.speeds.split(",")],
        **run_options(args),
    )


def main(argv: list[str] | None = None) -> None:
    args = sys.argv[1:] if argv is None else argv
    if args[:1] == ["worker"]:  # a worker process: server, key, speed, names
        server, key, speed, *names = args[1:]
        run_workers(server, key, names, float(speed))
        return
    run(SECTION, parse(argv), measure, report)


if __name__ == "__main__":
    main()
