"""Silence-aware chunk planning: where to cut a long source into transcribe jobs.

Three steps, each usable alone:

* ``LoudnessMeter`` turns streamed 16 kHz blocks into a loudness envelope (one
  dB value per 20 ms frame: 7 MB for 10 hours, while the audio itself would be
  2.3 GB, so the audio is never held in memory).
* ``Envelope.silences`` finds pauses (>= 0.3 s below a threshold set from the
  recording's own noise floor and speech level).
* ``plan_chunks`` (pure) cuts in the middle of a pause near the target length,
  never makes a chunk longer than the maximum, and only cuts inside speech when
  there is no pause at all in a maximum-length window (then at its quietest
  point, so the cut most likely falls between words).

A source in which nothing is audible (no 20 ms frame above ``INAUDIBLE_DBFS``:
digital silence, a muted input) is planned as *no* chunks: the board then
finishes it at once with an empty transcript of the full duration. Ten hours of
it would otherwise be 600 transcribe jobs, each decoded, hashed and run through
the engine's voice activity detection only to find nothing. A source with any
sound at all is planned as usual; its silent stretches go to the engine, whose
voice activity detection keeps Whisper off them.
"""

from __future__ import annotations

import bisect
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import NamedTuple

import numpy as np

from server.protocol import ChunkPlan, ChunkSpan
from worker.audio import SAMPLE_RATE, stream_audio

FRAME_SAMPLES = 320  # 20 ms at 16 kHz
FRAME_SECONDS = FRAME_SAMPLES / SAMPLE_RATE
MIN_SILENCE_SECONDS = 0.3
# Below this speech level (95th percentile of frames) the whole source counts as silence.
SILENT_DBFS = -55.0
# No frame louder than this: nothing for Whisper to hear, so nothing to transcribe.
# Measured with tiny.en on speech scaled down (tests/integration/test_bad_media.py):
# speech whose loudest frame is at -60 dBFS is transcribed, at -65 dBFS partly, at
# -70 dBFS not at all; this leaves a margin under that.
INAUDIBLE_DBFS = -80.0
# Floor of the dB scale: digital silence.
_FLOOR_DB = -100.0
# In a pause longer than twice this, cut anywhere this far from the speech; in a
# shorter pause, in its middle.
_CUT_MARGIN_SECONDS = 1.0
# A chunk shorter than this is only made to avoid cutting through speech.
_MIN_CHUNK_SECONDS = 1.0


class Interval(NamedTuple):
    start: float
    end: float


@dataclass(frozen=True)
class Envelope:
    """Loudness in dBFS per frame of ``frame_seconds``, from the start of the source."""

    db: np.ndarray
    frame_seconds: float = FRAME_SECONDS

    def threshold(self) -> float:
        """dB level under which a frame counts as silence, from this recording's levels.

        A quarter of the way from the noise floor (5th percentile) to the speech
        level (95th percentile), and at least 15 dB under the speech level.
        """
        if self.db.size == 0:
            return _FLOOR_DB
        floor, loud = np.percentile(self.db, [5, 95])
        if loud < SILENT_DBFS:
            return math.inf  # nothing audible: everything is silence
        if loud - floor < 10:
            return _FLOOR_DB  # continuous sound without pauses
        return float(min(floor + 0.25 * (loud - floor), loud - 15))

    def silences(self, min_seconds: float = MIN_SILENCE_SECONDS) -> list[Interval]:
        """Pauses of at least ``min_seconds``, in order, as seconds on the source timeline."""
        quiet = self.db < self.threshold()
        edges = np.diff(np.concatenate(([0], quiet.view(np.int8), [0])))
        starts, ends = np.flatnonzero(edges == 1), np.flatnonzero(edges == -1)
        min_frames = math.ceil(min_seconds / self.frame_seconds - 1e-9)
        keep = ends - starts >= min_frames
        return [
            Interval(s * self.frame_seconds, e * self.frame_seconds)
            for s, e in zip(starts[keep], ends[keep], strict=True)
        ]

    def quietest(self, lo: float, hi: float, smooth_seconds: float = 0.1) -> float:
        """Time of the quietest ``smooth_seconds`` stretch within [lo, hi]."""
        first = max(0, int(lo / self.frame_seconds))
        last = min(self.db.size, int(math.ceil(hi / self.frame_seconds)))
        if last - first < 1:
            return hi
        width = min(max(1, round(smooth_seconds / self.frame_seconds)), last - first)
        window = np.convolve(self.db[first:last], np.ones(width) / width, mode="valid")
        centre = first + int(np.argmin(window)) + width / 2
        return min(max(centre * self.frame_seconds, lo), hi)


class LoudnessMeter:
    """Accumulates the loudness envelope of streamed 16 kHz mono blocks."""

    def __init__(self) -> None:
        self.samples = 0
        self._carry = np.zeros(0, dtype=np.float32)
        self._frames: list[np.ndarray] = []

    def feed(self, block: np.ndarray) -> None:
        self.samples += block.size
        data = np.concatenate((self._carry, block)) if self._carry.size else block
        whole = data.size - data.size % FRAME_SAMPLES
        self._carry = data[whole:].copy()
        if whole:
            self._frames.append(_frame_db(data[:whole].reshape(-1, FRAME_SAMPLES)))

    def envelope(self) -> Envelope:
        frames = self._frames + ([_frame_db(self._carry[None, :])] if self._carry.size else [])
        db = np.concatenate(frames) if frames else np.zeros(0, dtype=np.float32)
        return Envelope(db)


def _frame_db(frames: np.ndarray) -> np.ndarray:
    power = np.mean(np.square(frames, dtype=np.float32), axis=1)
    return (10 * np.log10(power + 1e-10)).astype(np.float32)


