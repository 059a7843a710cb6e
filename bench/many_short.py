"""Many short files: the farm's cross-job batching (2 workers × 1 thread) against a loop
calling faster-whisper once per file (one process, 2 threads), same model and cores.

    .venv/bin/python -m bench.many_short            # 100 clips of 5–20 s, a few minutes
    .venv/bin/python -m bench.many_short --quick    # 20 clips, writes nothing

Target: the farm at least 1.5× faster than the loop. Farm time runs from the start of
the first upload to the last transcription's `finished_at` on the board; the workers
have loaded their model and registered before. Every clip has its own text (and the
chunk cache is emptied before each farm run, since each round submits the same clips
again), so no result comes from the cache.
"""

from __future__ import annotations

import multiprocessing
import os
import random
import re
import statistics
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from faster_whisper import BatchedInferencePipeline, WhisperModel

from bench import log
from bench.harness import Farm, media
from bench.machine import Disturbances
from bench.memory import Peaks, RssSampler, merge_peaks, peaks_text
from bench.phases import Phases, breakdown, phase_lines, phases
from bench.results import (
    bench_parser,
    command_line,
    header_lines,
    run,
    run_options,
    seconds_list,
    verdict,
)
from tests.speech import PARAGRAPHS, MediaFactory, decode, word_error_rate
from worker.audio import SAMPLE_RATE
from worker.engines import resolve_model

SECTION = "## Farm vs. a faster-whisper loop, many short files (bench/many_short.py)"
TARGET_SPEEDUP = 1.5
THREADS = 2
BATCH_SIZE = 8
SHORTEST, LONGEST = 5.0, 20.0  # clip lengths, seconds

# Plain sentences besides the PARAGRAPHS' own, so the clips differ in wording too.
EXTRA = (
    "Please send the report to the office before noon on Friday.",
    "The train to the coast leaves from the second platform every hour.",
    "My brother planted tomatoes, beans and carrots in the garden this spring.",
    "We moved the meeting to the large room on the third floor.",
    "The library closes early on Sundays, so plan your visit in the morning.",
    "She painted the kitchen a pale shade of green last weekend.",
    "A small boat drifted slowly across the quiet lake at sunset.",
    "The doctor asked him to drink more water and to sleep eight hours.",
    "Our new neighbours have two dogs and a very friendly cat.",
    "The price of coffee went up again at the shop on the corner.",
    "He forgot his umbrella on the bus and walked home in the rain.",
    "The museum opened a new room for old maps and clocks.",
    "Turn left at the bakery and the school is on your right.",
    "The children built a tall tower out of wooden blocks.",
    "Every winter the town holds a market with music and hot food.",
    "The engineer checked the bridge and found no cracks in the steel.",
    "I will call you back after lunch to talk about the budget.",
    "The farmer sold apples, pears and fresh eggs at the gate.",
    "Birds gathered on the wires before flying south for the winter.",
    "The bus was late, so we shared a taxi to the station.",
    "Write your name at the top of the page and answer every question.",
    "The hotel room had a small balcony with a view of the harbour.",
    "Our flight was delayed by two hours because of the fog.",
    "The team finished the project a week before the deadline.",
    "He fixed the old bicycle and rode it to work every day.",
)


@dataclass
class Options:
    clips: int
    repeats: int
    batch_sizes: list[int]
    loops: list[str]
    quick: bool
    quiet_timeout: float
    record: bool


@dataclass
class Clip:
    path: Path
    text: str
    seconds: float


@dataclass
class FarmRun:
    seconds: float
    wer: float
    phases: Phases
    cached: int


@dataclass
class Results:
    clips: int = 0
    audio: float = 0.0
    direct_load: float = 0.0
    worker_load: list[float] = field(default_factory=list)
    loops: dict[str, list[float]] = field(default_factory=dict)  # loop name → seconds per round
    wer: dict[str, float] = field(default_factory=dict)
    farm: dict[int, list[FarmRun]] = field(default_factory=dict)  # by --batch-size
    rss: Peaks = field(default_factory=dict)
    disturbances: Disturbances = field(default_factory=Disturbances)


# --- the clips -------------------------------------------------------------------------


def sentences() -> list[str]:
    split = [s for p in PARAGRAPHS for s in re.split(r"(?<=\.)\s+", p)]
    return split + list(EXTRA)


