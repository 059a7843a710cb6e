"""Speakers at the merge (server/speakers.py, server/transcripts.py; pure).

Voices here are unit vectors made around a few random directions, so which windows
belong together is known; tests/integration/test_speakers.py does the same with real
voices through the farm.
"""

from __future__ import annotations

import base64
import json

import numpy as np
import pytest
from pydantic import ValidationError

from server import transcripts
from server.speakers import Diarization, Speakers, cluster, label
from server.submission import dedup_key
from shared.protocol import TranscriptionOptions, Voice

RNG = np.random.default_rng(7)
DIRECTIONS = RNG.normal(size=(4, 256))


def voice(speaker: int, start: float, end: float | None = None) -> dict:
    vector = DIRECTIONS[speaker] + RNG.normal(scale=0.35, size=256)
    vector /= np.linalg.norm(vector)
    packed = base64.b64encode(vector.astype("<f2").tobytes()).decode()
    return {"start": start, "end": start + 1.6 if end is None else end, "embedding": packed}


def word(text: str, start: float, end: float) -> dict:
    return {"word": text, "start": start, "end": end}


def conversation(speakers: list[int], turn_seconds: float = 8.0) -> list[dict]:
    """Voices every 0.8 s through turns of the given speakers, one after another."""
    voices = []
    for turn, speaker in enumerate(speakers):
        start = turn * turn_seconds
        voices += [voice(speaker, t) for t in np.arange(start, start + turn_seconds - 1.6, 0.8)]
    return voices


def test_voices_of_one_speaker_across_chunks_get_one_label_in_order_of_first_speech():
    voices = conversation([2, 0, 2, 1, 0, 2, 1])
    segments = [
        {"start": t * 8.0 + 0.2, "end": t * 8.0 + 6.0, "text": f"turn {t}"} for t in range(7)
    ]
    heard = label(segments, voices, Diarization())
    assert [s["speaker"] for s in heard.segments] == ["S1", "S2", "S1", "S3", "S2", "S1", "S3"]
    assert [s["label"] for s in heard.speakers] == ["S1", "S2", "S3"]
    # Who spoke when, from the voices: a turn per speaker's stretch of windows.
    assert [t["speaker"] for t in heard.turns] == ["S1", "S2", "S1", "S3", "S2", "S1", "S3"]
    assert heard.turns[1] == {"speaker": "S2", "start": 8.0, "end": 15.2}
    assert heard.speakers[0]["seconds"] == pytest.approx(3 * 7.2)


def test_a_segment_is_split_where_its_words_change_speaker():
    voices = [voice(0, t) for t in (0.0, 0.8, 1.6)] + [voice(1, t) for t in (3.0, 3.8, 4.6)]
    words = [word("hello", 0.5, 1.0), word("there", 1.1, 1.6), word("hi", 3.6, 4.0)]
    words += [word("back", 4.2, 4.8)]
    segment = {"start": 0.4, "end": 5.0, "text": "hello there hi back", "words": words}
    heard = label([segment], voices, Diarization())
    labelled = heard.segments
    assert [(s["speaker"], s["text"], s["start"], s["end"]) for s in labelled] == [
        ("S1", "hello there", 0.4, 1.6),
        ("S2", "hi back", 3.6, 5.0),
    ]
    assert [w["speaker"] for s in labelled for w in s["words"]] == ["S1", "S1", "S2", "S2"]
    assert len(heard.speakers) == 2


def test_the_count_given_wins_and_min_max_bound_the_count_found():
    voices = conversation([0, 1, 2, 3, 0, 1, 2, 3])
    embeddings = np.stack([np.frombuffer(base64.b64decode(v["embedding"]), "<f2") for v in voices])
    durations = np.full(len(voices), 1.6)
    found = len(set(cluster(embeddings.astype(np.float32), durations, Diarization())))
    assert found == 4
    for counts, expected in [
        (Diarization(num=2), 2),
        (Diarization(max=3), 3),
        (Diarization(min=5), 5),
        (Diarization(min=2, max=6), 4),
    ]:
        assert len(set(cluster(embeddings.astype(np.float32), durations, counts))) == expected


def test_a_few_stray_windows_join_the_nearest_speaker():
    voices = conversation([0, 1, 0, 1])
    stray = voice(3, 40.0)  # one window of a voice heard nowhere else
    segments = [{"start": t * 8.0, "end": t * 8.0 + 6.0, "text": f"t{t}"} for t in range(4)]
    assert len(label(segments, [*voices, stray], Diarization()).speakers) == 2


