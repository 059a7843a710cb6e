"""Speakers: who said what, across a farm, on real voices taking turns (issue 16).

    .venv/bin/python -m bench.speakers            # both conversations, 3 rounds
    .venv/bin/python -m bench.speakers --full     # and the 5 files of the evaluation set
    .venv/bin/python -m bench.speakers --quick    # the 2-speaker one, 1 round; writes nothing

The conversations are tests/realspeech.py's `conversations()`: 2 and 4 real voices
taking turns, about 4 minutes each. A real farm (embedded PostgreSQL, `scribefarm
server`, two `scribefarm worker --threads 1` processes) transcribes each with
`target_chunk_seconds=30`, in rounds of four runs: diarize off, word timestamps alone
(what diarization turns on in the engine), `diarize` with no count, and `diarize` with
`num_speakers` the true count. From each diarized transcript (`format=json`):
- the diarization error rate (pyannote.metrics, 0.25 s collar) against the recording's
  reference turns; the hypothesis is the transcript's `turns` (who spoke when, from the
  voices); beside it the same over only the stretches the transcript has words for;
- the speakers found against the true count;
- one label per voice: in every chunk (the transcribe jobs' ranges) where a voice speaks
  1 s or more, the label that covers most of its time; a voice keeps one label when that
  label is the same in every chunk and no other voice has it.
Cost: the model time the workers report per transcribe job (`processing_seconds`, which
the board adds up as each worker's `busy_seconds` in GET /v1/workers), per chunk, diarize
on against off; beside it the time the workers held the jobs (claim to completion).

Targets (issue 16): DER <= 15 %; the right number of speakers when none is given; a
recurring voice keeps one label across all chunks; diarization adds <= 20 % to a worker's
time per chunk.
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pyannote.core import Annotation, Segment, Timeline
from pyannote.metrics.diarization import DiarizationErrorRate

from bench import log
from bench.harness import Farm
from bench.phases import phases
from bench.results import (
    TARGETS_HEADER,
    bench_parser,
    command_line,
    header_lines,
    run,
    run_options,
    verdict,
)
from tests.realspeech import (
    Recording,
    Turn,
    conversations,
    default_cache_dir,
    evaluation_set,
    reference_turns,
)

SECTION = "## Speakers (bench/speakers.py)"
CHUNK_SECONDS = 30
COLLAR = 0.25
BRIDGE = 1.0  # one speaker's words closer than this are one stretch of speech
HEARD = 1.0  # seconds a voice must speak in a chunk for its label there to count
TARGET_DER = 0.15
TARGET_COST = 0.20
WORKERS, THREADS, BATCH_SIZE = 2, 1, 8
WAYS = ("diarize off", "word timestamps", "diarize", "diarize, num_speakers")


@dataclass
class Options:
    rounds: int
    quick: bool
    full: bool
    quiet_timeout: float
    record: bool


@dataclass
class Transcribed:
    """One transcription of a conversation: its transcript and what it cost."""

    document: dict[str, Any]
    chunks: list[tuple[float, float]]  # the transcribe jobs' ranges
    model: float  # processing_seconds summed over its transcribe jobs
    held: float  # the workers' time holding its jobs (claim → completion, union)
    cached: int  # transcribe jobs answered from the chunk cache: must be 0


@dataclass
class Diarized:
    der: dict[str, float]  # pyannote's detailed figures
    der_worded: float  # the same, only where the transcript has words (see error_rate)
    found: int
    labels: dict[str, list[str | None]]  # voice → its label in each chunk (None: silent)
    strays: int  # (voice, chunk) pairs where a second label covers >= HEARD s

    @property
    def one_label(self) -> bool:
        kept = {v: {x for x in per if x} for v, per in self.labels.items()}
        mine = [next(iter(s)) for s in kept.values() if len(s) == 1]
        return all(len(s) == 1 for s in kept.values()) and len(set(mine)) == len(mine)


@dataclass
class FileResult:
    recording: Recording
    runs: dict[str, list[Transcribed]] = field(default_factory=lambda: defaultdict(list))

    @property
    def speakers(self) -> int:
        return len({s for s, _, _ in self.recording.turns})

    def diarized(self, way: str) -> list[Diarized]:
        return [diarization(self.recording, t) for t in self.runs[way]]

    def per_chunk(self, way: str, attr: str) -> float:
        """Median over the runs of `attr` seconds per chunk."""
        return statistics.median(getattr(t, attr) / len(t.chunks) for t in self.runs[way])


# --- one transcription --------------------------------------------------------------


def options(way: str, recording: Recording) -> dict[str, Any]:
    chosen: dict[str, Any] = {"language": "en", "target_chunk_seconds": CHUNK_SECONDS}
    if way == "word timestamps":
        chosen["word_timestamps"] = True
    if way.startswith("diarize,"):
        chosen["num_speakers"] = len({s for s, _, _ in recording.turns})
    if way.startswith("diarize") and way != "diarize off":
        chosen["diarize"] = True
    return chosen


JOBS_SQL = """
SELECT start_seconds AS start, end_seconds AS end,
       coalesce((result->>'processing_seconds')::float8, 0) AS model,
       coalesce((result->>'cached')::bool, false) AS cached
