"""What the dashboard's templates show, computed from the board's rows: durations,
ages, speeds, progress, the chunk timeline and the charts."""

from __future__ import annotations

import itertools
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from server import metrics

FINISHED = ("succeeded", "failed", "canceled")
DOWNLOAD_FORMATS = ("txt", "srt", "vtt", "json", "verbose_json")


def clock(seconds: float | None) -> str:
    """0:07, 12:05 or 1:02:03; a dash when unknown."""
    if seconds is None:
        return "—"
    whole = int(seconds)
    hours, rest = divmod(whole, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes}:{secs:02d}"


def number(value: float) -> str:
    """12, 12.5: one decimal at most, none when it is 0."""
    return f"{value:.1f}".removesuffix(".0")


def took(seconds: float | None) -> str:
    if seconds is None:
        return "—"
    return f"{seconds:.1f} s" if seconds < 60 else clock(seconds)


def ago(seconds: float) -> str:
    """Coarse on purpose: a live list re-renders only when what it says changes."""
    if seconds < 60:
        return "just now"
    for unit, size in (("d", 86400), ("h", 3600)):
        if seconds >= size:
            return f"{int(seconds // size)} {unit} ago"
    return f"{int(seconds // 60)} min ago"


def speed(audio_seconds: float | None, wall_seconds: float | None) -> str:
    """× realtime: seconds of audio per second of time."""
    if not audio_seconds or not wall_seconds or wall_seconds <= 0:
        return "—"
    return f"{audio_seconds / wall_seconds:.1f}×"


def seconds_between(start: datetime | None, end: datetime | None) -> float | None:
    return (end - start).total_seconds() if start and end else None


@dataclass(frozen=True)
class TranscriptionView:
    row: Any

    @property
    def id(self) -> str:
        return str(self.row["id"])

    @property
    def name(self) -> str:
        return self.row["filename"] or f"transcription {self.id[:8]}"

    @property
    def state(self) -> str:
        return self.row["state"]

    @property
    def duration(self) -> str:
        return clock(self.row["duration_seconds"])

    @property
    def percent(self) -> int:
        if self.state == "succeeded":
            return 100
        done, total = self.row["audio_seconds_done"], self.row["duration_seconds"]
        return min(99, int(100 * done / total)) if total else 0

    @property
    def progress_label(self) -> str:
        jobs = f"{self.row['jobs_done']}/{self.row['jobs_total']} chunks"
        return f"{self.percent} % · {jobs}" if self.row["jobs_total"] else f"{self.percent} %"

    @property
    def speed(self) -> str:
        row = self.row
        if row["state"] == "running":
            wall = seconds_between(row["started_at"], row["db_now"])
            return speed(row["audio_seconds_done"], wall)
        if row["state"] == "succeeded":
            return speed(
                row["duration_seconds"], seconds_between(row["started_at"], row["finished_at"])
            )
        return "—"

    @property
    def eta(self) -> str:
        row = self.row
        done, total = row["audio_seconds_done"], row["duration_seconds"]
        wall = seconds_between(row["started_at"], row["db_now"])
        if row["state"] != "running" or not total or not done or not wall:
            return "—"
        return clock(wall * (total - done) / done)

    @property
    def submitter(self) -> str:
        return f"{self.row['submitter']} ({self.row['submitter_prefix']}…)"

    @property
    def age(self) -> str:
        return ago(seconds_between(self.row["created_at"], self.row["db_now"]) or 0)

    @property
    def can_cancel(self) -> bool:
        return self.state in ("queued", "running")

    @property
    def can_retry(self) -> bool:
        return self.state in ("failed", "canceled")

    @property
    def finished(self) -> bool:
        return self.state in FINISHED