def test_no_voices_leave_the_segments_unlabelled():
    segments = [{"start": 0.0, "end": 1.0, "text": "hm"}]
    assert label(segments, [], Diarization()) == Speakers(segments, [], [])


def diarized() -> dict:
    words = [word("Hello", 0.0, 0.5), word("there.", 0.6, 1.0)]
    segments = [
        {"start": 0.0, "end": 1.0, "text": "Hello there.", "speaker": "S1", "words": words},
        {"start": 1.5, "end": 2.5, "text": "Hi.", "speaker": "S2"},
        {"start": 3.0, "end": 4.0, "text": "How are you?", "speaker": "S2"},
    ]
    for w in words:
        w["speaker"] = "S1"
    return {
        "duration_seconds": 4.0,
        "language": "en",
        "text": "Hello there. Hi. How are you?",
        "segments": segments,
        "speakers": [{"label": "S1", "seconds": 1.0}, {"label": "S2", "seconds": 2.0}],
    }


def test_every_format_names_the_speakers():
    document = diarized()
    assert transcripts.render(document, "txt") == "S1: Hello there.\nS2: Hi. How are you?\n"
    srt = transcripts.render(document, "srt")
    assert "00:00:00,000 --> 00:00:01,000\nS1: Hello there.\n" in srt
    assert "S2: How are you?" in srt
    vtt = transcripts.render(document, "vtt")
    assert "00:00:01.500 --> 00:00:02.500\n<v S2>Hi.\n" in vtt
    verbose = json.loads(transcripts.render(document, "verbose_json"))
    assert [s["speaker"] for s in verbose["segments"]] == ["S1", "S2", "S2"]
    assert [w["speaker"] for w in verbose["words"]] == ["S1", "S1"]


def test_openai_diarized_json_has_its_documented_shape():
    body = transcripts.diarized_json(diarized())
    assert set(body) == {"task", "duration", "text", "segments"}
    assert body["segments"][1] == {
        "type": "transcript.text.segment",
        "id": "seg_1",
        "start": 1.5,
        "end": 2.5,
        "text": "Hi.",
        "speaker": "S2",
    }


def test_merge_clusters_the_voices_of_every_chunk_together():
    chunks = []
    for i, speaker in enumerate([0, 1, 0, 1]):
        start = i * 10.0
        voices = [voice(speaker, start + t) for t in np.arange(0.0, 8.0, 0.8)]
        segment = {"start": start + 1.0, "end": start + 8.0, "text": f"chunk {i}"}
        chunks.append((start, start + 10.0, {"segments": [segment], "voices": voices}))
    merged = transcripts.merge(chunks, 40.0, Diarization())
    assert [s["speaker"] for s in merged["segments"]] == ["S1", "S2", "S1", "S2"]
    assert "speakers" not in transcripts.merge(chunks, 40.0)  # not asked for


@pytest.mark.parametrize(
    "options",
    [
        {"num_speakers": 2},  # without diarize
        {"diarize": True, "num_speakers": 2, "max_speakers": 3},
        {"diarize": True, "min_speakers": 4, "max_speakers": 3},
        {"diarize": True, "num_speakers": 0},
        {"diarize": True, "max_speakers": 33},
    ],
)
def test_speaker_counts_that_cannot_be_met_are_refused(options):
    with pytest.raises(ValidationError):
        TranscriptionOptions.model_validate(options)


def test_what_is_asked_of_speakers_shapes_the_deduplication_key():
    def key(**options):
        return dedup_key("sha", TranscriptionOptions.model_validate(options), "tiny.en")

    ann = {"name": "Ann", "embedding": voice(0, 0.0)["embedding"]}
    bob = {"name": "Bob", "embedding": voice(1, 0.0)["embedding"]}
    keys = [
        key(),
        key(diarize=True),
        key(diarize=True, num_speakers=2),
        key(diarize=True, known_speakers=[ann]),
        key(diarize=True, known_speakers=[bob]),
    ]
    assert len(set(keys)) == len(keys)
    assert key(diarize=True, known_speakers=[ann]) == keys[3]


@pytest.mark.parametrize("values", [np.zeros(256), np.full(256, np.nan), np.full(256, np.inf)])
def test_a_voice_without_a_direction_is_refused_on_the_wire(values):
    """A worker's NaN, infinite or zero embedding would break the file's clustering."""
    embedding = base64.b64encode(values.astype("<f2").tobytes()).decode()
    with pytest.raises(ValidationError, match="finite and not all zero"):
        Voice(start=0.0, end=1.6, embedding=embedding)
