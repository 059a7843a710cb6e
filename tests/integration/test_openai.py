"""The OpenAI-compatible endpoint, through the official `openai` client: a real server,
a real worker process, real speech. Whisper runs twice in this module (once without
word timestamps, once with); every other request is a resubmission the board answers
from the first run (dedup), as it would for a user sending the same file again."""

from __future__ import annotations

import time
from datetime import datetime

import httpx
import openai
import pytest
import srt
import webvtt

from tests.farm import WorkerProcess
from tests.speech import PARAGRAPHS, decode, normalise_text, word_error_rate

TRANSCRIPTION_HEADER = "x-scribefarm-transcription-id"


@pytest.fixture(scope="module")
def farm(make_server):
    server = make_server(dedup=True)  # the tests' default is off
    keys = {role: server.create_key(role) for role in ("submit", "worker")}
    worker = WorkerProcess(server, keys["worker"], "openai-w", ("--threads", "2")).start()
    yield server, keys
    worker.stop()


@pytest.fixture(scope="module")
def client(farm):
    server, keys = farm
    with openai.OpenAI(base_url=server.url + "/v1", api_key=keys["submit"]) as client:
        yield client


@pytest.fixture(scope="module")
def speech(media):
    return media.paragraphs((0,))


def create(client: openai.OpenAI, path, **params):
    """One request as a user makes it; also returns the raw response and which
    transcription the server made of it."""
    params = {"model": "whisper-1", **params}
    raw = client.audio.transcriptions.with_raw_response.create(
        file=(path.name, path.read_bytes()), **params
    )
    return raw.parse(), raw, raw.headers[TRANSCRIPTION_HEADER]


def native(farm, tid: str, fmt: str = "json"):
    server, keys = farm
    with server.client(keys["submit"]) as http:
        response = http.get(f"/v1/transcriptions/{tid}/transcript", params={"format": fmt})
        assert response.status_code == 200, response.text
        return response


def view(farm, tid: str) -> dict:
    server, keys = farm
    with server.client(keys["submit"]) as http:
        return http.get(f"/v1/transcriptions/{tid}").json()


@pytest.fixture(scope="module")
def first(farm, client, speech):
    """The run that transcribes the file: json, the format clients ask for by default."""
    result, _, tid = create(client, speech)
    answered_at = time.time()
    document = native(farm, tid).json()
    return result, tid, document, answered_at


def test_json_answers_the_transcript_as_soon_as_it_is_done(farm, first, speech):
    result, tid, document, answered_at = first
    assert isinstance(result, openai.types.audio.Transcription)
    assert result.text == document["text"]
    # Real speech, really transcribed.
    assert word_error_rate(PARAGRAPHS[0], result.text) < 0.2
    assert "deduplicated_from" not in document  # Whisper ran for this one
    assert document["model"] == "tiny.en"  # whisper-1: the board's default model
    shown = view(farm, tid)
    assert shown["options"]["model"] is None and shown["model"] == "tiny.en"
    # Woken by the finished NOTIFY, not by the fallback poll (10 s while listening).
    finished_at = datetime.fromisoformat(view(farm, tid)["finished_at"]).timestamp()
    assert answered_at - finished_at < 3.0, answered_at - finished_at


@pytest.mark.parametrize("fmt", ["text", "srt", "vtt", "verbose_json"])
def test_each_response_format_matches_the_native_transcript(farm, client, first, speech, fmt):
    _, _, document, _ = first
    result, raw, tid = create(client, speech, response_format=fmt)
    # The same file and options: answered from an earlier run, Whisper did not run again.
    assert "deduplicated_from" in native(farm, tid).json()
    segments = document["segments"]
    assert len(segments) >= 2
    texts = [s["text"] for s in segments]
    if fmt == "text":
        assert result == document["text"] + "\n"
        return
    if fmt == "srt":
        assert result == native(farm, tid, "srt").text
        subtitles = list(srt.parse(result))
        # A cue is its segment's text on at most two lines of 42 characters.
        assert [s.content.replace("\n", " ") for s in subtitles] == texts
        assert all(len(line) <= 42 for s in subtitles for line in s.content.split("\n"))
        assert [s.start.total_seconds() for s in subtitles] == [
            pytest.approx(s["start"], abs=0.0005) for s in segments
        ]
        assert [s.end.total_seconds() for s in subtitles] == [
            pytest.approx(s["end"], abs=0.0005) for s in segments
        ]
        return
    if fmt == "vtt":
        assert result == native(farm, tid, "vtt").text
        captions = webvtt.from_string(result)
        assert [c.text.replace("\n", " ") for c in captions] == texts
        assert [c.start_time.in_milliseconds() / 1000 for c in captions] == [
            pytest.approx(s["start"], abs=0.0005) for s in segments
        ]
        return
    assert isinstance(result, openai.types.audio.TranscriptionVerbose)
    assert result.language == "english"
    assert result.duration == pytest.approx(len(decode(speech)) / 16000, abs=0.05)
    assert result.text == document["text"]
    assert [s.id for s in result.segments] == list(range(len(segments)))
    assert [(s.start, s.end, s.text) for s in result.segments] == [
        (s["start"], s["end"], s["text"]) for s in segments
    ]
    assert [s.avg_logprob for s in result.segments] == [s["avg_logprob"] for s in segments]
    assert all(s.tokens == [] and s.temperature == 0.0 for s in result.segments)
    assert result.words is None  # no word timestamps were asked for
    assert raw.http_response.json() == native(farm, tid, "verbose_json").json()


