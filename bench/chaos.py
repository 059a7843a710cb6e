"""Chaos, the long run: tests/chaos's scenario with longer files, for as many rounds
as it takes to inject at least --min-faults faults.

    .venv/bin/python -m bench.chaos                 # 30 files of about 3 minutes, 200+ faults
    .venv/bin/python -m bench.chaos --quick         # 6 short files, one round, writes nothing
    .venv/bin/python -m bench.chaos --seed 1234     # repeat a schedule

A real farm (its own embedded PostgreSQL, `scribefarm server`, moto's S3 behind a
fault-injecting proxy, 4 worker processes with `--threads 1`, each behind a TCP proxy)
transcribes every file once without faults (the baseline), then again in rounds while
workers and the server are SIGKILLed, PostgreSQL is restarted, storage fails a share of
requests and workers lose the network for longer than a lease (tests/chaos/harness.py).

Targets: every transcription succeeds, every transcript equals its fault-free one, and
the board's counters agree with its rows (tests/chaos/harness.py: check_round), over at
least 200 faults. The figures go to bench/RESULTS.md under "## Chaos (bench/chaos.py)".
"""

from __future__ import annotations

import random
import shutil
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from bench import log
from bench.harness import media
from bench.machine import load_average, machine_info, wait_until_quiet
from bench.results import (
    TARGETS_HEADER,
    bench_parser,
    command_line,
    header_lines,
    publish,
    recorded,
    verdict,
)
from tests.chaos.harness import KINDS, LABELS, ChaosConfig, ChaosFarm, RoundReport, make_files

SECTION = "## Chaos (bench/chaos.py)"


@dataclass
class Options:
    files: int
    paragraphs: int
    min_faults: int
    max_rounds: int
    seed: int
    fault_gap: tuple[float, float]
    quiet_timeout: float
    record: bool


def parse(argv: list[str] | None) -> Options:
    p = bench_parser(__doc__, "6 files of 2 paragraphs, one round", quiet_timeout=300)
    p.add_argument("--files", type=int, default=None, help="files per round (30; quick: 6)")
    p.add_argument(
        "--paragraphs", type=int, default=None,
        help="paragraphs per file, about 17 s each (11: about 3 minutes; quick: 2)",
    )  # fmt: skip
    p.add_argument("--min-faults", type=int, default=None, help="rounds until this many (200)")
    p.add_argument("--max-rounds", type=int, default=10, help="stop after this many rounds")
    p.add_argument("--seed", type=int, default=None, help="the schedule's seed (random)")
    p.add_argument("--fault-gap", default="1.5,5", help="seconds between faults: min,max")
    args = p.parse_args(argv)
    low, high = (float(x) for x in args.fault_gap.split(","))
    return Options(
        files=args.files or (6 if args.quick else 30),
        paragraphs=args.paragraphs or (2 if args.quick else 11),
        min_faults=args.min_faults if args.min_faults is not None else (0 if args.quick else 200),
        max_rounds=1 if args.quick else args.max_rounds,
        seed=args.seed if args.seed is not None else random.SystemRandom().randrange(1_000_000),
        fault_gap=(low, high),
        quiet_timeout=0 if args.quick else args.quiet_timeout,
        record=recorded(args),
    )


@dataclass
class Results:
    options: Options
    config: ChaosConfig
    audio_per_round: float
    baseline_seconds: float
    rounds: list[RoundReport]

    def faults(self) -> dict[str, int]:
        return {k: sum(r.fault_counts()[k] for r in self.rounds) for k in KINDS}


def measure(options: Options, root: Path) -> Results:
    config = ChaosConfig(
        seed=options.seed,
        files=options.files,
        paragraphs=(options.paragraphs,),
        fault_gap=options.fault_gap,
        # A round of 30 three-minute files takes 10 to 20 minutes under chaos.
        round_timeout=3600.0,
    )
    log(f"chaos seed {options.seed} (--seed {options.seed} repeats this schedule)")
    files = make_files(media(), config.files, config.paragraphs)
    audio = sum(f.seconds for f in files)
    log(f"{len(files)} files, {audio / 60:.0f} minutes of speech per round")
    rounds: list[RoundReport] = []
    with ChaosFarm(root, config) as farm:
        started = time.monotonic()
        baseline = farm.baseline(files)
        baseline_seconds = time.monotonic() - started
        while len(rounds) < options.max_rounds:
            report = farm.chaos_round(files, len(rounds) + 1, baseline)
            rounds.append(report)
            log(report.summary())
            for problem in report.problems:
                log(f"  PROBLEM {problem}")
            if sum(len(r.faults) for r in rounds) >= options.min_faults:
                break
    return Results(options, config, audio, baseline_seconds, rounds)