FROM jobs WHERE transcription_id = $1::uuid AND kind = 'transcribe' AND state = 'succeeded'
ORDER BY start_seconds
"""


def transcribe(farm: Farm, recording: Recording, way: str) -> Transcribed:
    assert farm.server is not None and farm.client is not None
    farm.clear_cache()  # else the second run of a chunk reuses the first's words
    tid, began = farm.submit(recording.audio, **options(way, recording))
    row = farm.wait_finished([tid], timeout=1800)[tid]
    if row["state"] != "succeeded":
        raise RuntimeError(f"{recording.name} ({way}): {row['state']}: {row['error']}")
    response = farm.client.get(f"/v1/transcriptions/{tid}/transcript", params={"format": "json"})
    response.raise_for_status()
    jobs = farm.server.sql(JOBS_SQL, tid)
    return Transcribed(
        document=response.json(),
        chunks=[(float(j["start"]), float(j["end"])) for j in jobs],
        model=sum(float(j["model"]) for j in jobs),
        held=sum(w.busy for w in phases(farm.server, {tid: began}).workers),
        cached=sum(bool(j["cached"]) for j in jobs),
    )


# --- scoring ------------------------------------------------------------------------


def hypothesis_turns(document: dict[str, Any]) -> list[Turn]:
    """Who spoke when, as the transcript says: its `turns` (from the voices, heard whether
    or not the words were)."""
    return [(t["speaker"], float(t["start"]), float(t["end"])) for t in document["turns"]]


def word_turns(document: dict[str, Any]) -> list[Turn]:
    """(label, start, end) of every word with a speaker, or of every segment when the
    segments carry no words."""
    segments = document.get("segments") or []
    words = [w for s in segments for w in s.get("words") or []]
    items = words if words and all(w.get("speaker") for w in words) else segments
    return [(i["speaker"], float(i["start"]), float(i["end"])) for i in items if i.get("speaker")]


def annotation(turns: list[Turn], bridge: float = 0.0) -> Annotation:
    """The turns as a pyannote Annotation, one label's stretches less than `bridge` apart joined."""
    result = Annotation()
    for k, (label, start, end) in enumerate(turns):
        if end > start:
            result[Segment(start, end), k] = label
    return result.support(bridge)


def error_rate(reference: list[Turn], hypothesis: list[Turn], uem: Timeline) -> dict[str, float]:
    """pyannote's DER and its parts over `uem`. Over the whole file, speech the transcript
    lost counts as missed; over the stretches it has words, what remains is the labelling."""
    metric = DiarizationErrorRate(collar=COLLAR)
    return metric(annotation(reference), annotation(hypothesis, BRIDGE), uem=uem, detailed=True)


