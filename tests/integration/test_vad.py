"""The streamed VAD gives faster-whisper's own speech spans on real audio (Silero model)."""

from __future__ import annotations

import numpy as np
from faster_whisper.vad import get_speech_timestamps

from tests.speech import decode
from worker.vad import PIPELINE_VAD, SpeechProbabilities, speech_spans


def test_streamed_spans_equal_the_pipelines_over_batch_edges(media):
    # Over 320 s, so the pipeline too carries the model's state from one batch of frames
    # to the next (ours are smaller); speech with pauses of every length, over noise.
    speech = decode(media.paragraphs(gap_seconds=0.4))
    rng = np.random.default_rng(7)
    pieces = []
    while sum(p.size for p in pieces) < 340 * 16_000:
        pieces += [speech, np.zeros(int(rng.uniform(0.05, 3.0) * 16_000), np.float32)]
    audio = np.concatenate(pieces)
    audio += rng.normal(0, 0.002, audio.size).astype(np.float32)
    expected = [(s["start"], s["end"]) for s in get_speech_timestamps(audio, PIPELINE_VAD)]

    probabilities = SpeechProbabilities()
    for start in range(0, audio.size, 77_777):  # blocks that fit no frame or batch
        probabilities.feed(audio[start : start + 77_777])
    assert speech_spans(probabilities.finish(), audio.size) == expected
    assert len(expected) > 20