def report(results: Results, info: dict[str, str], load_start: str, quiet: bool) -> str:
    options, config, rounds = results.options, results.config, results.rounds
    faults = results.faults()
    total = sum(faults.values())
    transcriptions = sum(r.transcriptions for r in rounds)
    succeeded = sum(r.succeeded for r in rounds)
    differences = sum(len(r.differences) for r in rounds)
    problems = sum(len(r.problems) for r in rounds)
    lines = header_lines(info, command_line(), load_start, quiet) + TARGETS_HEADER
    lines += [
        f"| every transcription succeeds | {succeeded} of {transcriptions} "
        f"({100 * succeeded / max(transcriptions, 1):.0f} %) | "
        f"{verdict(succeeded == transcriptions)} |",
        f"| every transcript equals its fault-free one | {differences} differences | "
        f"{verdict(differences == 0)} |",
        f"| the board's counters agree with its rows, nothing left queued or leased | "
        f"{problems - differences} other problems | {verdict(problems == differences)} |",
        f"| at least {options.min_faults} faults | {total} | "
        f"{verdict(total >= options.min_faults)} |",
        "",
        f"### Faults injected (seed {options.seed})",
        "",
        "| fault | count |",
        "|---|---:|",
        *(f"| {LABELS[kind]} | {faults[kind]} |" for kind in KINDS),
        f"| **all** | **{total}** |",
        "",
        f"Object storage answered {sum(r.storage_requests_failed for r in rounds)} of "
        f"{sum(r.storage_requests for r in rounds)} requests with 500 or 503.",
        "",
        "### Rounds",
        "",
        "| round | transcriptions | duplicate submissions | transcribe jobs (from the cache) "
        "| audio min | "
        "minutes | faults | claims | jobs claimed more than once | most claims of one job | "
        "submissions retried | differences | problems |",
        "|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rounds:
        lines.append(
            f"| {r.round} | {r.transcriptions} | {r.duplicates} | {r.transcribe_jobs} "
            f"({r.cached_jobs}) | "
            f"{r.audio_seconds / 60:.0f} | {r.seconds / 60:.1f} | {len(r.faults)} | {r.claims} | "
            f"{r.retried_jobs} | {r.max_attempts} | {r.submit_retries} | "
            f"{len(r.differences)} | {len(r.problems)} |"
        )
    for r in rounds:
        for problem in r.problems:
            lines.append(f"- round {r.round}: {problem}")
    lines += [
        "",
        "How it was run:",
        f"- {config.files} WAV files per round, each {options.paragraphs} of "
        f"`tests.speech.PARAGRAPHS` in its own order, read by espeak-ng at its own speed, "
        f"{results.audio_per_round / 60:.0f} minutes in all; the server's default 60 s "
        "chunks. No two files share audio, so no chunk is answered from the chunk cache "
        "(checked) except one of a duplicate submission (a try whose answer was lost "
        "to a fault had stored the transcription after all, and the retry made a twin); "
        "the cache is emptied before each round and `SCRIBEFARM_DEDUP=false`.",
        f"- {config.workers} `scribefarm worker {' '.join(config.worker_options)}` "
        f"processes; `SCRIBEFARM_LEASE_SECONDS={config.lease_seconds:g}`, retry base "
        f"{config.retry_base_seconds:g} s (at most {config.retry_max_seconds:g} s), "
        f"`SCRIBEFARM_MAX_ATTEMPTS={config.max_attempts}` (far above what faults use up: "
        "a job dying of chaos would measure the limit, not the farm), every transcript "
        "stored in the bucket (`SCRIBEFARM_INLINE_RESULT_BYTES=1`).",
        f"- Baseline: every file once without faults ({results.baseline_seconds / 60:.1f} "
        "minutes), by the same workers. Each round submits every file again, spread over "
        "its first seconds, while a seeded injector breaks one thing every "
        f"{options.fault_gap[0]:g}–{options.fault_gap[1]:g} s (kinds from a shuffled deck: "
        "each comes once in five). Restarts wait for the part to be ready again; "
        f"storage errors last {config.storage_error_seconds[0]:g}–"
        f"{config.storage_error_seconds[1]:g} s at {config.storage_error_rate[0]:.0%}–"
        f"{config.storage_error_rate[1]:.0%} of requests; a network cut lasts the lease "
        f"plus {config.cut_extra_seconds[0]:g}–{config.cut_extra_seconds[1]:g} s.",
        "- Checks after each round (tests/chaos/harness.py `check_round`): every "
        "transcription succeeded, its transcript (text, segments with times and scores, "
        "language, duration) equals the baseline's; one chunk job and jobs_total = "
        "jobs_done = its transcribe jobs, each succeeded; audio_seconds_done = the sum of "
        "its chunks; no job queued or leased anywhere; each worker's jobs_done and "
        "audio_seconds equal its succeeded jobs (the worker holding the lease a job "
        "completed on).",
    ]
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    options = parse(argv)
    quiet = wait_until_quiet(options.quiet_timeout, enabled=options.quiet_timeout > 0)
    load_start, info = load_average(), machine_info()
    work = Path(tempfile.mkdtemp(prefix="bench-chaos-"))
    results = measure(options, work)
    if any(r.problems for r in results.rounds):
        print(f"problems found: the farm's logs are kept in {work}")
    else:
        shutil.rmtree(work, ignore_errors=True)
    section = report(results, info, load_start, quiet)
    publish(SECTION, section, options.record)


if __name__ == "__main__":
    main()