def test_verbose_json_with_word_timestamps_and_a_model_name(farm, client, speech):
    result, raw, tid = create(
        client,
        speech,
        model="tiny.en",
        language="en",
        response_format="verbose_json",
        timestamp_granularities=["word", "segment"],
        temperature=0.2,
    )
    document = native(farm, tid).json()
    assert document["options"]["word_timestamps"] is True
    assert document["options"]["model"] == "tiny.en" and document["options"]["language"] == "en"
    assert result.text == document["text"]
    assert [(s.start, s.end) for s in result.segments] == [
        (s["start"], s["end"]) for s in document["segments"]
    ]
    words = result.words
    assert [(w.word, w.start, w.end) for w in words] == [
        (w["word"], w["start"], w["end"]) for s in document["segments"] for w in s["words"]
    ]
    recognised = normalise_text(" ".join(w.word for w in words)).split()
    assert recognised == normalise_text(result.text).split()
    starts = [w.start for w in words]
    assert starts == sorted(starts) and all(w.start <= w.end for w in words)
    assert words[-1].end <= result.duration
    # The native endpoint renders the same document the same way.
    assert raw.http_response.json() == native(farm, tid, "verbose_json").json()

    # Words only: OpenAI then leaves the segments out. Same options: no new run.
    only_words, _, again = create(
        client,
        speech,
        model="tiny.en",
        language="en",
        response_format="verbose_json",
        timestamp_granularities=["word"],
    )
    assert native(farm, again).json()["deduplicated_from"] == tid
    assert farm[0].sql("SELECT count(*) AS n FROM jobs WHERE transcription_id = $1", again) == [
        {"n": 0}
    ]
    assert only_words.segments is None
    assert [w.word for w in only_words.words] == [w.word for w in words]


def test_the_prompt_reaches_the_decoding(client, media):
    # tiny.en cannot spell these names unaided; given them in the prompt, it does.
    names = "Siobhan Nguyen and Tadhg Okonkwo"
    clip = media.speech(f"Please send the report to {names} before Friday.")
    plain, _, _ = create(client, clip)
    prompted, _, _ = create(client, clip, prompt="Siobhan Nguyen, Tadhg Okonkwo.")
    assert names not in plain.text
    assert names in prompted.text


