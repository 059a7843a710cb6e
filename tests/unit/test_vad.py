"""worker/vad.py finds the speech and windows faster-whisper's pipeline finds (pure)."""

from __future__ import annotations

import numpy as np
import pytest
from faster_whisper import vad as fw_vad
from hypothesis import given, settings
from hypothesis import strategies as st

from worker.vad import FRAME, PIPELINE_VAD, pack_windows, speech_spans

# Runs of frames at one probability: speech, pauses and the grey zone between thresholds.
runs = st.lists(
    st.tuples(st.sampled_from([0.02, 0.2, 0.4, 0.45, 0.5, 0.7, 0.99]), st.integers(1, 1200)),
    max_size=40,
)


def probabilities(layout: list[tuple[float, int]]) -> np.ndarray:
    return np.array([p for p, n in layout for _ in range(n)], dtype=np.float32)


@settings(max_examples=300, deadline=None)
@given(runs, st.integers(0, FRAME - 1))
def test_speech_spans_are_the_pipelines(monkeypatch_module, layout, extra):
    probs = probabilities(layout)
    samples = max(0, probs.size * FRAME - extra - 1)
    # faster-whisper pads the audio to whole frames, plus one frame when it already fits.
    padded = samples + FRAME - samples % FRAME
    model_probs = np.resize(np.append(probs, 0.0), padded // FRAME)
    monkeypatch_module.setattr(fw_vad, "get_vad_model", lambda: lambda audio: model_probs)
    expected = fw_vad.get_speech_timestamps(np.zeros(samples, np.float32), PIPELINE_VAD)
    assert speech_spans(model_probs, samples) == [(s["start"], s["end"]) for s in expected]


@settings(max_examples=300, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 200_000), st.integers(1, 400_000)), max_size=40))
def test_windows_are_the_pipelines(layout):
    spans, at = [], 0
    for gap, length in layout:
        spans.append((at + gap, at + gap + length))
        at += gap + length
    audio = np.arange(at, dtype=np.float64)  # each sample is its own index
    expected, _ = fw_vad.collect_chunks(
        audio, [{"start": s, "end": e} for s, e in spans], 16000, 30
    )
    windows = [np.concatenate([audio[s:e] for s, e in w]) for w in pack_windows(spans)]
    expected = [w for w in expected if w.size]
    assert len(windows) == len(expected)
    assert all(np.array_equal(a, b) for a, b in zip(windows, expected, strict=True))


@pytest.fixture(scope="module")
def monkeypatch_module():
    with pytest.MonkeyPatch.context() as patch:
        yield patch
