"""The wire contract between the board, its workers and its clients.

Written once, used by both sides. This module imports only pydantic (and the
standard library) so that a worker image never needs the server's dependencies.
All times on the wire are seconds (floats) on the source's original timeline.
"""

from __future__ import annotations

import base64
import binascii
import math
import struct
from datetime import datetime
from typing import Annotated, Literal
from uuid import UUID

from pydantic import AfterValidator, BaseModel, ConfigDict, Field, HttpUrl, model_validator

# Workers send this in the X-Scribefarm-Protocol header. A different major
# version, or an older minor one, is refused with HTTP 426.
PROTOCOL_VERSION = "1.6"
PROTOCOL_HEADER = "X-Scribefarm-Protocol"

JobKind = Literal["chunk", "transcribe"]
JobState = Literal["queued", "leased", "succeeded", "dead", "canceled"]
TranscriptionState = Literal["queued", "running", "succeeded", "failed", "canceled"]
TranscriptFormat = Literal["txt", "srt", "vtt", "json", "verbose_json"]


MAX_SPEAKERS = 32
MAX_KNOWN_SPEAKERS = 4  # OpenAI's limit for known_speaker_names[]
VOICE_DIMENSIONS = 256  # the voice encoder's embedding size


class Strict(BaseModel):
    """Unknown fields are an error, not silently dropped: a typo must not pass."""

    model_config = ConfigDict(extra="forbid")


def check_embedding(text: str) -> str:
    """A voice embedding on the wire: VOICE_DIMENSIONS float16, little-endian, base64,
    finite and not all zero (the clustering's cosine distances need a direction)."""
    try:
        raw = base64.b64decode(text, validate=True)
    except binascii.Error as exc:
        raise ValueError("an embedding is base64") from exc
    if len(raw) != 2 * VOICE_DIMENSIONS:
        raise ValueError(f"an embedding is {VOICE_DIMENSIONS} float16 values")
    values = struct.unpack(f"<{VOICE_DIMENSIONS}e", raw)
    if not all(math.isfinite(v) for v in values) or not any(values):
        raise ValueError("an embedding's values are finite and not all zero")
    return text


Embedding = Annotated[str, Field(max_length=1024), AfterValidator(check_embedding)]


SpeakerName = Annotated[str, Field(min_length=1, max_length=64, pattern=r"^[^\x00-\x1f<>]+$")]


class KnownSpeaker(Strict):
    """A speaker named in advance, by the voice of a reference clip: a voice that
    matches it is labelled with the name."""

    name: SpeakerName
    embedding: Embedding


# --- submission --------------------------------------------------------------


