"""Where results live (the row or storage), deletion, retention and deduplication,
against a real server process and PostgreSQL. The tests play the worker's part
(ProtocolWorker), so they choose the transcripts."""

from __future__ import annotations

import hashlib
from datetime import UTC, datetime
from uuid import UUID, uuid4

import pytest
import srt as srt_parser

from server import transcripts
from shared.protocol import ChunkTranscript, TranscriptionOptions
from tests.farm import ProtocolWorker, chunk_plan, chunk_transcript, submit, wait_for

pytestmark = pytest.mark.timeout(300)

TEXT = "the quick brown fox jumps over the lazy dog"


def finish_one(server, worker_key: str, text: str = TEXT) -> None:
    """Runs the one queued transcription to success: a one-chunk plan, then `text`."""
    worker = ProtocolWorker(server, worker_key)
    try:
        [job] = worker.claim()
        assert worker.complete(job, chunk_plan(1)).status_code == 200
        [job] = worker.claim()
        assert worker.complete(job, chunk_transcript(job, text)).status_code == 200
    finally:
        worker.close()


def document_size(language: str | None) -> int:
    """The size of the document finish_one produces, computed the way the board does."""
    options = TranscriptionOptions(language=language).model_dump(mode="json")
    now = datetime.now(UTC)
    header = {"id": uuid4(), "model": "tiny.en", "options": options}
    header |= {"created_at": now, "started_at": now, "finished_at": now}
    job = {"chunk": {"index": 0, "start": 0.0, "end": 10.0}}
    result = ChunkTranscript.model_validate(chunk_transcript(job, TEXT)).model_dump(mode="json")
    merged = transcripts.merge([(0.0, 10.0, result)], 10.0)
    return len(transcripts.document_bytes(transcripts.document(header, merged, {})))


def stored(server, key: str) -> bytes | None:
    path = server.data_dir / "storage" / key
    return path.read_bytes() if path.exists() else None


@pytest.fixture(scope="module")
def boundary(make_server):
    """A server whose inline limit is exactly the size of an English document."""
    limit = document_size("en")
    assert document_size("eng") == limit + 1  # one more byte, and nothing else changes
    server = make_server(inline_result_bytes=limit)
    return server, {role: server.create_key(role) for role in ("submit", "worker")}


def test_a_transcript_at_the_limit_stays_in_the_row_and_one_byte_over_goes_to_storage(boundary):
    server, keys = boundary
    ids = {}
    with server.client(keys["submit"]) as client:
        for language in ("en", "eng"):
            response = submit(client, f"audio {language}".encode(), language=language)
            assert response.status_code == 201, response.text
            ids[language] = response.json()["id"]
            finish_one(server, keys["worker"])

        [inline] = server.sql("SELECT * FROM transcriptions WHERE id = $1", UUID(ids["en"]))
        assert inline["transcript"] is not None and inline["transcript_key"] is None
        [large] = server.sql("SELECT * FROM transcriptions WHERE id = $1", UUID(ids["eng"]))
        assert large["transcript"] is None
        body = stored(server, large["transcript_key"])
        assert body is not None
        assert large["transcript_bytes"] == len(body) == document_size("eng")
        assert large["transcript_sha256"] == hashlib.sha256(body).hexdigest()

        # Read back the same way either way: the stored one byte for byte.
        served = client.get(f"/v1/transcriptions/{ids['eng']}/transcript?format=json")
        assert served.status_code == 200 and served.content == body
        for tid in ids.values():
            document = client.get(f"/v1/transcriptions/{tid}/transcript").json()
            assert document["id"] == tid and document["text"] == TEXT
            assert document["model"] == "tiny.en" and document["timings"]["finished_at"]
            srt = client.get(f"/v1/transcriptions/{tid}/transcript?format=srt").text
            # Over 7 s: two cues, between words.
            assert " ".join(c.content for c in srt_parser.parse(srt)) == TEXT


def test_deleting_a_transcription_deletes_its_objects(boundary):
    server, keys = boundary
    with server.client(keys["submit"]) as client:
        response = submit(client, b"to be deleted", language="eng")
        tid = response.json()["id"]
        finish_one(server, keys["worker"])
        [row] = server.sql("SELECT * FROM transcriptions WHERE id = $1", UUID(tid))
        objects = [row["source_key"], row["transcript_key"]]
        assert all(stored(server, key) is not None for key in objects)

        assert client.delete(f"/v1/transcriptions/{tid}").status_code == 204
        assert client.get(f"/v1/transcriptions/{tid}").status_code == 404
        assert [key for key in objects if stored(server, key) is not None] == []
        assert server.sql("SELECT id FROM jobs WHERE transcription_id = $1", UUID(tid)) == []
        assert client.delete(f"/v1/transcriptions/{tid}").status_code == 404


def test_deleting_a_running_transcription_cancels_its_jobs_first(boundary):
    server, keys = boundary
    worker = ProtocolWorker(server, keys["worker"])
    with server.client(keys["submit"]) as client:
        tid = submit(client, b"running").json()["id"]
        [job] = worker.claim()
        assert client.delete(f"/v1/transcriptions/{tid}").status_code == 204
        # The worker holding its lease learns it at its next heartbeat and drops it.
        assert worker.heartbeat(job).status_code == 409
        assert worker.complete(job, chunk_plan(1)).json()["code"] == "job_gone"
    worker.close()


def test_resubmitting_the_same_audio_and_options_returns_the_transcript_at_once(make_server):
    server = make_server(dedup=True)
    keys = {role: server.create_key(role) for role in ("submit", "worker")}
    audio = b"the same bytes" * 1000
    with server.client(keys["submit"]) as client:
        first = submit(client, audio, "first.wav").json()["id"]
        finish_one(server, keys["worker"])

        again = submit(client, audio, "again.wav").json()
        assert again["state"] == "succeeded" and again["id"] != first
        document = client.get(f"/v1/transcriptions/{again['id']}/transcript").json()
        assert document["text"] == TEXT and document["id"] == again["id"]
        assert document["deduplicated_from"] == first

        # Other options, or other audio: transcribed anew.
        assert submit(client, audio, language="en").json()["state"] == "queued"
        assert submit(client, audio + b"!").json()["state"] == "queued"


def test_dedup_can_be_turned_off(make_server):
    server = make_server(dedup=False)
    keys = {role: server.create_key(role) for role in ("submit", "worker")}
    with server.client(keys["submit"]) as client:
        submit(client, b"twice")
        finish_one(server, keys["worker"])
        assert submit(client, b"twice").json()["state"] == "queued"


def test_retention_deletes_old_transcriptions_and_their_objects(make_server):
    server = make_server(retention_days=2 / 86400, inline_result_bytes=0)
    keys = {role: server.create_key(role) for role in ("submit", "worker")}
    with server.client(keys["submit"]) as client:
        tid = submit(client, b"short-lived").json()["id"]
        queued = submit(client, b"still queued").json()["id"]
        finish_one(server, keys["worker"])
        [row] = server.sql("SELECT * FROM transcriptions WHERE id = $1", UUID(tid))
        assert stored(server, row["transcript_key"]) is not None

        gone = lambda: client.get(f"/v1/transcriptions/{tid}").status_code == 404  # noqa: E731
        wait_for(gone, 30, "retention to delete the finished transcription")
        assert stored(server, row["transcript_key"]) is None
        assert stored(server, row["source_key"]) is None
        # Unfinished work is never expired.
        assert client.get(f"/v1/transcriptions/{queued}").json()["state"] == "queued"
