"""One tenant (submit key) against another and against the queue (issue 13): dedup
stays within a key, priority above the board's maximum needs an admin key, and a
retry is new work, held to the key's limits; the chunk cache is per owner."""

from __future__ import annotations

import pytest

from tests.farm import ProtocolWorker, chunk_plan, chunk_transcript, submit
from tests.integration.test_results import finish_one


def test_dedup_never_answers_one_key_with_another_keys_transcript(make_server):
    server = make_server(dedup=True)
    worker_key = server.create_key("worker")
    alice, mallory = server.create_key("submit"), server.create_key("submit")
    audio = b"alice's private recording" * 100
    with server.client(alice) as client:
        first = submit(client, audio).json()["id"]
        finish_one(server, worker_key)
        assert submit(client, audio).json()["state"] == "succeeded"  # her own: deduplicated
    with server.client(mallory) as client:
        probe = submit(client, audio).json()
    # Answered at once, it would tell Mallory that someone transcribed these bytes.
    assert probe["state"] == "queued", probe
    assert probe.get("deduplicated_from") != first


def test_priority_above_the_maximum_needs_an_admin_key(make_server):
    server = make_server(max_submit_priority=0)  # the default
    submitter, admin = server.create_key("submit"), server.create_key("admin")
    with server.client(submitter) as client:
        refused = submit(client, b"x", priority=100)
        assert refused.status_code == 403
        assert refused.json()["code"] == "priority_not_allowed"
        assert "SCRIBEFARM_MAX_SUBMIT_PRIORITY" in refused.json()["message"]
        url = client.post("/v1/transcriptions", json={"url": "http://x.invalid/a", "priority": 5})
        assert url.json()["code"] == "priority_not_allowed"
        assert submit(client, b"x", priority=0).status_code == 201
        assert submit(client, b"x", priority=-10).status_code == 201  # yielding is fine
    with server.client(admin) as client:
        assert submit(client, b"x", priority=100).status_code == 201


def test_a_retry_counts_against_the_active_limit(make_server):
    server = make_server(max_active_per_key=1)
    key, worker_key = server.create_key("submit"), server.create_key("worker")
    worker = ProtocolWorker(server, worker_key)
    with server.client(key) as client:
        failed = submit(client, b"bad").json()["id"]
        [job] = worker.claim()
        assert worker.fail(job, "not media", permanent=True).status_code == 200
        assert submit(client, b"next").status_code == 201  # the one active slot
        retry = client.post(f"/v1/transcriptions/{failed}/retry")
        assert retry.status_code == 429, retry.text
        assert retry.json()["code"] == "too_many_active"
        assert client.get(f"/v1/transcriptions/{failed}").json()["state"] == "failed"
    worker.close()


def test_a_retry_counts_against_the_submissions_per_minute(make_server):
    server = make_server(submissions_per_minute=2)
    key, worker_key = server.create_key("submit"), server.create_key("worker")
    worker = ProtocolWorker(server, worker_key)

    def fail_it() -> None:
        [job] = worker.claim()
        assert worker.fail(job, "not media", permanent=True).status_code == 200

    with server.client(key) as client:
        failed = submit(client, b"bad").json()["id"]  # the minute's first submission
        fail_it()
        assert client.post(f"/v1/transcriptions/{failed}/retry").status_code == 200  # second
        fail_it()
        retry = client.post(f"/v1/transcriptions/{failed}/retry")
        assert retry.status_code == 429, retry.text
        assert retry.json()["code"] == "too_many_submissions"
        assert client.get(f"/v1/transcriptions/{failed}").json()["state"] == "failed"
    worker.close()


def transcribe_job(worker: ProtocolWorker, client, audio: bytes) -> tuple[str, dict]:
    """Submits `audio`, plans it as one chunk; returns the id and its leased transcribe job."""
    tid = submit(client, audio).json()["id"]
    [job] = worker.claim()
    assert worker.complete(job, chunk_plan(1)).status_code == 200
    [job] = worker.claim()
    return tid, job


def lookup(worker: ProtocolWorker, key: str, job: dict | None) -> dict:
    body = {"keys": [key], "job_ids": [job["id"]] if job else []}
    response = worker.http.post("/v1/chunk-cache/lookup", json=body)
    assert response.status_code == 200, response.text
    return response.json()["results"]


def test_the_chunk_cache_is_per_owner_and_forgets_deleted_transcriptions(server_and_keys):
    server, worker_key = server_and_keys
    alice, mallory = server.create_key("submit"), server.create_key("submit")
    worker = ProtocolWorker(server, worker_key)
    key = "a" * 64  # what workers derive from the audio and options
    with server.client(alice) as a, server.client(mallory) as m:
        # Mallory's worker completes Mallory's job, planting text under a key it chose.
        _, job = transcribe_job(worker, m, b"mallory")
        planted = {**chunk_transcript(job, "PLANTED"), "cache_key": key}
        assert worker.complete(job, planted).status_code == 200
        # Alice's chunk with that key finds nothing of Mallory's.
        first, job = transcribe_job(worker, a, b"alice")
        assert lookup(worker, key, job) == {}
        mine = {**chunk_transcript(job, "alice's words"), "cache_key": key}
        assert worker.complete(job, mine).status_code == 200
        # Her own next chunk reuses her text; Mallory's job cannot read it; nor can a
        # lookup naming no job.
        _, again = transcribe_job(worker, a, b"alice again")
        [hit] = lookup(worker, key, again).values()
        assert hit["segments"][0]["text"] == "alice's words"
        _, theirs = transcribe_job(worker, m, b"mallory again")
        assert lookup(worker, key, theirs)[key]["segments"][0]["text"] == "PLANTED"
        assert lookup(worker, key, None) == {}
        # Deleting her transcription deletes what the cache holds from it.
        assert a.delete(f"/v1/transcriptions/{first}").status_code == 204
        assert lookup(worker, key, again) == {}
    worker.close()


def test_a_worker_cannot_look_up_the_cache_for_another_workers_job(server_and_keys):
    server, worker_key = server_and_keys
    alice = server.create_key("submit")
    other = ProtocolWorker(server, server.create_key("worker"))
    worker = ProtocolWorker(server, worker_key)
    key = "b" * 64
    with server.client(alice) as a:
        _, job = transcribe_job(worker, a, b"alice")
        assert worker.complete(job, {**chunk_transcript(job), "cache_key": key}).status_code == 200
        _, again = transcribe_job(worker, a, b"alice again")
        assert lookup(worker, key, again) != {}
        assert lookup(other, key, again) == {}  # not a job this worker key holds
    worker.close()
    other.close()


@pytest.fixture
def server_and_keys(make_server):
    server = make_server()
    return server, server.create_key("worker")
