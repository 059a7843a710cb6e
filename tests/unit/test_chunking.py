"""Chunk planning from a silence layout, and silence detection on samples (no I/O)."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.chunking import FRAME_SECONDS, Envelope, Interval, LoudnessMeter, plan_chunks

SR = 16_000


def spans(chunks) -> list[tuple[float, float]]:
    return [(c.start, c.end) for c in chunks]


def inside(t: float, silences, tolerance: float = 1 / SR) -> bool:
    return any(s - tolerance <= t <= e + tolerance for s, e in silences)


def test_zero_duration_gives_no_chunks():
    assert plan_chunks(0.0, [], 30, 60) == []


def test_short_audio_is_one_chunk():
    assert spans(plan_chunks(12.5, [(3, 4)], 30, 60)) == [(0.0, 12.5)]


def test_cuts_in_the_middle_of_the_pause_nearest_the_target():
    silences = [(10.0, 10.4), (27.0, 27.6), (33.0, 33.2), (58.0, 58.5), (70.0, 71.0)]
    chunks = plan_chunks(80.0, silences, 30, 45)
    assert spans(chunks) == [(0.0, 27.3), (27.3, 58.25), (58.25, 80.0)]
    assert [c.index for c in chunks] == [0, 1, 2]


def test_long_pause_is_cut_at_the_target_keeping_off_the_speech():
    # One long silence in the middle: cut exactly at the target, not its middle.
    chunks = plan_chunks(100.0, [(20.0, 80.0)], 30, 60)
    assert chunks[0].end == 30.0
    assert all(c.end - c.start <= 60 for c in chunks)


def test_all_silence_is_cut_at_the_target_length():
    chunks = plan_chunks(95.0, [(0.0, 95.0)], 30, 60)
    assert spans(chunks) == [(0.0, 30.0), (30.0, 60.0), (60.0, 95.0)]


def test_speech_without_pauses_is_forced_at_the_maximum():
    chunks = plan_chunks(130.0, [], 30, 50)
    assert spans(chunks) == [(0.0, 50.0), (50.0, 100.0), (100.0, 130.0)]


def test_forced_cut_goes_to_the_quietest_point():
    db = np.full(round(130 / FRAME_SECONDS), -20.0, dtype=np.float32)
    quiet = round(41.0 / FRAME_SECONDS)
    db[quiet : quiet + 5] = -35.0  # a 0.1 s dip: too short to be a pause
    chunks = plan_chunks(130.0, [], 30, 50, envelope=Envelope(db))
    assert chunks[0].end == pytest.approx(41.05, abs=0.03)


def test_short_chunk_rather_than_a_word_split():
    # The only pause in the first 60 s is early: cut there, not through speech.
    chunks = plan_chunks(120.0, [(4.0, 4.5)], 30, 60)
    assert chunks[0].end == 4.25


def test_no_optional_cut_leaving_a_short_tail():
    # 50 s <= max: one chunk, since a pause near the target would leave 8 s.
    assert len(plan_chunks(50.0, [(42.0, 42.5)], 30, 60)) == 1


def test_rejects_target_over_maximum():
    with pytest.raises(ValueError):
        plan_chunks(100.0, [], 60, 30)


@st.composite
def layouts(draw):
    duration = draw(st.floats(0.0, 4000.0, allow_nan=False))
    maximum = draw(st.floats(2.0, 600.0))
    target = draw(st.floats(0.5, maximum))
    points = draw(st.lists(st.floats(-10.0, duration + 10.0), max_size=200))
    silences = [(a, a + draw(st.floats(0.0, 20.0))) for a in points]
    return duration, silences, target, maximum


@settings(max_examples=300, deadline=None)
@given(layouts())
def test_any_layout_is_covered_exactly_in_order_within_the_maximum(layout):
    duration, silences, target, maximum = layout
    chunks = plan_chunks(duration, silences, target, maximum)
    if duration == 0:
        assert chunks == []
        return
    assert chunks[0].start == 0.0
    assert chunks[-1].end == duration
    for i, chunk in enumerate(chunks):
        assert chunk.index == i
        assert chunk.start < chunk.end
        assert chunk.end - chunk.start <= maximum
        if i:
            assert chunk.start == chunks[i - 1].end
    # A cut outside any pause only happens when no pause was reachable.
    for chunk in chunks[:-1]:
        if not inside(chunk.end, silences):
            reachable = [
                (s, e)
                for s, e in silences
                if e > s and max(s, chunk.start + 1) <= min(e, chunk.start + maximum)
            ]
            assert not reachable


def feed_in_odd_blocks(signal: np.ndarray) -> LoudnessMeter:
    meter = LoudnessMeter()
    rng = np.random.default_rng(0)
    pos = 0
    while pos < signal.size:
        size = int(rng.integers(1, 50_000))
        meter.feed(signal[pos : pos + size])
        pos += size
    return meter


def tone(seconds: float, level: float = 0.3) -> np.ndarray:
    t = np.arange(round(seconds * SR)) / SR
    return (level * np.sin(2 * np.pi * 220 * t)).astype(np.float32)


def test_meter_finds_pauses_over_a_noise_floor():
    rng = np.random.default_rng(1)
    parts, expected, t = [], [], 0.0
    for speech, pause in [(3.0, 0.5), (2.0, 0.2), (4.0, 1.5), (2.5, 0.0)]:
        parts.append(tone(speech))
        t += speech
        if pause:
            parts.append(np.zeros(round(pause * SR), dtype=np.float32))
            if pause >= 0.3:
                expected.append((t, t + pause))
            t += pause
    signal = np.concatenate(parts)
    signal += rng.normal(0, 0.001, signal.size).astype(np.float32)  # -60 dBFS hiss
    meter = feed_in_odd_blocks(signal)
    assert meter.samples == signal.size
    found = meter.envelope().silences()
    assert len(found) == len(expected)  # the 0.2 s gap is not a pause
    for (fs, fe), (es, ee) in zip(found, expected, strict=True):
        assert fs == pytest.approx(es, abs=0.03)
        assert fe == pytest.approx(ee, abs=0.03)


def test_meter_on_all_silence_and_on_continuous_sound():
    quiet = feed_in_odd_blocks(np.zeros(10 * SR, dtype=np.float32)).envelope()
    assert quiet.silences() == [Interval(0.0, pytest.approx(10.0))]
    loud = feed_in_odd_blocks(tone(10.0)).envelope()
    assert loud.silences() == []


def test_meter_envelope_has_one_value_per_frame():
    meter = feed_in_odd_blocks(tone(1.0))
    assert meter.envelope().db.size == round(1.0 / FRAME_SECONDS)