def test_bad_requests_are_openai_errors_with_a_readable_message(farm, client, speech):
    server, keys = farm
    sources = server.data_dir / "storage" / "sources"

    def stored() -> list:
        return sorted(sources.iterdir()) if sources.exists() else []

    stored_before = stored()

    with pytest.raises(openai.BadRequestError) as unknown_format:
        create(client, speech, response_format="docx")
    error = unknown_format.value
    assert (error.status_code, error.param, error.code) == (400, "response_format", "invalid_value")
    assert "response_format 'docx' is not supported; use one of json, text" in error.message
    body = error.response.json()  # OpenAI's shape, and scribefarm's `code` and `message`
    assert body["error"] == {
        "message": body["message"],
        "type": "invalid_request_error",
        "param": "response_format",
        "code": "invalid_value",
    }
    assert body["code"] == "invalid_value"
    assert error.response.headers["x-should-retry"] == "false"

    with pytest.raises(openai.BadRequestError) as no_file:
        client.post(
            "/audio/transcriptions",
            body={"model": "whisper-1"},
            files=[],
            cast_to=object,
            options={"headers": {"Content-Type": "multipart/form-data"}},
        )
    assert (no_file.value.param, no_file.value.code) == ("file", "file_required")
    assert "'file'" in no_file.value.message

    with pytest.raises(openai.BadRequestError) as model:
        create(client, speech, model="large-v3")  # no worker has it
    assert (model.value.param, model.value.code) == ("model", "unknown_model")

    with pytest.raises(openai.BadRequestError) as language:
        create(client, speech, language="English")
    assert language.value.param == "language" and "language:" in language.value.message

    # An OpenAI feature the farm does not have is refused, not silently ignored.
    with pytest.raises(openai.BadRequestError) as unsupported:
        create(client, speech, include=["logprobs"])
    assert unsupported.value.param == "include[]"
    assert unsupported.value.code == "unknown_parameter"
    with pytest.raises(openai.BadRequestError) as chunking:  # "auto" is what the farm does
        create(client, speech, chunking_strategy={"type": "server_vad"})
    assert chunking.value.param == "chunking_strategy[type]"  # how the client sends it

    assert stored() == stored_before  # nothing refused was kept

    bogus = openai.OpenAI(base_url=server.url + "/v1", api_key="sf_not-a-key", max_retries=0)
    with pytest.raises(openai.AuthenticationError) as unknown_key:
        create(bogus, speech)
    assert unknown_key.value.code == "invalid_key"
    assert unknown_key.value.type == "invalid_request_error"  # auth errors too: OpenAI's shape
    worker = openai.OpenAI(base_url=server.url + "/v1", api_key=keys["worker"], max_retries=0)
    with pytest.raises(openai.PermissionDeniedError) as wrong_role:
        create(worker, speech)
    assert "role submit or admin" in wrong_role.value.message


def test_a_failed_transcription_is_an_error_with_its_reason(farm, client, tmp_path):
    server, _ = farm
    notes = tmp_path / "notes.txt"
    notes.write_bytes(b"these are meeting notes, not audio\n" * 50)
    with pytest.raises(openai.UnprocessableEntityError) as failed:
        create(client, notes)
    error = failed.value
    tid = error.response.headers[TRANSCRIPTION_HEADER]
    reason = view(farm, tid)["error"]
    assert view(farm, tid)["state"] == "failed" and reason
    assert error.code == "transcription_failed"
    assert error.body["message"] == f"transcription {tid} failed: {reason}"
    assert error.message.endswith(error.body["message"])  # what the client shows
    # The client did not retry: one upload, one transcription.
    rows = server.sql("SELECT count(*) AS n FROM transcriptions WHERE filename = 'notes.txt'")
    assert rows == [{"n": 1}]


# --- waiting, on a board with no workers ------------------------------------------------

WAIT = 4.0


@pytest.fixture(scope="module")
def idle(make_server):
    server = make_server(openai_wait_seconds=WAIT)
    return server, server.create_key("submit")


def test_waiting_ends_after_the_limit_naming_the_transcription(idle, speech):
    server, key = idle
    client = openai.OpenAI(base_url=server.url + "/v1", api_key=key)  # retries on 5xx
    started = time.monotonic()
    with pytest.raises(openai.InternalServerError) as timed_out:
        create(client, speech)
    assert WAIT <= time.monotonic() - started < WAIT + 3
    error = timed_out.value
    assert error.status_code == 504 and error.code == "transcription_timeout"
    tid = error.response.headers[TRANSCRIPTION_HEADER]
    assert f"GET /v1/transcriptions/{tid}/transcript" in error.message
    # It goes on, and the client did not upload the file again.
    assert server.sql("SELECT id::text, state FROM transcriptions") == [
        {"id": tid, "state": "queued"}
    ]


def test_a_client_that_hangs_up_stops_the_wait(idle, speech):
    server, key = idle
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(
            server.url + "/v1/audio/transcriptions",
            headers={"Authorization": f"Bearer {key}"},
            files={"file": (speech.name, speech.read_bytes())},
            data={"model": "whisper-1"},
            timeout=httpx.Timeout(30, read=1.0),
        )
    hung_up_at = time.monotonic()
    while "hung up" not in server.log_path.read_text():
        # Before the wait would have ended on its own (and logged nothing).
        assert time.monotonic() - hung_up_at < WAIT - 1.5, server.log_path.read_text()[-2000:]
        time.sleep(0.1)
