"""One long file: the farm (2 workers × 1 thread) against faster-whisper directly (one
process, 2 threads), same model, same decoding options, same two cores. Also the peak
memory of each worker and the chunk planner's speed on a 1-hour MP3.

    .venv/bin/python -m bench.farm            # full run (10-minute file), a few minutes
    .venv/bin/python -m bench.farm --quick    # 2-minute file, smoke check, writes nothing

Target: farm time / direct time <= 1.10. Farm time runs from the start of the upload
to the transcription's `finished_at` on the board (chunking, claims, reads, model,
merge); the workers have loaded their model and registered before it starts, and
their start-up is reported on its own. Direct time is `BatchedInferencePipeline.
transcribe(path)` including decoding the file, with its segments consumed.
"""

from __future__ import annotations

import random
import statistics
import subprocess
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np
from faster_whisper import BatchedInferencePipeline, WhisperModel

from bench import log
from bench.harness import Farm, media
from bench.machine import Disturbances
from bench.memory import Peaks, RssSampler, merge_peaks, peaks_text
from bench.phases import Phases, breakdown, phase_lines, phases
from bench.results import (
    TARGETS_HEADER,
    bench_parser,
    command_line,
    header_lines,
    run,
    run_options,
    seconds_list,
    verdict,
)
from tests.speech import PARAGRAPHS, MediaFactory, decode, word_error_rate
from worker.audio import SAMPLE_RATE, ffmpeg_binary
from worker.chunking import plan_source
from worker.engines import resolve_model

SECTION = "## Farm vs. direct faster-whisper, one long file (bench/farm.py)"
TARGET_RATIO = 1.10
THREADS = 2  # the machine's cores: the direct run gets both, each worker one
BATCH_SIZE = 8  # windows per model call, both sides
SERVER_DEFAULT_CHUNK = 60.0  # SCRIBEFARM_DEFAULT_CHUNK_SECONDS' default


@dataclass(frozen=True)
class Config:
    """A farm setting tried through existing options only."""

    batch_size: int = BATCH_SIZE  # scribefarm worker --batch-size
    target_chunk: float | None = None  # per-submission target_chunk_seconds
    workers: int = 2
    threads: int = 1  # scribefarm worker --threads

    @property
    def shape(self) -> tuple[int, int, int]:
        """What the worker processes are started with."""
        return self.workers, self.threads, self.batch_size

    @property
    def label(self) -> str:
        chunk = f"{self.target_chunk:g} s" if self.target_chunk else "default (60 s)"
        return (
            f"{self.workers} worker(s) × {self.threads} thread(s), --batch-size "
            f"{self.batch_size}, chunks {chunk}"
        )

    @classmethod
    def parse(cls, text: str) -> Config:
        """`[WORKERSxTHREADS/]BATCH:[CHUNK]`, e.g. `8:`, `8:30`, `1x2/8:`."""
        shape, _, rest = text.rpartition("/")
        workers, _, threads = (shape or "2x1").partition("x")
        size, _, chunk = rest.partition(":")
        return cls(int(size), float(chunk) if chunk else None, int(workers), int(threads))


DEFAULT = Config()


@dataclass
class Options:
    seconds: float
    repeats: int
    configs: list[Config]
    hour_loops: int
    quick: bool
    quiet_timeout: float
    record: bool


@dataclass
class FarmRun:
    seconds: float
    wer: float
    phases: Phases
    chunks: int
    cached: int  # chunks answered from the cache: must be 0, or the run proves nothing


@dataclass
class Results:
    duration: float = 0.0
    direct_load: float = 0.0
    worker_load: list[float] = field(default_factory=list)
    direct: dict[tuple[int, int, int], list[float]] = field(default_factory=dict)  # by shape
    direct_wer: float = 0.0
    farm: dict[Config, list[FarmRun]] = field(default_factory=dict)
    rss: Peaks = field(default_factory=dict)
    plan: list[tuple[float, float, int]] = field(default_factory=list)  # s, audio s, chunks
    disturbances: Disturbances = field(default_factory=Disturbances)


# --- the speech ----------------------------------------------------------------------