def overlap(a: tuple[float, float], b: tuple[float, float]) -> float:
    return max(0.0, min(a[1], b[1]) - max(a[0], b[0]))


def stretches(hypothesis: list[Turn]) -> list[Turn]:
    """The hypothesis with one label's words less than BRIDGE apart joined."""
    joined = annotation(hypothesis, BRIDGE).itertracks(yield_label=True)
    return [(str(label), s.start, s.end) for s, _, label in joined]


def chunk_labels(
    reference: list[Turn], hypothesis: list[Turn], chunk: tuple[float, float]
) -> dict[str, dict[str, float]]:
    """For each voice speaking in `chunk`: the seconds of its speech there each label covers."""
    covered: dict[str, dict[str, float]] = defaultdict(lambda: defaultdict(float))
    for voice, start, end in reference:
        mine = (max(start, chunk[0]), min(end, chunk[1]))
        if mine[1] <= mine[0]:
            continue
        for label, a, b in hypothesis:
            if seconds := overlap(mine, (a, b)):
                covered[voice][label] += seconds
    return covered


def diarization(recording: Recording, transcribed: Transcribed) -> Diarized:
    reference = reference_turns(recording)
    hypothesis = hypothesis_turns(transcribed.document)
    labels: dict[str, list[str | None]] = {s: [] for s, _, _ in reference}
    strays = 0
    joined = stretches(hypothesis)
    for chunk in transcribed.chunks:
        covered = chunk_labels(reference, joined, chunk)
        for voice in labels:
            heard = {lab: s for lab, s in covered.get(voice, {}).items() if s >= HEARD}
            labels[voice].append(max(heard, key=heard.__getitem__) if heard else None)
            strays += max(0, len(heard) - 1)
    speakers = transcribed.document.get("speakers")
    found = len(speakers) if speakers else len({lab for lab, _, _ in hypothesis})
    return Diarized(
        der=error_rate(reference, hypothesis, Timeline([Segment(0, recording.seconds)])),
        der_worded=error_rate(
            reference,
            hypothesis,
            annotation(word_turns(transcribed.document), BRIDGE).get_timeline().support(),
        )["diarization error rate"],
        found=found,
        labels=labels,
        strays=strays,
    )


# --- the run ------------------------------------------------------------------------


def measure(opts: Options, work: Path) -> list[FileResult]:
    recordings = conversations(default_cache_dir())
    if opts.full:  # read speech of 3-4 voices, 7-9 minutes a file (docs/evaluation.md)
        recordings += evaluation_set(default_cache_dir())
    if opts.quick:
        recordings = recordings[:1]
    results = [FileResult(r) for r in recordings]
    farm = Farm(work).start()
    try:
        farm.start_workers(WORKERS, THREADS, BATCH_SIZE)
        transcribe(farm, recordings[0], "diarize")  # warm-up: first calls, voice encoder load
        for k in range(opts.rounds):
            for result in results:
                one_round(farm, result, k)
    finally:
        farm.stop()
    return results


def one_round(farm: Farm, result: FileResult, k: int) -> None:
    """Every way once, side by side, so drifts in the machine's load hit all alike."""
    for way in WAYS:
        done = transcribe(farm, result.recording, way)
        if done.cached:
            raise RuntimeError(f"{done.cached} chunk(s) came from the cache: the cost is wrong")
        result.runs[way].append(done)
        line = f"round {k + 1}, {result.recording.name}, {way}: {len(done.chunks)} chunks, "
        line += f"model {done.model:.2f} s, held {done.held:.2f} s"
        if way.startswith("diarize") and way != "diarize off":
            d = diarization(result.recording, done)
            line += f"; DER {100 * d.der['diarization error rate']:.1f} %, found {d.found}, "
            line += f"one label per voice: {d.one_label}"
        log(line)


# --- the report ---------------------------------------------------------------------


def der(d: Diarized) -> float:
    return d.der["diarization error rate"]


