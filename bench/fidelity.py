"""Fidelity on real speech: is the farm's transcript as accurate as one pass of
faster-whisper's own pipeline over the same file?

    .venv/bin/python -m bench.fidelity            # the real-speech set (tests/realspeech.py)
    .venv/bin/python -m bench.fidelity --quick    # the CI excerpt only; writes nothing

One run, the same file, model (tiny.en, CPU int8), beam (5) and batch (8) on every side:
(a) direct: `BatchedInferencePipeline.transcribe(path, batch_size=8)` with its default
    options, as a user runs it;
(b) the farm with its defaults: a real server and two worker processes, the file uploaded;
(c) the engine alone on the whole decoded file (no chunking, its own VAD).
Each is scored with tests/scoring.py: WER after Whisper's English normalizer, deletion
runs, insertions, and the median error of segment start times against the recording's
reference word times, or, where it has none, against where each utterance's speech
starts (the first segment of each turn).

Targets (issue 12): farm WER <= direct WER + 0.3 points on every file, no more deletion
runs than direct; median segment start error <= 0.2 s.
"""

from __future__ import annotations

import argparse
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from faster_whisper import BatchedInferencePipeline, WhisperModel

from bench import log
from bench.harness import Farm
from bench.machine import load_average, machine_info, wait_until_quiet
from bench.results import command_line, header_lines, publish, verdict
from tests.realspeech import Recording, default_cache_dir, evaluation_set, excerpt
from tests.scoring import Score, TimedText, score
from tests.speech import decode
from worker.engines import EngineInput, resolve_model
from worker.engines.faster_whisper import FasterWhisperEngine

SECTION = "## Fidelity on real speech: farm vs. faster-whisper's pipeline (bench/fidelity.py)"
BATCH_SIZE = 8
THREADS = 2
WER_MARGIN = 0.003  # 0.3 points
START_ERROR_TARGET = 0.2


@dataclass
class FileResult:
    recording: Recording
    times_from: str  # where the reference word times came from
    scores: dict[str, Score]
    onset_errors: dict[str, float | None]  # median, against each utterance's speech onset
    seconds: dict[str, float]


def direct(model: WhisperModel, path: Path) -> TimedText:
    pipeline = BatchedInferencePipeline(model)
    segments, _ = pipeline.transcribe(str(path), batch_size=BATCH_SIZE)
    return TimedText([(s.start, s.text) for s in segments])


def direct_words(model: WhisperModel, path: Path) -> list[tuple[str, float, float]]:
    """The pipeline's own word timestamps: reference times where the set has none."""
    pipeline = BatchedInferencePipeline(model)
    segments, _ = pipeline.transcribe(str(path), batch_size=BATCH_SIZE, word_timestamps=True)
    return [(w.word, w.start, w.end) for s in segments for w in s.words or ()]


def engine_alone(engine: FasterWhisperEngine, path: Path) -> TimedText:
    [output] = engine.transcribe_batch([EngineInput(decode(path))])
    return TimedText([(s.start, s.text) for s in output.segments])


def through_farm(farm: Farm, path: Path) -> TimedText:
    farm.clear_cache()
    tid, _ = farm.submit(path)
    row = farm.wait_finished([tid], timeout=3600)[tid]
    if row["state"] != "succeeded":
        raise RuntimeError(f"the farm's transcription {row['state']}: {row['error']}")
    assert farm.client is not None
    document = farm.client.get(f"/v1/transcriptions/{tid}/transcript").json()
    return TimedText([(s["start"], s["text"]) for s in document["segments"]])


def timed(run, *args) -> tuple[TimedText, float]:  # noqa: ANN001
    started = time.perf_counter()
    result = run(*args)
    return result, time.perf_counter() - started