def make_clips(factory: MediaFactory, count: int) -> list[Clip]:
    """`count` clips of 5–20 s, each a distinct run of sentences at its own speed."""
    rng = random.Random(5)
    pool, seen, clips = sentences(), set(), []
    while len(clips) < count:
        aim = rng.uniform(SHORTEST, LONGEST)
        speed = rng.randrange(140, 185, 5)
        words = aim * speed / 60
        picked: list[str] = []
        while sum(len(s.split()) for s in picked) < words * 0.9:
            picked.append(rng.choice([s for s in pool if s not in picked]))
        text = " ".join(picked)
        if text in seen:
            continue
        path = factory.speech(text, words_per_minute=speed)
        seconds = decode(path).size / SAMPLE_RATE
        if SHORTEST <= seconds <= LONGEST:
            seen.add(text)
            clips.append(Clip(path, text, seconds))
    return clips


# --- the loop ---------------------------------------------------------------------------


def load_direct() -> tuple[WhisperModel, float]:
    started = time.perf_counter()
    model = WhisperModel(
        resolve_model("tiny.en"), device="cpu", compute_type="int8", cpu_threads=THREADS
    )
    return model, time.perf_counter() - started


def transcribe_batched(model: WhisperModel, paths: list[str]) -> list[str]:
    """The pipeline with its default options (VAD windows, beam 5, no timestamp tokens) and
    batch_size 8 (one window per short clip, so no batching happens inside a file)."""
    pipeline = BatchedInferencePipeline(model)
    texts = []
    for path in paths:
        segments, _ = pipeline.transcribe(path, batch_size=BATCH_SIZE)
        texts.append(" ".join(s.text for s in segments))  # a generator: the work is here
    return texts


def loop_batched(model: WhisperModel, clips: list[Clip]) -> tuple[float, str]:
    started = time.perf_counter()
    texts = transcribe_batched(model, [str(c.path) for c in clips])
    return time.perf_counter() - started, " ".join(texts)


def loop_plain(model: WhisperModel, clips: list[Clip]) -> tuple[float, str]:
    """What most scripts do: `WhisperModel.transcribe` with its defaults (beam 5, no VAD)."""
    started = time.perf_counter()
    texts = []
    for clip in clips:
        segments, _ = model.transcribe(str(clip.path), beam_size=5)
        texts.append(" ".join(s.text for s in segments))
    return time.perf_counter() - started, " ".join(texts)


