"""Chunk planning on speech spans (pure): chunks are runs of whole windows."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.audio import SAMPLE_RATE
from worker.chunking import plan_chunks, settled_chunks
from worker.vad import FRAME, pack_windows, speech_spans

SR = SAMPLE_RATE


def spans_every(seconds: float, speech: float, count: int) -> list[tuple[int, int]]:
    """``count`` speech spans of ``speech`` seconds, one starting every ``seconds``."""
    return [(round(i * seconds * SR), round((i * seconds + speech) * SR)) for i in range(count)]


def test_no_speech_gives_no_chunks():
    assert plan_chunks([], 60, 120) == []


def test_short_speech_is_one_chunk_from_its_first_to_its_last_speech():
    spans = spans_every(4, 3, 3)  # 0-3, 4-7, 8-11 s
    [chunk] = plan_chunks(spans, 60, 120)
    assert (chunk.start, chunk.end) == (0.0, 11.0)
    assert chunk.speech == [(0.0, 3.0), (4.0, 7.0), (8.0, 11.0)]


def test_chunks_hold_whole_windows_near_the_target():
    # 10 s of speech every 12 s: a window (30 s of speech) is 3 spans, 34 s of timeline.
    spans = spans_every(12, 10, 30)
    chunks = plan_chunks(spans, 60, 120)
    windows = pack_windows(spans)
    ends = {w[-1][1] / SR for w in windows}
    for chunk in chunks:
        assert chunk.end in ends  # a chunk ends where a window ends
        assert 30 < chunk.end - chunk.start < 90
    assert len(chunks) == 5  # two windows (70 s) a chunk


def test_windows_never_stretch_past_the_maximum():
    # 1 s of speech every 50 s: 30 spans would fit one window's speech, spread over 25 min.
    spans = spans_every(50, 1, 30)
    chunks = plan_chunks(spans, 60, 120)
    assert all(c.end - c.start <= 120 for c in chunks)
    assert sum(len(c.speech) for c in chunks) == 30


def test_rejects_target_over_maximum():
    with pytest.raises(ValueError):
        plan_chunks([(0, SR)], 130, 120)


@settings(max_examples=200, deadline=None)
@given(
    st.lists(
        st.tuples(st.floats(0.05, 40), st.floats(0.05, 29)),  # (gap before, speech length)
        max_size=60,
    ),
    st.floats(5, 120),
)
def test_every_span_is_in_exactly_one_chunk_in_order_within_the_maximum(layout, target):
    spans, at = [], 0
    for gap, length in layout:
        start = at + round(gap * SR)
        at = start + round(length * SR)
        spans.append((start, at))
    chunks = plan_chunks(spans, target, 120)
    planned = [(round(s * SR), round(e * SR)) for c in chunks for s, e in c.speech]
    assert planned == spans
    assert [c.index for c in chunks] == list(range(len(chunks)))
    for before, after in zip(chunks, chunks[1:], strict=False):
        assert before.end <= after.start
    assert all(c.end - c.start <= 120 for c in chunks)


def speech_probabilities(seed: int, seconds: float) -> np.ndarray:
    """Per-frame probabilities of a talk: runs of speech (0.3-25 s, now and then longer
    than a window) and pauses (0.05-4 s), with noise around the thresholds."""
    rng = np.random.default_rng(seed)
    frames_per_second = SR / FRAME
    probs: list[np.ndarray] = []
    speaking = bool(rng.integers(2))
    while sum(p.size for p in probs) < seconds * frames_per_second:
        length = rng.uniform(0.3, 40) if speaking else rng.uniform(0.05, 4)
        n = max(1, int(length * frames_per_second))
        level = rng.uniform(0.55, 1.0, n) if speaking else rng.uniform(0.0, 0.4, n)
        probs.append(level.astype(np.float32))
        speaking = not speaking
    return np.concatenate(probs)


@pytest.mark.parametrize("seed", range(12))
@pytest.mark.parametrize("target", [30.0, 60.0])
def test_settled_chunks_are_the_whole_plans_own(seed, target):
    """What the planner hands out while reading is exactly the start of the plan it
    makes once the whole source is read, at every point it may look."""
    probs = speech_probabilities(seed, 900)
    whole = plan_chunks(speech_spans(probs, probs.size * FRAME), target, 120)
    settled_before = 0
    for frames in range(1_000, probs.size, 1_000):  # SpeechProbabilities' batches
        settled = settled_chunks(probs[:frames], target, 120)
        assert settled == whole[: len(settled)], f"after {frames} frames"
        assert len(settled) >= settled_before  # once settled, always settled
        settled_before = len(settled)
    # The rest is the end: the last batch read, the last chunk and what can still join it.
    unsettled = whole[settled_before:]
    assert all(chunk.end > 900 - 32 - 3 * 120 for chunk in unsettled)