def long_speech(factory: MediaFactory, seconds: float) -> tuple[Path, str]:
    """PARAGRAPHS over and over with gaps of about a second until `seconds` long.

    Each repetition is read at a different speed and gaps vary a little: a periodic
    file could cut into identical chunks, which the chunk cache would answer without
    the model, flattering the farm."""
    rng = random.Random(20261122)
    pieces: list[np.ndarray] = []
    texts: list[str] = []
    total, i = 0.0, 0
    while total < seconds:
        text = PARAGRAPHS[i % len(PARAGRAPHS)]
        speed = (150, 160, 170, 155, 165)[(i // len(PARAGRAPHS)) % 5]
        speech = decode(factory.speech(text, words_per_minute=speed))
        gap = np.zeros(round(rng.uniform(0.8, 1.2) * SAMPLE_RATE), dtype=np.float32)
        pieces += [speech, gap]
        texts.append(text)
        total += (speech.size + gap.size) / SAMPLE_RATE
        i += 1
    path = factory.write_wav(np.concatenate(pieces[:-1]))
    return path, " ".join(texts)


def hour_source(factory: MediaFactory, source: Path, loops: int) -> Path:
    """`source` played `loops` times, as a VBR MP3: an hour-long upload."""
    out = factory.directory / f"{source.stem}-x{loops}.mp3"
    if not out.exists():
        tmp = out.with_name("tmp-" + out.name)
        cmd = [ffmpeg_binary(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y",
               "-stream_loop", str(loops - 1), "-i", str(source),
               "-c:a", "libmp3lame", "-q:a", "4", str(tmp)]  # fmt: skip
        subprocess.run(cmd, check=True)
        tmp.replace(out)
    return out


# --- the two ways ----------------------------------------------------------------------


def load_direct() -> tuple[BatchedInferencePipeline, float]:
    started = time.perf_counter()
    model = WhisperModel(
        resolve_model("tiny.en"), device="cpu", compute_type="int8", cpu_threads=THREADS
    )
    return BatchedInferencePipeline(model), time.perf_counter() - started


def run_direct(pipeline: BatchedInferencePipeline, path: Path) -> tuple[float, str]:
    """The pipeline as a user runs it: its defaults (VAD windows, beam 5, no timestamp
    tokens), the batch size both sides use."""
    started = time.perf_counter()
    segments, _ = pipeline.transcribe(str(path), batch_size=BATCH_SIZE)
    text = " ".join(s.text for s in segments)  # a generator: the work happens here
    return time.perf_counter() - started, text


def run_farm(farm: Farm, path: Path, config: Config, reference: str, rss: Results) -> FarmRun:
    farm.clear_cache()
    options = {"language": "en"}
    if config.target_chunk:
        options["target_chunk_seconds"] = str(config.target_chunk)
    with RssSampler(farm.worker_pids()) as sampler:
        tid, began = farm.submit(path, **options)
        row = farm.wait_finished([tid], timeout=900)[tid]
    if row["state"] != "succeeded":
        raise RuntimeError(f"the farm's transcription {row['state']}: {row['error']}")
    workers, threads, size = config.shape
    merge_peaks(rss.rss, sampler, f"{workers}×{threads} threads, --batch-size {size}")
    assert farm.server is not None
    cached = farm.server.sql(
        "SELECT count(*) FILTER (WHERE (result->>'cached')::bool) AS cached, count(*) AS n "
        "FROM jobs WHERE transcription_id = $1::uuid AND kind = 'transcribe'",
        tid,
    )[0]
    return FarmRun(
        seconds=row["finished_at"].timestamp() - began,
        wer=word_error_rate(reference, farm.transcript_text(tid)),
        phases=phases(farm.server, {tid: began}),
        chunks=cached["n"],
        cached=cached["cached"],
    )


def warm_up(pipeline: BatchedInferencePipeline, farm: Farm, factory: MediaFactory) -> None:
    """One short transcription each way first: first-call allocations, imports and
    connection set-up are then not in either side's measured time."""
    short = factory.speech(PARAGRAPHS[0])
    run_direct(pipeline, short)
    tid, _ = farm.submit(short, language="en")
    farm.wait_finished([tid], timeout=300)


# --- the planner ----------------------------------------------------------------------


def plan_speed(path: Path) -> tuple[float, float, int]:
    started = time.perf_counter()
    plan = plan_source(str(path), SERVER_DEFAULT_CHUNK, 2 * SERVER_DEFAULT_CHUNK)
    return time.perf_counter() - started, plan.duration_seconds, len(plan.chunks)


# --- the run ----------------------------------------------------------------------------


def measure(options: Options, work: Path) -> Results:
    factory = media()
    path, reference = long_speech(factory, options.seconds)
    results = Results(duration=decode(path).size / SAMPLE_RATE)
    log(f"speech: {results.duration:.0f} s ({path})")
    pipeline, results.direct_load = load_direct()
    farm = Farm(work).start()
    try:
        for (workers, threads, size), configs in groups(options.configs).items():
            results.worker_load += farm.start_workers(workers, threads, size)
            warm_up(pipeline, farm, factory)
            for _ in range(options.repeats):
                one_round(farm, pipeline, path, reference, configs, results)
    finally:
        farm.stop()
    hour = hour_source(factory, path, options.hour_loops)
    log(f"planning {hour.name} ({options.hour_loops} × the file)…")
    results.plan = [plan_speed(hour) for _ in range(2)]
    return results


def groups(configs: list[Config]) -> dict[tuple[int, int, int], list[Config]]:
    """Configs by worker shape: workers restart only when it changes."""
    by_shape: dict[tuple[int, int, int], list[Config]] = {}
    for config in configs:
        by_shape.setdefault(config.shape, []).append(config)
    return by_shape


def one_round(
    farm: Farm,
    pipeline: BatchedInferencePipeline,
    path: Path,
    reference: str,
    configs: list[Config],
    results: Results,
) -> None:
    """A direct run, then each farm setting: side by side, so drifts in the machine's
    load hit both alike."""
    measure = results.disturbances.measure
    seconds, text = measure("a direct run", lambda: run_direct(pipeline, path), farm.cpu_watch())
    results.direct.setdefault(configs[0].shape, []).append(seconds)
    results.direct_wer = word_error_rate(reference, text)
    log(f"direct: {seconds:.2f} s, WER {results.direct_wer:.3f}")
    for config in configs:
        run = measure(
            f"a farm run [{config.label}]",
            lambda c=config: run_farm(farm, path, c, reference, results),
            farm.cpu_watch(),
        )
        results.farm.setdefault(config, []).append(run)
        log(
            f"farm [{config.label}]: {run.seconds:.2f} s, WER {run.wer:.3f}, "
            f"{run.chunks} chunks, ratio {run.seconds / seconds:.3f}"
        )


# --- the report -------------------------------------------------------------------------


def ratio(results: Results, config: Config) -> float:
    farm = statistics.median(r.seconds for r in results.farm[config])
    return farm / statistics.median(results.direct[config.shape])


def report(results: Results, info: dict[str, str], load_start: str, quiet: bool) -> str:
    default = ratio(results, DEFAULT)
    best = min(results.farm, key=lambda c: ratio(results, c))
    lines = header_lines(info, command_line(), load_start, quiet) + TARGETS_HEADER
    lines += [
        f"| farm time / direct time ≤ {TARGET_RATIO:.2f} (defaults) | {default:.3f} | "
        f"{verdict(default <= TARGET_RATIO)} |",
        f"| same, best setting tried ({best.label}) | {ratio(results, best):.3f} | "
        f"{verdict(ratio(results, best) <= TARGET_RATIO)} |",
        "",
        *run_table(results),
        "",
        *memory_lines(results),
        "",
        "### Where the farm's time goes (defaults, last run)",
        "",
        *phase_lines(results.farm[DEFAULT][-1].phases),
        "",
        *method_lines(results),
    ]
    return "\n".join(lines) + "\n"


def run_table(results: Results) -> list[str]:
    lines = [
        f"### {results.duration:.0f} s of speech (`tiny.en`, int8, CPU), medians of "
        f"{len(next(iter(results.farm.values())))} runs",
        "",
        "| way | setting | seconds (each run) | × realtime | farm / direct | WER | chunks |",
        "|---|---|---|---:|---:|---:|---:|",
    ]
    for (workers, threads, size), times in results.direct.items():
        lines.append(
            f"| direct, 1 process × {THREADS} threads | batch_size {BATCH_SIZE} (beside "
            f"{workers}×{threads}, --batch-size {size}) | {seconds_list(times)} | "
            f"{results.duration / statistics.median(times):.1f} | | "
            f"{results.direct_wer:.3f} | |"
        )
    for config, runs in results.farm.items():
        median = statistics.median(r.seconds for r in runs)
        lines.append(
            f"| farm | {config.label} | "
            f"{seconds_list([r.seconds for r in runs])} | {results.duration / median:.1f} | "
            f"{ratio(results, config):.3f} | {runs[-1].wer:.3f} | "
            f"{runs[-1].chunks} ({sum(r.cached for r in runs)} cached) |"
        )
    return lines + breakdown(
        {c.label: [r.phases for r in runs] for c, runs in results.farm.items()}
    )


def memory_lines(results: Results) -> list[str]:
    seconds = statistics.median(p[0] for p in results.plan)
    _, audio, chunks = results.plan[0]
    loads = [f"{v:.1f}" for v in results.worker_load]
    return [
        "### Start-up, memory, planner, other load",
        "",
        f"- model load: direct `WhisperModel(...)` {results.direct_load:.2f} s; worker "
        f"process start → registered (imports, model, registration) {', '.join(loads)} s",
        f"- peak worker RSS over the farm runs (sampled every 0.1 s): {peaks_text(results.rss)}",
        f"- chunk planner (`plan_source`, 60 s target) on a {audio / 60:.0f}-minute VBR MP3: "
        f"{seconds_list([p[0] for p in results.plan])} s, **{audio / seconds:.0f}× realtime**, "
        f"{chunks} chunks (ffmpeg decoding in its own process, the loudness envelope in "
        "Python; run twice after the farm stopped)",
        f"- {results.disturbances.text()}",
    ]


def method_lines(results: Results) -> list[str]:
    return [
        "How it was measured:",
        "- Speech: espeak-ng reads `tests.speech.PARAGRAPHS` over and over (each round at "
        "another speed, 150–170 words/min) with 0.8–1.2 s gaps, one 16 kHz WAV; the "
        "reference is the text read. WER: jiwer after Whisper's English normalizer.",
        f"- Direct: one `WhisperModel(tiny.en, cpu, int8, cpu_threads={THREADS})`, "
        f"`BatchedInferencePipeline.transcribe(path, batch_size={BATCH_SIZE})` with its "
        "default options, decoding the file included, segments consumed.",
        "- Farm: a real `scribefarm server` (embedded PostgreSQL) and two `scribefarm worker "
        "--threads 1` processes (for comparison also one `--threads 2` worker: the shape "
        "`scribefarm up` picked on 2 cores before f5118a1), registered (model loaded) before "
        "the upload; time from the upload's start to the transcription's `finished_at` on "
        "the board. The chunk cache is emptied before every run, and the file is not "
        "periodic, so no chunk is answered from it (the table counts any that were).",
        "- Both sides transcribe one short clip first (warm-up); direct and farm runs "
        "alternate in one process, so both see the same machine.",
        "- Phases come from the board's rows: the transcription's `created_at`/"
        "`finished_at`, each job's `leased_at`/`finished_at`/worker, and the model time "
        "each transcribe job reports (`processing_seconds`).",
    ]


# --- main -------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> Options:
    p = bench_parser(__doc__, "2-minute file", quiet_timeout=1800)
    p.add_argument("--repeats", type=int, default=None, help="runs of each (3; quick: 1)")
    p.add_argument(
        "--configs",
        default="8:,8:30,4:,1x2/8:",
        help="farm settings, [WORKERSxTHREADS/]BATCH_SIZE:[TARGET_CHUNK_SECONDS] (2x1 and "
        "the server's 60 s when left out); the first must be the defaults",
    )
    args = p.parse_args(argv)
    configs = [Config.parse(c) for c in args.configs.split(",")]
    if configs[0] != DEFAULT:
        p.error(f"the first --configs entry must be the defaults ({BATCH_SIZE}:)")
    return Options(
        seconds=120 if args.quick else 600,
        repeats=args.repeats or (1 if args.quick else 3),
        configs=configs,
        hour_loops=6,
        quick=args.quick,
        **run_options(args),
    )


def main(argv: list[str] | None = None) -> None:
    run(SECTION, parse(argv), measure, report)


if __name__ == "__main__":
    main()
