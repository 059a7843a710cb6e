"""Limits and keys: every limit refuses with the limit and its setting named, and what
it refuses leaves nothing behind; keys can expire and be revoked, and never reach
the logs. Against a real server process and PostgreSQL."""

from __future__ import annotations

import time
from concurrent.futures import ThreadPoolExecutor

import pytest

from tests.farm import ProtocolWorker, chunk_plan, submit, wait_for

pytestmark = pytest.mark.timeout(120)


def roles(server) -> dict[str, str]:
    return {role: server.create_key(role) for role in ("submit", "worker", "admin")}


def stored_sources(server) -> int:
    directory = server.data_dir / "storage" / "sources"
    return len(list(directory.iterdir())) if directory.exists() else 0


def test_a_key_may_have_so_many_transcriptions_unfinished(make_server):
    server = make_server(max_active_per_key=3)
    keys = roles(server)
    with server.client(keys["submit"]) as client, server.client(keys["admin"]) as admin:
        # Submitted all at once: the limit holds exactly (submissions of one key queue
        # behind each other), and the refused uploads leave no object behind.
        with ThreadPoolExecutor(8) as pool:
            answers = list(pool.map(lambda i: submit(client, b"x%d" % i), range(8)))
        assert sorted(r.status_code for r in answers) == [201] * 3 + [429] * 5
        refused = next(r for r in answers if r.status_code == 429)
        assert refused.headers["Retry-After"] == "30"
        assert refused.json()["code"] == "too_many_active"
        assert "the limit is 3 (SCRIBEFARM_MAX_ACTIVE_PER_KEY)" in refused.json()["message"]
        assert stored_sources(server) == 3

        assert submit(admin, b"the operator is not limited").status_code == 201
        first = next(r for r in answers if r.status_code == 201).json()["id"]
        client.post(f"/v1/transcriptions/{first}/cancel")
        assert submit(client, b"room again").status_code == 201


def test_a_key_may_submit_so_many_a_minute(make_server):
    server = make_server(submissions_per_minute=3)
    keys = roles(server)
    with server.client(keys["submit"]) as client:
        for i in range(3):
            assert submit(client, b"%d" % i).status_code == 201
        refused = client.post("/v1/transcriptions", json={"url": "http://example.invalid/a"})
        assert refused.status_code == 429 and refused.json()["code"] == "too_many_submissions"
        assert 1 <= int(refused.headers["Retry-After"]) <= 60
        message = refused.json()["message"]
        assert "the limit is 3 a minute (SCRIBEFARM_SUBMISSIONS_PER_MINUTE)" in message
    with server.client(server.create_key("submit")) as other:
        assert submit(other, b"another key has its own minute").status_code == 201


def test_audio_over_the_maximum_duration_fails_with_the_limit_named(make_server):
    server = make_server(max_audio_seconds=3600)
    keys = roles(server)
    worker = ProtocolWorker(server, keys["worker"])
    with server.client(keys["submit"]) as client:
        tid = submit(client, b"a long recording").json()["id"]
        [job] = worker.claim()
        assert worker.complete(job, chunk_plan(370)).status_code == 200  # 3700 s
        view = client.get(f"/v1/transcriptions/{tid}").json()
    worker.close()
    assert view["state"] == "failed" and view["duration_seconds"] == 3700
    assert "1.03 h long; the limit is 1.00 h (SCRIBEFARM_MAX_AUDIO_SECONDS)" in view["error"]
    assert server.sql("SELECT count(*) AS n FROM jobs WHERE kind = 'transcribe'")[0]["n"] == 0


def test_the_board_takes_so_many_workers(make_server):
    server = make_server(max_workers=2)
    keys = roles(server)
    workers = [ProtocolWorker(server, keys["worker"], name=f"w{i}") for i in range(2)]
    with server.client(keys["worker"]) as http:
        refused = http.post("/v1/workers", json={"name": "third", "models": ["tiny.en"]})
    assert refused.status_code == 429 and refused.headers["Retry-After"] == "60"
    assert "the limit is 2 (SCRIBEFARM_MAX_WORKERS)" in refused.json()["message"]
    for w in workers:
        w.close()


def test_revoked_and_expired_keys_are_refused(server):
    key = server.create_key("submit")
    with server.client(key) as client:
        assert client.get("/v1/transcriptions").status_code == 200
        listing = server.cli("keys", "list")
        assert key[:10] in listing and key not in listing  # never the key itself

        assert "revoked" in server.cli("keys", "revoke", key[:10])
        wait_for(
            lambda: client.get("/v1/transcriptions").status_code == 401,
            10,
            "the revocation to reach the server (its key cache holds 5 s)",
        )
        assert any(
            key[:10] in line and "revoked" in line
            for line in server.cli("keys", "list").splitlines()
        )

    short = server.cli("keys", "create", "--role", "submit", "--expires-in-days", "0.00003")
    short = short.strip().splitlines()[-1]
    with server.client(short) as client:
        assert client.get("/v1/transcriptions").status_code == 200
        time.sleep(3)
        wait_for(lambda: client.get("/v1/transcriptions").status_code == 401, 10, "expiry")


def test_keys_never_reach_the_logs(server):
    keys = roles(server)
    wrong = "sf_" + "x" * 43
    for key in (*keys.values(), wrong):
        with server.client(key) as client:
            client.get("/v1/transcriptions")
            client.get(f"/v1/transcriptions?cursor={key}")  # even where it does not belong
            client.post("/v1/jobs/claim", json={})
    log = server.log_path.read_text()
    assert log  # the server did log these requests' outcomes somewhere
    assert [key for key in (*keys.values(), wrong) if key in log] == []


def test_revoking_a_key_ends_its_long_polls_and_openai_waits_within_5_s(make_server):
    """Requests that wait (a worker's long poll, an OpenAI request waiting for its
    transcript) checked their key only when they began (issue 13)."""
    server = make_server(openai_wait_seconds=120)
    worker_key, submit_key = server.create_key("worker"), server.create_key("submit")
    # Transcribe jobs only: the OpenAI request's chunk job must not end the long poll.
    worker = ProtocolWorker(server, worker_key, kinds=["transcribe"])
    body = {"worker_id": worker.id, "max_jobs": 1, "wait_seconds": 50}

    def long_poll():
        with server.client(worker_key, timeout=90) as client:
            return client.post("/v1/jobs/claim", json=body), time.monotonic()

    def openai_wait():
        with server.client(submit_key, timeout=150) as client:
            files = {"file": ("a.wav", b"RIFF" + b"\0" * 100)}
            response = client.post(
                "/v1/audio/transcriptions", files=files, data={"model": "whisper-1"}
            )
            return response, time.monotonic()

    with ThreadPoolExecutor(2) as pool:
        polling, waiting = pool.submit(long_poll), pool.submit(openai_wait)
        time.sleep(3)  # both are waiting by now (nothing runs the transcription)
        early = [f.result()[0].text for f in (polling, waiting) if f.done()]
        assert early == [], early
        for key in (worker_key, submit_key):
            assert "revoked" in server.cli("keys", "revoke", key[:10])
        revoked = time.monotonic()
        for future in (polling, waiting):
            response, ended = future.result(timeout=30)
            assert response.status_code == 401, response.text
            assert response.json()["code"] == "invalid_key"
            assert ended - revoked <= 5.0, f"ended {ended - revoked:.1f} s after the revocation"
    worker.close()