class TranscriptionOptions(Strict):
    model: str | None = Field(
        default=None,
        max_length=200,
        description="Whisper model name; the server's default model when omitted.",
    )
    language: str | None = Field(
        default=None,
        pattern=r"^[a-z]{2,3}$",
        description="ISO 639-1 code such as 'en'; detected when omitted.",
    )
    target_chunk_seconds: float | None = Field(
        default=None,
        ge=5,
        le=600,
        description="Preferred chunk length; chunks are cut in silences near it.",
    )
    word_timestamps: bool = False
    prompt: str | None = Field(
        default=None,
        max_length=1000,
        description="Initial prompt for every window: context, names and spellings "
        "(Whisper's initial_prompt; OpenAI's `prompt`).",
    )
    hotwords: str | None = Field(
        default=None, max_length=500, description="Hint phrases for every window."
    )
    detect_language_per_chunk: bool = Field(
        default=False,
        description="Detect the language of each chunk on its own (for recordings that "
        "change language). By default it is detected once, from the first speech, and "
        "used for every chunk.",
    )
    diarize: bool = Field(
        default=False,
        description="Tell speakers apart: every segment and word gets a `speaker` (S1, S2, "
        "... in order of first speech), one label per voice across the whole file.",
    )
    num_speakers: int | None = Field(
        default=None, ge=1, le=MAX_SPEAKERS, description="How many speakers (diarize)."
    )
    min_speakers: int | None = Field(default=None, ge=1, le=MAX_SPEAKERS)
    max_speakers: int | None = Field(default=None, ge=1, le=MAX_SPEAKERS)
    known_speakers: list[KnownSpeaker] | None = Field(
        default=None,
        max_length=MAX_KNOWN_SPEAKERS,
        description="Speakers to name (diarize): the OpenAI endpoint makes these from "
        "known_speaker_names[] and known_speaker_references[].",
    )
    priority: int = Field(default=0, ge=-100, le=100, description="Higher runs first.")
    webhook_url: HttpUrl | None = None

    @model_validator(mode="after")
    def _speaker_counts(self) -> TranscriptionOptions:
        asked = (self.num_speakers, self.min_speakers, self.max_speakers, self.known_speakers)
        if any(a is not None for a in asked) and not self.diarize:
            raise ValueError("speaker counts and known speakers need diarize=true")
        names = [k.name for k in self.known_speakers or ()]
        if len(set(names)) != len(names):
            raise ValueError("known speakers need different names")
        if self.num_speakers is not None and (
            self.min_speakers is not None or self.max_speakers is not None
        ):
            raise ValueError("give num_speakers, or min_speakers/max_speakers, not both")
        if (self.min_speakers or 1) > (self.max_speakers or MAX_SPEAKERS):
            raise ValueError("min_speakers is more than max_speakers")
        return self


class Progress(BaseModel):
    jobs_done: int
    jobs_total: int
    audio_seconds_done: float
    audio_seconds_total: float | None
    eta_seconds: float | None


class Transcription(BaseModel):
    id: UUID
    state: TranscriptionState
    filename: str | None
    options: TranscriptionOptions
    model: str = Field(description="The model it runs with: options.model or the default.")
    created_at: datetime
    started_at: datetime | None
    finished_at: datetime | None
    duration_seconds: float | None
    progress: Progress
    error: str | None


class TranscriptionPage(BaseModel):
    items: list[Transcription]
    next_cursor: str | None = Field(description="Pass as ?cursor= for the next page.")


# --- results -------------------------------------------------------------------


class Word(BaseModel):
    start: float
    end: float
    word: str
    probability: float | None = None


class Segment(BaseModel):
    start: float
    end: float
    text: str
    words: list[Word] | None = None
    avg_logprob: float | None = None
    no_speech_prob: float | None = None

    def shifted(self, seconds: float) -> Segment:
        """The same segment `seconds` later on the timeline (earlier when negative)."""
        words = None
        if self.words is not None:
            words = [
                w.model_copy(update={"start": w.start + seconds, "end": w.end + seconds})
                for w in self.words
            ]
        return self.model_copy(
            update={"start": self.start + seconds, "end": self.end + seconds, "words": words}
        )


class ChunkSpan(BaseModel):
    """One planned transcription job: [start, end) of the source, in seconds."""

    index: int = Field(ge=0)
    start: float = Field(ge=0)
    end: float = Field(gt=0)
    speech: list[tuple[float, float]] | None = Field(
        default=None,
        max_length=10_000,
        description="The speech in [start, end), as the plan found it over the whole "
        "source: the engine decodes exactly these (absolute seconds). None: it looks itself.",
    )


class Voice(BaseModel):
    """A speaker embedding of a stretch of the chunk's speech (absolute seconds): the
    board clusters every chunk's voices together at the merge, so one voice gets one
    label across the file."""

    start: float = Field(ge=0)
    end: float = Field(ge=0)
    embedding: Embedding = Field(description="The voice encoder's vector.")


class ChunkTranscript(Strict):
    """What a transcribe job returns: segments with absolute times."""

    kind: Literal["transcribe"] = "transcribe"
    segments: list[Segment]
    language: str | None = None
    language_probability: float | None = None
    audio_seconds: float = Field(ge=0)
    processing_seconds: float = Field(ge=0)
    cache_key: str | None = Field(
        default=None,
        max_length=128,
        description="Hash of the chunk's decoded audio, model and decoding options.",
    )
    cached: bool = Field(default=False, description="Reused from the cache: no model ran.")
    voices: list[Voice] | None = Field(
        default=None,
        max_length=10_000,
        description="Speaker embeddings of the chunk's speech, when diarization was asked for.",
    )