def plan_chunks(
    duration: float,
    silences: Iterable[Interval | tuple[float, float]],
    target_seconds: float,
    max_seconds: float,
    *,
    envelope: Envelope | None = None,
) -> list[ChunkSpan]:
    """Cut [0, duration) into contiguous chunks, each at most ``max_seconds`` long.

    Cuts fall in the middle of a pause (or, in a long pause, at the point
    nearest the target length); a cut inside speech happens only when a whole
    maximum-length window has no pause, at the quietest point when ``envelope``
    is given. Zero chunks for zero duration, one chunk for short audio.
    """
    if not 0 < target_seconds <= max_seconds:
        raise ValueError("need 0 < target_seconds <= max_seconds")
    if max_seconds < 2 * _MIN_CHUNK_SECONDS:
        raise ValueError(f"max_seconds must be at least {2 * _MIN_CHUNK_SECONDS}")
    if duration <= 0:
        return []
    planner = _Planner(
        duration, _normalise(silences, duration), target_seconds, max_seconds, envelope
    )
    cuts = planner.cuts()
    bounds = [0.0, *cuts, duration]
    return [ChunkSpan(index=i, start=bounds[i], end=bounds[i + 1]) for i in range(len(bounds) - 1)]


def _normalise(silences: Iterable[Sequence[float]], duration: float) -> list[Interval]:
    """Sorted, clipped to the source, overlaps merged."""
    merged: list[Interval] = []
    for start, end in sorted((max(0.0, s), min(duration, e)) for s, e in silences):
        if end <= start:
            continue
        if merged and start <= merged[-1].end:
            merged[-1] = Interval(merged[-1].start, max(merged[-1].end, end))
        else:
            merged.append(Interval(start, end))
    return merged


class _Planner:
    def __init__(
        self,
        duration: float,
        silences: list[Interval],
        target: float,
        maximum: float,
        envelope: Envelope | None,
    ) -> None:
        self.duration, self.silences, self.envelope = duration, silences, envelope
        self.target, self.maximum = target, maximum
        self.ends = [s.end for s in silences]  # sorted too: the pauses do not overlap

    def cuts(self) -> list[float]:
        cuts: list[float] = []
        pos = 0.0
        while True:
            remaining = self.duration - pos
            if remaining <= self.maximum and remaining <= 1.5 * self.target:
                break
            cut = self._next_cut(pos, must=remaining > self.maximum)
            if cut is None:
                break
            cuts.append(cut)
            pos = cut
        return cuts

    def _next_cut(self, pos: float, *, must: bool) -> float | None:
        aim = pos + self.target
        lo, hi = pos + min(0.5 * self.target, self.maximum / 2), pos + self.maximum
        if not must:
            # Optional cut: only in a pause, and never leaving a short tail.
            hi = min(hi, self.duration - 0.5 * self.target)
            cut = self._pause_cut(lo, hi, aim) if hi > lo else None
            return None if cut is None else self._snap(pos, cut)
        cut = self._pause_cut(lo, hi, aim)
        if cut is None:  # a short chunk is better than a cut through a word
            cut = self._pause_cut(pos + _MIN_CHUNK_SECONDS, lo, aim)
        if cut is None:
            cut = self.envelope.quietest(lo, hi) if self.envelope is not None else hi
        return self._snap(pos, cut)

    def _pause_cut(self, lo: float, hi: float, aim: float) -> float | None:
        """The point in a pause within [lo, hi] nearest ``aim``, keeping off the speech."""
        best: float | None = None
        i = bisect.bisect_left(self.ends, lo)
        while i < len(self.silences) and self.silences[i].start <= hi:
            s = self.silences[i]
            i += 1
            a, b = max(s.start, lo), min(s.end, hi)  # the part of the pause in the window
            if a > b:
                continue
            margin = min(_CUT_MARGIN_SECONDS, (s.end - s.start) / 2)
            zone_lo, zone_hi = max(s.start + margin, a), min(s.end - margin, b)
            if zone_lo > zone_hi:  # the pause's middle is outside: its nearest point inside
                zone_lo = zone_hi = b if s.start + margin > b else a
            point = min(max(aim, zone_lo), zone_hi)
            if best is None or abs(point - aim) < abs(best - aim):
                best = point
        return best

    def _snap(self, pos: float, cut: float) -> float:
        """Put the cut (pos < cut < duration) on the 16 kHz sample grid where that keeps
        pos < cut < duration and cut - pos <= maximum, as floats compute it."""
        k = round(cut * SAMPLE_RATE)
        while k / SAMPLE_RATE - pos > self.maximum:
            k -= 1
        if pos < k / SAMPLE_RATE < self.duration:
            return k / SAMPLE_RATE
        cut = min(cut, pos + self.maximum)
        while cut - pos > self.maximum:  # (pos + maximum) - pos can exceed maximum by an ulp
            cut = math.nextafter(cut, -math.inf)
        return cut


def plan_source(source: str, target_seconds: float, max_seconds: float) -> ChunkPlan:
    """Decode the source (streamed), find its pauses and plan its chunks (none when
    nothing in it is audible).

    Raises MediaError when the source cannot be read or has no audio.
    """
    meter = LoudnessMeter()
    for block in stream_audio(source):
        meter.feed(block)
    envelope = meter.envelope()
    duration = meter.samples / SAMPLE_RATE
    if envelope.db.size and float(envelope.db.max()) < INAUDIBLE_DBFS:
        return ChunkPlan(duration_seconds=duration, chunks=[])
    chunks = plan_chunks(
        duration, envelope.silences(), target_seconds, max_seconds, envelope=envelope
    )
    return ChunkPlan(duration_seconds=duration, chunks=chunks)
