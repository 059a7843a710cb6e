"""One tenant (submit key) against another and against the queue (issue 13): dedup
stays within a key, priority above the board's maximum needs an admin key, and a
retry is new work, held to the key's limits."""

from __future__ import annotations

from tests.farm import ProtocolWorker, submit
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