def cost(result: FileResult, attr: str = "model") -> float:
    """What diarization adds to a chunk's time, as a fraction of the time without it."""
    on = statistics.median(
        getattr(t, attr) / len(t.chunks) for way in WAYS[2:] for t in result.runs[way]
    )
    return on / result.per_chunk("diarize off", attr) - 1


def report(results: list[FileResult], info: dict[str, str], load_start: str, quiet: bool) -> str:
    talks = [r for r in results if r.recording.name.startswith("conversation")]  # the targets'
    free = [d for r in talks for d in r.diarized("diarize")]
    given = [d for r in talks for d in r.diarized("diarize, num_speakers")]
    counts = [(r.speakers, d.found) for r in talks for d in r.diarized("diarize")]
    worst_cost = max(cost(r) for r in talks)
    lines = header_lines(info, command_line(), load_start, quiet) + TARGETS_HEADER
    lines += [
        target_row(f"DER ≤ {100 * TARGET_DER:.0f} % (collar {COLLAR} s), no count given, worst run",
                   f"{100 * max(map(der, free)):.1f} %", max(map(der, free)) <= TARGET_DER),
        target_row("DER, `num_speakers` given, worst run", f"{100 * max(map(der, given)):.1f} %",
                   max(map(der, given)) <= TARGET_DER),
        target_row("DER only where the transcript has words, no count given, worst run",
                   f"{100 * max(d.der_worded for d in free):.1f} %",
                   max(d.der_worded for d in free) <= TARGET_DER),
        target_row("right number of speakers, no count given",
                   ", ".join(f"{t} → {f}" for t, f in counts), all(t == f for t, f in counts)),
        target_row("one label per voice in every chunk (every diarized run)",
                   f"{sum(d.one_label for d in free + given)} of {len(free + given)} runs",
                   all(d.one_label for d in free + given)),
        target_row(f"diarization adds ≤ {100 * TARGET_COST:.0f} % to a worker's time per chunk",
                   f"+{100 * worst_cost:.1f} % (worst file)", worst_cost <= TARGET_COST),
        "",
        *accuracy_table(results),
        "",
        *label_tables(results),
        "",
        *cost_table(results),
        "",
        *method_lines(results),
    ]  # fmt: skip
    return "\n".join(lines) + "\n"


def target_row(target: str, measured: str, met: bool) -> str:
    return f"| {target} | {measured} | {verdict(met)} |"


def accuracy_table(results: list[FileResult]) -> list[str]:
    lines = [
        "### Accuracy (each run: DER, its parts as shares of the reference speech)",
        "",
        "| conversation | voices | minutes | chunks | count given | found | DER | confusion | "
        "missed | false alarm | DER where words | one label per voice |",
        "|---|---:|---:|---:|---|---|---|---|---|---|---|---|",
    ]
    for r in results:
        chunks = len(r.runs["diarize"][0].chunks)
        for way in WAYS[2:]:
            ds = r.diarized(way)
            lines.append(
                f"| {r.recording.name} | {r.speakers} | {r.recording.seconds / 60:.2f} | "
                f"{chunks} | {'yes' if ',' in way else 'no'} | "
                f"{', '.join(str(d.found) for d in ds)} | "
                f"{', '.join(f'{100 * der(d):.1f}' for d in ds)} % | {share(ds, 'confusion')} % | "
                f"{share(ds, 'missed detection')} % | {share(ds, 'false alarm')} % | "
                f"{', '.join(f'{100 * d.der_worded:.1f}' for d in ds)} % | "
                f"{', '.join('yes' if d.one_label else '**no**' for d in ds)} |"
            )
    return lines


def share(ds: list[Diarized], part: str) -> str:
    """A part of the DER of each run, as a percentage of the reference speech."""
    return ", ".join(f"{100 * d.der[part] / d.der['total']:.1f}" for d in ds)