def measure(recordings: list[Recording], work: Path) -> list[FileResult]:
    model = WhisperModel(
        resolve_model("tiny.en"), device="cpu", compute_type="int8", cpu_threads=THREADS
    )
    engine = FasterWhisperEngine(cpu_threads=THREADS, batch_size=BATCH_SIZE)
    farm = Farm(work).start()
    try:
        farm.start_workers(2, threads=1, batch_size=BATCH_SIZE)
        results = []
        for recording in recordings:
            log(f"{recording.name}: {recording.seconds / 60:.1f} min")
            words, times_from = recording.words, "its word alignment"
            if words is None:
                words, times_from = direct_words(model, recording.audio), "direct word timestamps"
            ways = {
                "direct pipeline (defaults)": timed(direct, model, recording.audio),
                "farm (defaults, 2 workers)": timed(through_farm, farm, recording.audio),
                "engine alone, whole file": timed(engine_alone, engine, recording.audio),
            }
            scores = {name: score(recording.text, text, words) for name, (text, _) in ways.items()}
            onsets = {
                name: score(recording.text, text, None, recording.turns).start_error
                for name, (text, _) in ways.items()
            }
            seconds = {name: s for name, (_, s) in ways.items()}
            for name, value in scores.items():
                log(f"  {name}: {value.line()} ({seconds[name]:.1f} s)")
            results.append(FileResult(recording, times_from, scores, onsets, seconds))
        return results
    finally:
        farm.stop()


def report(results: list[FileResult], info: dict[str, str], load_start: str, quiet: bool) -> str:
    lines = header_lines(info, command_line(), load_start, quiet)
    lines += [
        "",
        "| file | way | WER | deletion runs | insertions | start error | onset error | seconds |",
        "| --- | --- | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    met = True
    for r in results:
        for name, s in r.scores.items():
            lines.append(
                f"| {r.recording.name} ({r.recording.seconds / 60:.1f} min) | {name} | "
                f"{100 * s.wer:.1f} % | {s.deletion_runs} | {s.insertions} | "
                f"{seconds_or_dash(s.start_error)} | {seconds_or_dash(r.onset_errors[name])} | "
                f"{r.seconds[name]:.1f} |"
            )
        d, f = r.scores["direct pipeline (defaults)"], r.scores["farm (defaults, 2 workers)"]
        met &= f.wer <= d.wer + WER_MARGIN and f.deletion_runs <= d.deletion_runs
        met &= f.start_error is not None and f.start_error <= START_ERROR_TARGET
    lines += [
        "",
        f"Target: farm WER ≤ direct WER + 0.3 points and no more deletion runs on every file; "
        f"farm segment start error ≤ {START_ERROR_TARGET} s (median): {verdict(met)}.",
        "Start error: median |segment start − start of the reference word its first word "
        "matches|, reference times from "
        + "; ".join(f"{r.recording.name}: {r.times_from}" for r in results)
        + ". Onset error: median |start of each utterance's first segment − where the "
        "utterance's speech starts in the recording| (an independent check: the direct "
        "pipeline's segments are whole VAD windows of up to 30 s).",
    ]
    return "\n".join(lines)


def seconds_or_dash(value: float | None) -> str:
    return "–" if value is None else f"{value:.2f} s"


def main(argv: list[str] | None = None) -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawTextHelpFormatter)
    p.add_argument("--quick", action="store_true", help="the CI excerpt only; RESULTS.md untouched")
    p.add_argument("--quiet-timeout", type=float, default=600, help="seconds to wait for quiet")
    args = p.parse_args(argv)
    quiet = wait_until_quiet(args.quiet_timeout, enabled=args.quiet_timeout > 0)
    load_start, info = load_average(), machine_info()
    cache = default_cache_dir()
    recordings = [excerpt(cache)] if args.quick else evaluation_set(cache)
    with tempfile.TemporaryDirectory(prefix="bench-fidelity-") as work:
        results = measure(recordings, Path(work))
    publish(SECTION, report(results, info, load_start, quiet), record=not args.quick)


if __name__ == "__main__":
    main()
