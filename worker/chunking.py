"""Chunk planning: where to cut a long source into transcribe jobs.

A cut must change nothing the model sees: the farm's transcript has to be as accurate
as one pass of faster-whisper's pipeline over the whole file. So the plan follows the
pipeline's own windows (worker/vad.py): the source is streamed once through the
pipeline's voice activity detection, its speech is packed into the windows the single
pass would decode, and chunks are runs of whole windows, each carrying its speech
spans to its transcribe job. No window is ever cut, and no window is decoded twice.

A chunk runs from its first speech to its last: silence between chunks (and before
the first and after the last) is never read again. A source without speech is planned
as *no* chunks; the board then finishes it at once with an empty transcript of the
full duration.

Chunks are handed out while the source is still being read (`on_settled`): the speech
detection, the window packing and the chunk runs all go left to right, so a chunk that
later audio can no longer change is settled, and identical to the same chunk of the
whole plan. Transcription of a long file starts within a second of planning's start.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence

import numpy as np

from shared.protocol import ChunkPlan, ChunkSpan
from worker.audio import SAMPLE_RATE, MediaError, probe_source, stream_audio
from worker.vad import FRAME, Span, SpeechProbabilities, pack_windows, speech_spans


def plan_chunks(
    spans: Sequence[Span], target_seconds: float, max_seconds: float
) -> list[ChunkSpan]:
    """Runs of whole windows, each as near ``target_seconds`` long as the windows allow
    and never longer than ``max_seconds`` (a window is never longer than that either)."""
    if not 0 < target_seconds <= max_seconds:
        raise ValueError("need 0 < target_seconds <= max_seconds")
    chunks: list[list[Span]] = []
    for window in pack_windows(spans, max_extent=max_seconds):
        current = chunks[-1] if chunks else None
        if current is not None and _extends_toward(current, window, target_seconds, max_seconds):
            current.extend(window)
        else:
            chunks.append(list(window))
    return [_chunk_span(i, chunk) for i, chunk in enumerate(chunks)]


def settled_chunks(
    probabilities: np.ndarray, target_seconds: float, max_seconds: float
) -> list[ChunkSpan]:
    """The chunks of the plan that no audio after these frames can change. The last
    speech span may still grow, or be followed by one that changes the padding of the
    span before it; the last window may take more spans, the last chunk more windows:
    those (the last two spans) are left out (tests/unit/test_chunking.py)."""
    samples = probabilities.size * FRAME
    spans = speech_spans(probabilities, samples)[:-2]
    windows = pack_windows(spans, max_extent=max_seconds)[:-1]
    return plan_chunks(
        [span for window in windows for span in window], target_seconds, max_seconds
    )[:-1]


def _extends_toward(chunk: list[Span], window: list[Span], target: float, maximum: float) -> bool:
    """Whether adding the window brings the chunk's length nearer the target, within the
    maximum."""
    now = (chunk[-1][1] - chunk[0][0]) / SAMPLE_RATE
    grown = (window[-1][1] - chunk[0][0]) / SAMPLE_RATE
    return grown <= maximum and abs(grown - target) <= abs(now - target)


def _chunk_span(index: int, spans: list[Span]) -> ChunkSpan:
    seconds = [(s / SAMPLE_RATE, e / SAMPLE_RATE) for s, e in spans]
    return ChunkSpan(index=index, start=seconds[0][0], end=seconds[-1][1], speech=seconds)


def plan_source(
    source: str,
    target_seconds: float,
    max_seconds: float,
    *,
    max_audio_seconds: float = math.inf,
    deadline: float = math.inf,
    on_settled: Callable[[list[ChunkSpan]], None] | None = None,
) -> ChunkPlan:
    """Decode the source (streamed), find its speech and plan its chunks.

    ``on_settled`` receives chunks as soon as they are settled, each once, in order;
    the plan returned holds them all. Settling is looked for each time the audio read
    doubles (the first time after 2 chunks' worth), so it costs one more pass at most.

    Raises MediaError when the source cannot be read or has no audio, when it is (or
    declares itself) longer than ``max_audio_seconds``, and when reading it is still
    going at ``deadline`` (``time.monotonic()``; a live stream never ends).
    """
    declared = probe_source(source).declared_seconds
    if declared is not None and declared > max_audio_seconds:
        raise _too_long(f"declares {declared / 3600:.2f} h", max_audio_seconds)
    probabilities = SpeechProbabilities()
    settled: list[ChunkSpan] = []
    next_look = 2 * target_seconds * SAMPLE_RATE
    for block in stream_audio(source):
        probabilities.feed(block)
        if on_settled is not None and probabilities.samples >= next_look:
            next_look = 2 * probabilities.samples
            now = settled_chunks(probabilities.so_far(), target_seconds, max_seconds)
            if len(now) > len(settled):
                on_settled(now[len(settled) :])
                settled = now
        if probabilities.samples > max_audio_seconds * SAMPLE_RATE:
            raise _too_long("goes on past it", max_audio_seconds)
        if time.monotonic() > deadline:
            raise MediaError(
                "reading the source did not finish within the job's time limit "
                "(SCRIBEFARM_MAX_JOB_SECONDS); a live stream cannot be transcribed: "
                "submit a recording",
                permanent=True,
            )
    samples = probabilities.samples
    spans = speech_spans(probabilities.finish(), samples) if samples else []
    chunks = plan_chunks(spans, target_seconds, max_seconds)
    return ChunkPlan(duration_seconds=samples / SAMPLE_RATE, chunks=chunks)


def _too_long(how: str, limit: float) -> MediaError:
    """Found before (or while) the audio is decoded, not after hours of it."""
    return MediaError(
        f"the audio is too long: the limit is {limit / 3600:.2f} h "
        f"(SCRIBEFARM_MAX_AUDIO_SECONDS) and the source {how}. Split the recording.",
        permanent=True,
    )