def label_tables(results: list[FileResult]) -> list[str]:
    """Each voice's label chunk by chunk, last run with no count given."""
    lines = ["### Each voice's label, chunk by chunk (last run, no count given)", ""]
    for r in results:
        d = r.diarized("diarize")[-1]
        chunks = r.runs["diarize"][-1].chunks
        lines += [
            f"{r.recording.name} ({d.strays} times a second label covered ≥ {HEARD:g} s of a "
            "voice in a chunk):",
            "",
            "| voice | " + " | ".join(f"{a:.0f}–{b:.0f} s" for a, b in chunks) + " |",
            "|---|" + "---|" * len(chunks),
        ]
        for voice, per in d.labels.items():
            lines.append(f"| {voice} | " + " | ".join(x or "·" for x in per) + " |")
        lines.append("")
    return lines[:-1]


def cost_table(results: list[FileResult]) -> list[str]:
    lines = [
        "### Cost: worker seconds per chunk (medians over the runs)",
        "",
        "| conversation | chunks | way | model s per chunk | held s per chunk |",
        "|---|---:|---|---:|---:|",
    ]
    for r in results:
        for way in WAYS:
            lines.append(
                f"| {r.recording.name} | {len(r.runs[way][0].chunks)} | {way} | "
                f"{r.per_chunk(way, 'model'):.3f} | {r.per_chunk(way, 'held'):.3f} |"
            )
        lines.append(
            f"| {r.recording.name} | | diarize (both) / off | **+{100 * cost(r):.1f} %** | "
            f"+{100 * cost(r, 'held'):.1f} % |"
        )
    return lines


def method_lines(results: list[FileResult]) -> list[str]:
    rounds = len(results[0].runs["diarize off"])
    return [
        "How it was measured:",
        f"- {rounds} round(s); in each, every file is transcribed {len(WAYS)} ways "
        f"({', '.join(WAYS)}), `tiny.en` int8 on the CPU, {WORKERS} workers × {THREADS} "
        f"thread, `--batch-size {BATCH_SIZE}`, `target_chunk_seconds={CHUNK_SECONDS}`; the "
        "chunk cache is emptied before every run.",
        "- The conversations (tests/realspeech.py `conversations()`): Allison Smith's "
        "Asterisk prompts, MFA's test-data speaker Michael (monologues cut at their pauses, "
        "short clips) and the two podcast hosts of MFA's test data, joined with 0.3–1.0 s "
        "between turns; the reference turns are exact on the file's timeline. The targets "
        "are theirs; with `--full` the evaluation set's files (read speech of 3-4 voices, "
        "7-9 minutes each, docs/evaluation.md) are measured beside them.",
        f"- DER: `DiarizationErrorRate(collar={COLLAR})` over the whole file; the hypothesis "
        "is the transcript's `turns` (who spoke when, from the voice windows). 'Where "
        "words': the same metric over only the stretches the transcript has words for "
        f"(one label's words less than {BRIDGE:g} s apart joined), so speech the "
        "transcription lost is not counted as missed.",
        f"- One label per voice: in each chunk where a voice speaks ≥ {HEARD:g} s, the label "
        "covering most of its speech; kept when the same in every chunk and no other "
        "voice's.",
        "- Cost: `processing_seconds` of the transcribe jobs (engine and voice encoder, what "
        "the board adds up as each worker's `busy_seconds`), per chunk; 'held': the "
        "workers' time from claim to completion (bench/phases.py). 'diarize (both)' pools "
        "the runs with and without `num_speakers` (the workers do the same work in both).",
    ]


# --- main ---------------------------------------------------------------------------


def parse(argv: list[str] | None) -> Options:
    p = bench_parser(__doc__, "the 2-speaker file, 1 round", quiet_timeout=600)
    p.add_argument("--rounds", type=int, default=None, help="rounds of every way (3; quick: 1)")
    p.add_argument("--full", action="store_true", help="also the evaluation set's 5 files")
    args = p.parse_args(argv)
    return Options(
        rounds=args.rounds or (1 if args.quick else 3),
        quick=args.quick,
        full=args.full,
        **run_options(args),
    )


def main(argv: list[str] | None = None) -> None:
    run(SECTION, parse(argv), measure, report)


if __name__ == "__main__":
    main()