class ChunkPlan(Strict):
    """What a chunk job returns: the source's exact duration and its cut points."""

    kind: Literal["chunk"] = "chunk"
    duration_seconds: float = Field(ge=0)
    chunks: list[ChunkSpan] = Field(max_length=100_000)
    language: str | None = Field(
        default=None,
        pattern=r"^[a-z]{2,3}$",
        description="Detected once from the first speech, for every chunk (multilingual "
        "models, when no language was given).",
    )
    transcript: ChunkTranscript | None = Field(
        default=None,
        description="A short source's one chunk, transcribed by its chunk job from the audio "
        "it planned (one job, one decode): no transcribe job is queued for it.",
    )

    @model_validator(mode="after")
    def _one_chunk_transcribed(self) -> ChunkPlan:
        if self.transcript is not None and len(self.chunks) != 1:
            raise ValueError("a plan carries a transcript only for its one chunk")
        return self


# A long source is planned in spans, a chunk job each, at once (SplitRequest): span k
# numbers its chunks from k * SPAN_STRIDE, so chunks of different spans never collide
# and sort in time order.
SPAN_STRIDE = 100_000


class PlanSpan(BaseModel):
    """A part of a long source planned by a chunk job of its own, from one quiet point
    to the next (absolute seconds)."""

    index: int = Field(ge=1, description="Its chunks are numbered from index * SPAN_STRIDE.")
    start: float = Field(gt=0)
    end: float | None = Field(default=None, description="None: to the end of the source.")


class SplitRequest(Strict):
    """What a long source's first chunk job sends once it has found where to cut the
    source into spans: chunk jobs for the other spans are queued at once, and it plans
    only the first span itself."""

    lease_id: UUID
    cuts: list[float] = Field(
        min_length=1, max_length=1000, description="Where spans 1, 2, ... start, increasing."
    )
    language: str | None = Field(
        default=None,
        pattern=r"^[a-z]{2,3}$",
        description="Detected from the first speech, for every chunk of every span.",
    )


class SplitResponse(BaseModel):
    spans: list[PlanSpan] = Field(
        description="The spans queued, in order: those of an earlier attempt, if one split "
        "the source already (then the first span ends where they say)."
    )


class SettledChunks(Strict):
    """What a chunk job reports while it still reads its source: chunks no later audio
    can change, queued as transcribe jobs at once. Its completion's plan holds them
    again (with the rest): a chunk is queued once, whoever reports it."""

    lease_id: UUID
    chunks: list[ChunkSpan] = Field(min_length=1, max_length=10_000)


JobResult = Annotated[ChunkPlan | ChunkTranscript, Field(discriminator="kind")]


# --- worker protocol -------------------------------------------------------------


class WorkerCapabilities(Strict):
    name: str = Field(min_length=1, max_length=200)
    engine: str = Field(default="faster-whisper", max_length=50)
    models: list[str] = Field(default_factory=list, max_length=50)
    device: str = Field(default="cpu", max_length=50)
    batch_size: int = Field(default=1, ge=1, le=256)
    kinds: list[JobKind] = Field(default_factory=lambda: ["chunk", "transcribe"], min_length=1)


class Registration(BaseModel):
    worker_id: UUID
    lease_seconds: float
    heartbeat_seconds: float


class ClaimRequest(Strict):
    worker_id: UUID
    max_jobs: int = Field(default=1, ge=1, le=256)
    wait_seconds: float = Field(
        default=0, ge=0, le=60, description="Long poll: wait up to this long for work."
    )
    max_audio_seconds: float | None = Field(
        default=None,
        ge=1,  # a smaller budget means nothing, and underflows PostgreSQL's float arithmetic
        le=86_400,
        description="Stop adding transcribe jobs once their audio adds up to this (the first "
        "job is always given): a worker takes what it can finish soon, and leaves the rest "
        "to idle workers.",
    )


