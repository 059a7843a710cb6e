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

A long source is planned in spans, at once, by several chunk jobs: its first chunk job
cuts it at the quietest stretch near every few minutes (`span_starts`, `quiet_cuts`),
and each span is planned as if it were a source of its own, its voice activity
detection starting afresh at its cut. So a window never crosses a cut, and the windows
near a cut may differ from the single pass's; elsewhere nearly all are the same (the
detection's recurrent state mostly converges back, not always to the frame: 151 of 169
speech spans identical on 12 minutes of real speech in 3-minute spans). Planning an
hour then takes the time of one span, not of the hour.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable, Sequence
from concurrent.futures import ThreadPoolExecutor

import numpy as np

from shared.protocol import ChunkPlan, ChunkSpan
from worker.audio import (
    SAMPLE_RATE,
    MediaError,
    Probe,
    probe_source,
    read_range,
    seconds_to_samples,
    stream_audio,
)
from worker.vad import FRAME, Span, SpeechProbabilities, pack_windows, speech_spans

# A span's cut is the quietest 0.3 s (three 0.1 s frames) of the 30 s after its nominal start.
CUT_SEARCH_SECONDS = 30.0
_CUT_FRAME = SAMPLE_RATE // 10
_CUT_FRAMES = 3


def plan_chunks(
    spans: Sequence[Span], target_seconds: float, max_seconds: float, first_index: int = 0
) -> list[ChunkSpan]:
    """Runs of whole windows, each as near ``target_seconds`` long as the windows allow
    and never longer than ``max_seconds`` (a window is never longer than that either),
    numbered from ``first_index``."""
    if not 0 < target_seconds <= max_seconds:
        raise ValueError("need 0 < target_seconds <= max_seconds")
    chunks: list[list[Span]] = []
    for window in pack_windows(spans, max_extent=max_seconds):
        current = chunks[-1] if chunks else None
        if current is not None and _extends_toward(current, window, target_seconds, max_seconds):
            current.extend(window)
        else:
            chunks.append(list(window))
    return [_chunk_span(first_index + i, chunk) for i, chunk in enumerate(chunks)]


def settled_chunks(
    probabilities: np.ndarray,
    target_seconds: float,
    max_seconds: float,
    offset: int = 0,
    first_index: int = 0,
) -> list[ChunkSpan]:
    """The chunks of the plan that no audio after these frames can change (the frames
    of audio starting ``offset`` samples into the source). The last speech span may
    still grow, or be followed by one that changes the padding of the span before it;
    the last window may take more spans, the last chunk more windows: those (the last
    two spans) are left out (tests/unit/test_chunking.py)."""
    samples = probabilities.size * FRAME
    spans = _placed(speech_spans(probabilities, samples)[:-2], offset)
    windows = pack_windows(spans, max_extent=max_seconds)[:-1]
    return plan_chunks(
        [span for window in windows for span in window], target_seconds, max_seconds, first_index
    )[:-1]


def _placed(spans: list[Span], offset: int) -> list[Span]:
    return [(start + offset, end + offset) for start, end in spans]


def _extends_toward(chunk: list[Span], window: list[Span], target: float, maximum: float) -> bool:
    """Whether adding the window brings the chunk's length nearer the target, within the
    maximum."""
    now = (chunk[-1][1] - chunk[0][0]) / SAMPLE_RATE
    grown = (window[-1][1] - chunk[0][0]) / SAMPLE_RATE
    return grown <= maximum and abs(grown - target) <= abs(now - target)


def _chunk_span(index: int, spans: list[Span]) -> ChunkSpan:
    seconds = [(s / SAMPLE_RATE, e / SAMPLE_RATE) for s, e in spans]
    return ChunkSpan(index=index, start=seconds[0][0], end=seconds[-1][1], speech=seconds)


def span_starts(
    declared: float | None, span_seconds: float, max_audio_seconds: float = math.inf
) -> list[int]:
    """About where the spans of a source declaring this duration start: every
    ``span_seconds`` or so, in whole seconds (none for a source shorter than about two
    spans, or one that does not declare its duration)."""
    if declared is None or declared > max_audio_seconds:
        return []  # planning it whole finds (and reports) the length
    count = round(declared / span_seconds)
    return [round(k * declared / count) for k in range(1, count)]