@dataclass(frozen=True)
class ChunkView:
    """One job of a transcription, placed on its audio's timeline."""

    job: dict[str, Any]
    duration: float | None
    index: int = 0  # a transcribe job's place in the audio (its chunk's number)

    @property
    def state(self) -> str:
        job = self.job
        if job["state"] == "leased" and not job["lease_live"]:
            return "lost"  # its worker stopped heartbeating: waiting to be taken over
        if job["state"] == "queued" and job["attempts"] > 0:
            return "retrying"
        return job["state"]

    @property
    def what(self) -> str:
        if self.job["kind"] == "transcribe":
            return f"chunk {self.index} ({self.span})"
        if self.job["seq"] < 0:
            return f"planning span {-self.job['seq']} (from {clock(self.job['start_seconds'])})"
        return "cutting into chunks"

    @property
    def span(self) -> str:
        return f"{clock(self.job['start_seconds'])}–{clock(self.job['end_seconds'])}"

    @property
    def left(self) -> float:
        return 100 * self.job["start_seconds"] / self.duration if self.duration else 0

    @property
    def width(self) -> float:
        length = self.job["end_seconds"] - self.job["start_seconds"]
        return 100 * length / self.duration if self.duration else 0

    @property
    def worker(self) -> str:
        return self.job["worker"] or "—"

    @property
    def took(self) -> str:
        seconds = took(self.job["attempt_seconds"])
        if self.job["state"] == "leased":
            return f"{seconds} so far"
        return seconds if self.job["state"] == "succeeded" else "—"

    @property
    def taken_over(self) -> bool:
        """Its current attempt is not the first: an earlier worker failed or vanished."""
        return self.job["attempts"] > 1

    @property
    def note(self) -> str:
        job = self.job
        if job["error"]:
            return job["error"] if job["state"] == "dead" else f"retried after: {job['error']}"
        if self.taken_over:
            return "taken over: an earlier attempt's lease expired (its worker stopped)"
        return ""

    @property
    def title(self) -> str:
        text = f"chunk {self.index} ({self.span}): {self.state}"
        if self.job["worker"]:
            text += f", {self.worker}, {self.took}"
        text += f", attempt {self.job['attempts']} of {self.job['max_attempts']}"
        return f"{text}. {self.note}" if self.note else text


def chunk_views(row: Any) -> tuple[list[ChunkView], list[ChunkView]]:
    """The planning (chunk) jobs, the source's first one first (a long source has one
    more per span), and the transcribe jobs numbered in audio order (jobs come in
    `seq` order: spans' chunks are numbered far apart, in audio order too)."""
    duration = row["duration_seconds"]
    planners = [ChunkView(j, duration) for j in row["jobs"] if j["kind"] == "chunk"]
    planners.sort(key=lambda view: -view.job["seq"])
    transcribe = [j for j in row["jobs"] if j["kind"] == "transcribe"]
    return planners, [ChunkView(job, duration, i) for i, job in enumerate(transcribe)]


def live_segments(chunks: list[Any]) -> list[dict[str, Any]]:
    """The segments of the chunks finished so far, in audio order (absolute times)."""
    return [
        segment
        for chunk in chunks
        if chunk["result"] is not None
        for segment in chunk["result"]["segments"]
    ]


# --- speakers -------------------------------------------------------------------------

SPEAKER_COLOURS = 8  # the stylesheet's .speaker-1 ... .speaker-8; a ninth speaker reuses 1


@dataclass(frozen=True)
class SpeakerView:
    """One voice of a diarized transcript, as its legend shows it."""

    label: str
    seconds: float
    share: float  # of all the speech heard
    colour: int  # the stylesheet's .speaker-N

    @property
    def spoke(self) -> str:
        return f"{took(self.seconds)} · {round(100 * self.share)} %"


def speaker_views(speakers: list[dict[str, Any]]) -> list[SpeakerView]:
    """The transcript's speakers in label order (S1 spoke first), a colour each."""
    total = sum(s["seconds"] for s in speakers)
    return [
        SpeakerView(
            s["label"],
            s["seconds"],
            s["seconds"] / total if total else 0.0,
            i % SPEAKER_COLOURS + 1,
        )
        for i, s in enumerate(speakers)
    ]


@dataclass(frozen=True)
class Turn:
    """Consecutive segments of one speaker, each with its place in the transcript (the
    player finds a segment by that place)."""

    speaker: SpeakerView | None
    segments: list[tuple[int, dict[str, Any]]]