class ClaimedJob(BaseModel):
    id: UUID
    kind: JobKind
    lease_id: UUID
    lease_expires_at: datetime
    attempt: int
    transcription_id: UUID
    source_url: str = Field(description="Signed, time-limited URL of the source media.")
    source_is_external: bool = Field(
        default=False,
        description="The user's own URL, not the board's storage: the worker checks it (and "
        "every redirect) against its address allow-list before reading.",
    )
    options: TranscriptionOptions
    model: str
    chunk: ChunkSpan | None = Field(default=None, description="A transcribe job's range.")
    span: PlanSpan | None = Field(
        default=None, description="A chunk job that plans only this span of the source."
    )
    plan_span_seconds: float | None = Field(
        default=None,
        description="A source's first chunk job splits a source longer than about twice "
        "this into spans this long, planned at once (None: it plans the whole source).",
    )
    chunk_target_seconds: float = Field(description="A chunk job plans chunks near this long.")
    chunk_max_seconds: float = Field(description="...and never longer than this.")
    max_audio_seconds: float | None = Field(
        default=None, description="A chunk job fails a source longer than this, while reading."
    )
    max_job_seconds: float | None = Field(
        default=None, description="The job's wall-clock budget: its lease ends by then."
    )


class ClaimResponse(BaseModel):
    jobs: list[ClaimedJob]


class LeaseRequest(Strict):
    lease_id: UUID


class LeaseResponse(BaseModel):
    lease_expires_at: datetime


class CompleteRequest(Strict):
    lease_id: UUID
    result: JobResult


class CacheLookup(Strict):
    keys: list[str] = Field(max_length=256)
    # job_ids[i]: the leased job keys[i] is for. The cache is per owner, so a key without
    # one of the caller's jobs finds nothing (older workers: no hits, only misses).
    job_ids: list[UUID] = Field(default_factory=list, max_length=256)


class CachedChunk(BaseModel):
    """A chunk's earlier result, with times relative to the chunk's start."""

    segments: list[Segment]
    language: str | None = None
    language_probability: float | None = None


class CacheHits(BaseModel):
    results: dict[str, CachedChunk]


class FailRequest(Strict):
    lease_id: UUID
    error: str = Field(min_length=1, max_length=4000)
    permanent: bool = Field(
        default=False, description="True for errors a retry cannot fix (not an audio file)."
    )


class JobOutcome(BaseModel):
    state: JobState
    run_after: datetime | None = None


# --- errors --------------------------------------------------------------------


class ErrorBody(BaseModel):
    code: str = Field(description="Stable, machine-readable error code.")
    message: str = Field(description="What happened and what to do, for a person.")


# --- batches -------------------------------------------------------------------


class JobCompletion(CompleteRequest):
    job_id: UUID


class JobFailure(FailRequest):
    job_id: UUID


# One engine batch's completions and failures in one request, each fenced on its own
# lease; with `claim`, the worker's next claim in the same round trip.
MAX_BATCH = 256


class BatchRequest(Strict):
    completions: list[JobCompletion] = Field(default_factory=list, max_length=MAX_BATCH)
    failures: list[JobFailure] = Field(default_factory=list, max_length=MAX_BATCH)
    claim: ClaimRequest | None = Field(
        default=None, description="Claim the next jobs once these are recorded."
    )


class BatchItemOutcome(BaseModel):
    job_id: UUID
    state: JobState | None = Field(default=None, description="Unset when `error` is.")
    run_after: datetime | None = None
    error: ErrorBody | None = Field(
        default=None, description="Why this one changed nothing (409's and 422's codes)."
    )


class BatchOutcome(BaseModel):
    outcomes: list[BatchItemOutcome] = Field(description="Completions first, then failures.")
    jobs: list[ClaimedJob] = Field(default_factory=list, description="What `claim` claimed.")