class SplitLoop:
    """Two 1-thread processes, each looping over half the clips: both cores used without
    a farm. Not the target's baseline (that is one loop); it shows what the farm adds
    beyond running two processes."""

    def __init__(self, warm_up: Path) -> None:
        context = multiprocessing.get_context("spawn")  # no fork of a process with a model
        self.pool = context.Pool(2, initializer=_child_init, initargs=(str(warm_up),))
        seen: set[int] = set()
        while len(seen) < 2:  # a task runs only after its process's initializer
            seen.update(self.pool.map(_child_pid, [0.5, 0.5], chunksize=1))

    def __call__(self, _: WhisperModel, clips: list[Clip]) -> tuple[float, str]:
        halves = [[str(c.path) for c in clips[i::2]] for i in (0, 1)]
        started = time.perf_counter()
        first, second = self.pool.map(_child_loop, halves, chunksize=1)
        seconds = time.perf_counter() - started
        texts = [first[i // 2] if i % 2 == 0 else second[i // 2] for i in range(len(clips))]
        return seconds, " ".join(texts)

    def close(self) -> None:
        self.pool.terminate()
        self.pool.join()


_child_model: WhisperModel | None = None


def _child_init(warm_up: str) -> None:
    global _child_model
    _child_model = WhisperModel(
        resolve_model("tiny.en"), device="cpu", compute_type="int8", cpu_threads=1
    )
    transcribe_batched(_child_model, [warm_up])


def _child_pid(pause: float) -> int:
    time.sleep(pause)  # long enough for the other process to take the other task
    return os.getpid()


def _child_loop(paths: list[str]) -> list[str]:
    assert _child_model is not None
    return transcribe_batched(_child_model, paths)


# --- the farm ---------------------------------------------------------------------------


def run_farm(farm: Farm, clips: list[Clip], size: int, results: Results) -> FarmRun:
    """Uploads every clip one after another (as a script would), then waits for all."""
    farm.clear_cache()
    submitted: dict[str, float] = {}
    with RssSampler(farm.worker_pids()) as sampler:
        for clip in clips:
            tid, began = farm.submit(clip.path, language="en")
            submitted[tid] = began
        rows = farm.wait_finished(list(submitted), timeout=900)
    failed = [r for r in rows.values() if r["state"] != "succeeded"]
    if failed:
        raise RuntimeError(f"{len(failed)} transcription(s) did not succeed: {failed[0]}")
    merge_peaks(results.rss, sampler, f"--batch-size {size}")
    assert farm.server is not None
    cached = farm.server.sql(
        "SELECT count(*) AS n FROM jobs WHERE transcription_id::text = ANY($1) "
        "AND (result->>'cached')::bool",
        list(submitted),
    )[0]["n"]
    text = " ".join(farm.transcript_text(tid) for tid in submitted)
    return FarmRun(
        seconds=max(r["finished_at"].timestamp() for r in rows.values()) - min(submitted.values()),
        wer=word_error_rate(" ".join(c.text for c in clips), text),
        phases=phases(farm.server, submitted),
        cached=cached,
    )


def start_workers(farm: Farm, size: int, clips: list[Clip], results: Results) -> None:
    """Fresh workers with this batch size, warmed up on one clip (first-call allocations
    and connections are then not in the measured time; the loops get the same)."""
    results.worker_load += farm.start_workers(2, 1, size)
    tid, _ = farm.submit(clips[0].path, language="en")
    farm.wait_finished([tid], timeout=300)


# --- the run ----------------------------------------------------------------------------


def measure(options: Options, work: Path) -> Results:
    clips = make_clips(media(), options.clips)
    results = Results(clips=len(clips), audio=sum(c.seconds for c in clips))
    log(f"{len(clips)} clips, {results.audio:.0f} s of speech")
    model, results.direct_load = load_direct()
    loops: dict[str, Loop] = {name: LOOPS[name] for name in options.loops if name != "split"}
    for loop in loops.values():
        loop(model, clips[:1])  # warm-up
    split = SplitLoop(clips[0].path) if "split" in options.loops else None
    if split:
        loops["split"] = split
    farm = Farm(work).start()
    try:
        for _ in range(options.repeats):
            one_round(farm, model, clips, loops, options.batch_sizes, results)
    finally:
        farm.stop()
        if split:
            split.close()
    return results


def one_round(
    farm: Farm,
    model: WhisperModel,
    clips: list[Clip],
    loops: dict[str, Loop],
    sizes: list[int],
    results: Results,
) -> None:
    """Both loops, then the farm at each batch size: side by side, so drifts in the
    machine's load hit all alike."""
    reference = " ".join(c.text for c in clips)
    measure = results.disturbances.measure
    for name, loop in loops.items():
        seconds, text = measure(
            f"the {name} loop", lambda f=loop: f(model, clips), farm.cpu_watch()
        )
        results.loops.setdefault(name, []).append(seconds)
        results.wer[name] = word_error_rate(reference, text)
        log(f"loop ({name}): {seconds:.2f} s, WER {results.wer[name]:.3f}")
    for size in sizes:
        if farm.batch_size != size:
            start_workers(farm, size, clips, results)
        run = measure(
            f"a farm run (--batch-size {size})",
            lambda s=size: run_farm(farm, clips, s, results),
            farm.cpu_watch(),
        )
        results.farm.setdefault(size, []).append(run)
        log(f"farm (--batch-size {size}): {run.seconds:.2f} s, WER {run.wer:.3f}")


Loop = Callable[[WhisperModel, list[Clip]], tuple[float, str]]
LOOPS: dict[str, Loop] = {"batched": loop_batched, "plain": loop_plain}


# --- the report -------------------------------------------------------------------------


def speedup(results: Results, size: int, loop: str) -> float:
    farm = statistics.median(r.seconds for r in results.farm[size])
    return statistics.median(results.loops[loop]) / farm


def fastest_loop(results: Results) -> str:
    """The target's baseline: the faster one-process loop (stricter than either)."""
    single = [name for name in results.loops if name != "split"]
    return min(single, key=lambda name: statistics.median(results.loops[name]))


def report(results: Results, info: dict[str, str], load_start: str, quiet: bool) -> str:
    default = next(iter(results.farm))
    loop = fastest_loop(results)
    best = max(results.farm, key=lambda size: speedup(results, size, loop))
    lines = header_lines(info, command_line(), load_start, quiet)
    lines += [
        "",
        "### Targets",
        "",
        f"| target | measured (vs. the faster loop, `{loop}`) | |",
        "|---|---|---|",
        *target_rows(results, loop, default, best),
        "",
        *run_table(results),
        "",
        *extra_lines(results),
        "",
        f"### Where the farm's time goes (--batch-size {default}, last run)",
        "",
        *phase_lines(results.farm[default][-1].phases),
        "",
        *method_lines(),
    ]
    return "\n".join(lines) + "\n"


def target_rows(results: Results, loop: str, default: int, best: int) -> list[str]:
    rows = []
    for label, size in (("defaults", default), ("best setting tried", best)):
        value = speedup(results, size, loop)
        rows.append(
            f"| farm ≥ {TARGET_SPEEDUP}× faster than a per-file loop ({label}: --batch-size "
            f"{size}) | {value:.2f}× | {verdict(value >= TARGET_SPEEDUP)} |"
        )
    return rows


def run_table(results: Results) -> list[str]:
    default = next(iter(results.farm))
    lines = [
        f"### {results.clips} clips, {results.audio:.0f} s of speech "
        f"(`tiny.en`, int8, CPU), medians of {len(next(iter(results.loops.values())))} rounds",
        "",
        f"| way | seconds (each round) | × realtime | speed-up of the farm (--batch-size "
        f"{default}) | WER |",
        "|---|---|---:|---:|---:|",
    ]
    for name, times in results.loops.items():
        lines.append(
            f"| {LOOP_LABELS[name]} | "
            f"{seconds_list(times)} | {results.audio / statistics.median(times):.1f} | "
            f"{speedup(results, default, name):.2f}× | {results.wer[name]:.3f} |"
        )
    for size, runs in results.farm.items():
        median = statistics.median(r.seconds for r in runs)
        lines.append(
            f"| farm, 2 workers × 1 thread, --batch-size {size} | "
            f"{seconds_list([r.seconds for r in runs])} | {results.audio / median:.1f} | | "
            f"{runs[-1].wer:.3f} |"
        )
    return lines + breakdown(
        {f"--batch-size {size}": [r.phases for r in runs] for size, runs in results.farm.items()}
    )


LOOP_LABELS = {
    "batched": f"loop, 1 process × {THREADS} threads, "
    f"`BatchedInferencePipeline.transcribe(batch_size={BATCH_SIZE})`",
    "plain": f"loop, 1 process × {THREADS} threads, `WhisperModel.transcribe(beam_size=5)`",
    "split": "2 loops in parallel, 2 processes × 1 thread, half the clips each, "
    "batched pipeline (not the target's baseline)",
}


def extra_lines(results: Results) -> list[str]:
    cached = sum(r.cached for runs in results.farm.values() for r in runs)
    return [
        "### Start-up, memory, cache, other load",
        "",
        f"- model load: direct {results.direct_load:.2f} s; worker process start → "
        f"registered (imports, model, registration) "
        f"{', '.join(f'{v:.1f}' for v in results.worker_load)} s",
        f"- peak worker RSS over the farm runs (sampled every 0.1 s): {peaks_text(results.rss)}",
        f"- transcribe jobs answered from the chunk cache: {cached}",
        f"- {results.disturbances.text()}",
    ]


def method_lines() -> list[str]:
    return [
        "How it was measured:",
        f"- Clips: espeak-ng reads runs of plain sentences (the PARAGRAPHS' and {len(EXTRA)} "
        f"more), each clip a distinct text at its own speed (140–180 words/min), "
        f"{SHORTEST:g}–{LONGEST:g} s long; reference: the texts read. WER: jiwer after "
        "Whisper's English normalizer, over all clips joined.",
        f"- Loops: one `WhisperModel(tiny.en, cpu, int8, cpu_threads={THREADS})`, every "
        "clip transcribed from its file in turn (decoding included, segments consumed); the "
        "target compares the farm with the faster one-process loop run. The split loop runs "
        "two such loops at once in two processes with 1 thread each (loaded and warmed up "
        "beforehand), alternate clips each: both cores busy, without a farm.",
        "- Farm: a real `scribefarm server` (embedded PostgreSQL), two `scribefarm worker "
        "--threads 1` processes registered before the first upload; the clips are uploaded "
        "one after another from one client; time from the first upload's start to the last "
        "`finished_at`. The chunk cache is emptied before each farm run.",
        "- One clip each way first (warm-up); each round runs the loops, then the farm at "
        "each batch size (fresh workers when it changes), all in one process.",
    ]


# --- main -------------------------------------------------------------------------------


def parse(argv: list[str] | None) -> Options:
    p = bench_parser(__doc__, "20 clips", quiet_timeout=1800)
    p.add_argument("--clips", type=int, default=None, help="how many clips (100; quick: 20)")
    p.add_argument("--repeats", type=int, default=None, help="rounds (2; quick: 1)")
    p.add_argument(
        "--batch-sizes", default="8,16", help="worker --batch-size values; the first is reported "
        "as the defaults' figure"
    )  # fmt: skip
    p.add_argument(
        "--loops",
        default="batched,split",
        help="baselines: batched, plain (one process, 2 threads), split (2 × 1 thread)",
    )
    args = p.parse_args(argv)
    return Options(
        clips=args.clips or (20 if args.quick else 100),
        repeats=args.repeats or (1 if args.quick else 2),
        batch_sizes=[int(s) for s in args.batch_sizes.split(",")],
        loops=args.loops.split(","),
        quick=args.quick,
        **run_options(args),
    )


def main(argv: list[str] | None = None) -> None:
    run(SECTION, parse(argv), measure, report)


if __name__ == "__main__":
    main()