def speaker_turns(segments: list[dict[str, Any]], speakers: list[SpeakerView]) -> list[Turn]:
    by_label = {s.label: s for s in speakers}
    runs = itertools.groupby(
        enumerate(segments), key=lambda p: by_label.get(p[1].get("speaker", ""))
    )
    return [Turn(speaker, list(run)) for speaker, run in runs]


def time_marks(duration: float | None, count: int = 5) -> list[tuple[float, str]]:
    """Evenly spaced labels under a timeline: (percent along, time)."""
    if not duration:
        return []
    return [(100 * i / count, clock(duration * i / count)) for i in range(count + 1)]


# --- workers ------------------------------------------------------------------------


@dataclass(frozen=True)
class WorkerView:
    row: Any
    gone_seconds: float
    recent_seconds: float  # the window of `throughput` and `engine_busy`

    @property
    def state(self) -> str:
        if self.row["current"]:
            return "busy"
        return "gone" if self.row["seen_seconds_ago"] > self.gone_seconds else "idle"

    @property
    def models(self) -> str:
        return ", ".join(self.row["models"]) or "—"

    @property
    def last_seen(self) -> str:
        return f"{took(self.row['seen_seconds_ago'])} ago"

    @property
    def throughput(self) -> str:
        return speed(self.row["recent_audio_seconds"], self.row["recent_busy_seconds"])

    @property
    def engine_busy(self) -> str:
        """The share of the recent window (or of its life) the worker's model ran."""
        busy = metrics.engine_busy(
            self.row["recent_busy_seconds"], self.recent_seconds, self.row["age_seconds"]
        )
        return f"{busy:.0%}"

    @property
    def total_speed(self) -> str:
        return speed(self.row["audio_seconds"], self.row["busy_seconds"])

    @property
    def total_audio(self) -> str:
        return clock(self.row["audio_seconds"])

    @property
    def current_jobs(self) -> list[dict[str, Any]]:
        return [
            {**job, "span": f"{clock(job['start'])}–{clock(job['end'])}" if job["end"] else ""}
            for job in self.row["current_jobs"]
        ]


# --- the board ----------------------------------------------------------------------

JOB_KINDS = ("chunk", "transcribe")
COUNTED_STATES = ("queued", "leased", "retrying", "dead")


def job_counts(rows: list[dict[str, Any]]) -> dict[str, dict[str, int]]:
    """{kind: {state: n}} with every kind and state present."""
    counts = {kind: dict.fromkeys(COUNTED_STATES, 0) for kind in JOB_KINDS}
    for row in rows:
        counts[row["kind"]][row["state"]] += row["n"]
    return counts


@dataclass(frozen=True)
class Chart:
    """A small chart of one value per minute: SVG bars or a line, in a 0-100 box."""

    values: list[float]
    unit: str

    @property
    def peak(self) -> float:
        return max(self.values, default=0)

    def height(self, value: float) -> float:
        return 100 * value / self.peak if self.peak else 0

    @property
    def bars(self) -> list[tuple[float, float, float, float]]:
        """(x, y, width, value) of each bar."""
        width = 100 / max(len(self.values), 1)
        return [
            (i * width, 100 - self.height(v), width * 0.8, v) for i, v in enumerate(self.values)
        ]

    @property
    def points(self) -> str:
        """A polyline through each minute's value."""
        step = 100 / max(len(self.values) - 1, 1)
        return " ".join(
            f"{i * step:.2f},{100 - self.height(v):.2f}" for i, v in enumerate(self.values)
        )

    @property
    def latest(self) -> float:
        return self.values[-1] if self.values else 0

    def amount(self, value: float) -> str:
        """12.5 s, 1 job, 3 jobs."""
        unit = self.unit.removesuffix("s") if self.unit == "jobs" and value == 1 else self.unit
        return f"{number(value)} {unit}"


def history_charts(history: list[dict[str, Any]]) -> tuple[Chart, Chart]:
    audio = Chart([round(m["audio_seconds"], 1) for m in history], "s")
    depth = Chart([m["depth"] for m in history], "jobs")
    return audio, depth