def quiet_cuts(source: str, starts: list[int]) -> list[float]:
    """The cut near each start: the quietest stretch of the 30 s after it, on the frame
    grid of the whole source's speech detection; the audio is read there and only there.
    Stops where the source ends (before its declared duration)."""
    with ThreadPoolExecutor(4) as pool:
        found = pool.map(lambda at: read_range(source, at, at + CUT_SEARCH_SECONDS), starts)
        cuts = []
        for at, audio in zip(starts, found, strict=True):
            quiet = quietest_point(audio)
            if quiet is None:
                break
            cuts.append(round((at * SAMPLE_RATE + quiet) / FRAME) * FRAME / SAMPLE_RATE)
    return cuts


def quietest_point(audio: np.ndarray) -> int | None:
    """The sample in the middle of the audio's quietest 0.3 s (the first such, on a
    tie), or None when it is shorter than that."""
    frames = audio.size // _CUT_FRAME
    if frames < _CUT_FRAMES:
        return None
    squares = np.square(audio[: frames * _CUT_FRAME], dtype=np.float64)
    energy = squares.reshape(frames, _CUT_FRAME).sum(axis=1)
    stretches = np.convolve(energy, np.ones(_CUT_FRAMES), mode="valid")
    return int(np.argmin(stretches)) * _CUT_FRAME + _CUT_FRAMES * _CUT_FRAME // 2


def plan_source(
    source: str,
    target_seconds: float,
    max_seconds: float,
    *,
    start: float = 0.0,
    end: float | None = None,
    first_index: int = 0,
    max_audio_seconds: float = math.inf,
    deadline: float = math.inf,
    on_settled: Callable[[list[ChunkSpan]], None] | None = None,
    keep: list[np.ndarray] | None = None,
    probe: Probe | None = None,
) -> ChunkPlan:
    """Decode the source's [start, end) (streamed; by default all of it), find its
    speech and plan its chunks, on the source's timeline, numbered from ``first_index``.

    ``keep`` collects the decoded audio of a source no longer than ``max_seconds`` (a
    short source, transcribed by the job that plans it); it is left empty otherwise.
    ``probe``: the source's, when the caller has probed it already.

    ``on_settled`` receives chunks as soon as they are settled, each once, in order;
    the plan returned holds them all. Settling is looked for each time the audio read
    doubles (the first time after 2 chunks' worth), so it costs one more pass at most.

    Raises MediaError when the source cannot be read or has no audio, when it is (or
    declares itself) longer than ``max_audio_seconds``, and when reading it is still
    going at ``deadline`` (``time.monotonic()``; a live stream never ends).
    """
    if start == 0:
        declared = (probe or probe_source(source)).declared_seconds
        if declared is not None and declared > max_audio_seconds:
            raise _too_long(f"declares {declared / 3600:.2f} h", max_audio_seconds)
    offset = seconds_to_samples(start)
    probabilities = SpeechProbabilities()
    settled: list[ChunkSpan] = []
    next_look = 2 * target_seconds * SAMPLE_RATE
    for block in stream_audio(source, start, end):
        probabilities.feed(block)
        if keep is not None:
            keep.append(block)
            if probabilities.samples > max_seconds * SAMPLE_RATE:  # not a short source
                keep.clear()
                keep = None
        if on_settled is not None and probabilities.samples >= next_look:
            next_look = 2 * probabilities.samples
            now = settled_chunks(
                probabilities.so_far(), target_seconds, max_seconds, offset, first_index
            )
            if len(now) > len(settled):
                on_settled(now[len(settled) :])
                settled = now
        if offset + probabilities.samples > max_audio_seconds * SAMPLE_RATE:
            raise _too_long("goes on past it", max_audio_seconds)
        if time.monotonic() > deadline:
            raise MediaError(
                "reading the source did not finish within the job's time limit "
                "(SCRIBEFARM_MAX_JOB_SECONDS); a live stream cannot be transcribed: "
                "submit a recording",
                permanent=True,
            )
    samples = probabilities.samples
    spans = _placed(speech_spans(probabilities.finish(), samples), offset) if samples else []
    chunks = plan_chunks(spans, target_seconds, max_seconds, first_index)
    return ChunkPlan(duration_seconds=(offset + samples) / SAMPLE_RATE, chunks=chunks)


def _too_long(how: str, limit: float) -> MediaError:
    """Found before (or while) the audio is decoded, not after hours of it."""
    return MediaError(
        f"the audio is too long: the limit is {limit / 3600:.2f} h "
        f"(SCRIBEFARM_MAX_AUDIO_SECONDS) and the source {how}. Split the recording.",
        permanent=True,
    )
