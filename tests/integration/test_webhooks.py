"""Webhooks through a real server process and a real HTTP receiver on loopback: the
signature as docs/webhooks.md verifies it, retries with backoff, redirects and timeouts,
the allow-list, every finished state, and the deliveries endpoint."""

from __future__ import annotations

import json
import re
import threading
import time
import uuid
from dataclasses import dataclass
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any
from unittest import mock

import pytest

from server import db, webhooks
from tests.farm import (
    ProtocolWorker,
    Server,
    chunk_plan,
    chunk_transcript,
    create_database,
    sql,
    submit,
)
from tests.farm import wait_for as wait_for_value

DOC = Path(__file__).parents[2] / "docs" / "webhooks.md"
RETRY_BASE = 0.3
TIMEOUT = 1.0


@dataclass
class Received:
    path: str
    headers: Message
    body: bytes
    at: float

    @property
    def json(self) -> dict[str, Any]:
        return json.loads(self.body)


class Receiver:
    """A threaded HTTP server on loopback that records every POST and answers each path
    with the statuses scripted for it, in order (200 once the script runs out)."""

    def __init__(self) -> None:
        self.requests: list[Received] = []
        self.scripts: dict[str, list[tuple[int, dict[str, str], float]]] = {}
        self.lock = threading.Lock()
        receiver = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with receiver.lock:
                    receiver.requests.append(Received(self.path, self.headers, body, time.time()))
                    script = receiver.scripts.get(self.path) or []
                    status, headers, delay = script.pop(0) if script else (200, {}, 0.0)
                time.sleep(delay)
                self.send_response(status)
                for name, value in headers.items():
                    self.send_header(name, value)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.httpd.daemon_threads = True
        self.thread = threading.Thread(target=self.httpd.serve_forever, daemon=True)
        self.thread.start()

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.httpd.server_address[1]}{path}"

    def answer(self, path: str, *answers: int | tuple[int, dict[str, str], float]) -> str:
        """Scripts the answers for `path` and returns its URL."""
        self.scripts[path] = [a if isinstance(a, tuple) else (a, {}, 0.0) for a in answers]
        return self.url(path)

    def received(self, path: str) -> list[Received]:
        with self.lock:
            return [r for r in self.requests if r.path == path]

    def close(self) -> None:
        self.httpd.shutdown()
        self.httpd.server_close()


@pytest.fixture(scope="module")
def receiver():
    r = Receiver()
    yield r
    r.close()


@pytest.fixture(scope="module")
def server(make_server):
    return make_server(
        url_allowlist="127.0.0.1",
        webhook_retry_base_seconds=RETRY_BASE,
        webhook_retry_max_seconds=5,
        webhook_timeout_seconds=TIMEOUT,
        poll_seconds=0.2,
    )


@pytest.fixture(autouse=True)
def clean_board(server):
    server.sql("TRUNCATE transcriptions, jobs, workers CASCADE")


def path() -> str:
    return f"/hooks/{uuid.uuid4().hex[:8]}"


def succeed(worker: ProtocolWorker, tid: str) -> None:
    [chunk] = worker.claim()
    assert chunk["transcription_id"] == tid
    assert worker.complete(chunk, chunk_plan(1)).status_code == 200
    [job] = worker.claim()
    assert worker.complete(job, chunk_transcript(job)).status_code == 200


def deliveries(client, tid: str) -> list[dict[str, Any]]:
    response = client.get(f"/v1/transcriptions/{tid}/webhooks")
    assert response.status_code == 200, response.text
    return response.json()["items"]


def wait_until_final(client, tid: str, timeout: float = 30) -> dict[str, Any]:
    """The transcription's one delivery, once it is delivered or failed."""

    def final() -> dict[str, Any] | None:
        items = deliveries(client, tid)
        return items[0] if len(items) == 1 and items[0]["state"] != "pending" else None

    return wait_for_value(final, timeout, f"the webhook of {tid} to be delivered or fail")


def wait_for_requests(receiver: Receiver, where: str, count: int) -> list[Received]:
    return wait_for_value(
        lambda: (got := receiver.received(where)) and len(got) >= count and got,
        30,
        f"{count} webhook request(s) at {where}",
    )


def documented_verify():
    """The verification function exactly as docs/webhooks.md shows it."""
    blocks = re.findall(r"```python\n(.*?)```", DOC.read_text(), re.DOTALL)
    [snippet] = [b for b in blocks if "def verify(" in b]
    namespace: dict[str, Any] = {}
    exec(snippet, namespace)
    return namespace["verify"]


# --- the signature -----------------------------------------------------------


def test_the_signature_verifies_with_the_snippet_in_the_docs(server, submitter, receiver):
    verify = documented_verify()
    secret = server.cli("webhook-secret").strip().encode()
    assert len(secret) >= 32
    where = path()
    tid = submit(submitter, b"audio", webhook_url=receiver.url(where)).json()["id"]
    assert submitter.post(f"/v1/transcriptions/{tid}/cancel").status_code == 200
    [request] = wait_for_requests(receiver, where, 1)

    header = request.headers["Scribefarm-Signature"]
    assert re.fullmatch(r"t=\d+,v1=[0-9a-f]{64}", header), header
    assert request.headers["Content-Type"] == "application/json"
    assert verify(secret, header, request.body)
    # Altered, signed with another secret, or replayed later: refused.
    assert not verify(secret, header, request.body.replace(b"canceled", b"succeeded"))
    assert not verify(b"not the farm's secret", header, request.body)
    assert not verify(secret, "t=1,v1=00", request.body)
    assert not verify(secret, "garbage", request.body)
    signed_at = int(header.split(",")[0][2:])
    with mock.patch("time.time", return_value=signed_at + 299):
        assert verify(secret, header, request.body)
    with mock.patch("time.time", return_value=signed_at + 301):
        assert not verify(secret, header, request.body)


# --- retries -----------------------------------------------------------------


def test_a_receiver_failing_twice_gets_one_delivery_on_the_third_attempt(
    submitter, worker, receiver
):
    where = path()
    url = receiver.answer(where, 500, 500, 200)
    tid = submit(submitter, b"audio", webhook_url=url).json()["id"]
    assert deliveries(submitter, tid) == []  # nothing until it finishes
    succeed(worker, tid)

    delivery = wait_until_final(submitter, tid)
    assert delivery["state"] == "delivered" and delivery["status"] == "succeeded"
    assert delivery["attempts"] == 3 and delivery["url"] == url
    assert [a["status_code"] for a in delivery["history"]] == [500, 500, 200]
    assert delivery["history"][0]["error"] == "answered HTTP 500; a 2xx answer is needed"
    assert delivery["history"][2]["error"] is None
    assert delivery["delivered_at"] is not None and delivery["next_attempt_at"] is None

    time.sleep(8 * RETRY_BASE)  # more retries would have come by now: none do
    requests = receiver.received(where)
    assert len(requests) == 3
    bodies = [r.json for r in requests]
    assert [b["attempt"] for b in bodies] == [1, 2, 3]
    assert {(b["id"], b["status"], b["delivery_id"]) for b in bodies} == {
        (tid, "succeeded", delivery["id"])
    }
    # Exponential backoff with jitter (x0.5-1.5): ~0.3 s, then ~0.6 s.
    first, second = (requests[i + 1].at - requests[i].at for i in range(2))
    assert RETRY_BASE * 0.5 <= first < RETRY_BASE * 1.5 + 1.0, first
    assert RETRY_BASE <= second < RETRY_BASE * 3 + 1.0, second


def test_a_redirect_is_not_followed_and_counts_as_a_failed_attempt(submitter, receiver):
    where, elsewhere = path(), path()
    url = receiver.answer(where, (302, {"Location": receiver.url(elsewhere)}, 0.0), 204)
    tid = submit(submitter, b"audio", webhook_url=url).json()["id"]
    submitter.post(f"/v1/transcriptions/{tid}/cancel")

    delivery = wait_until_final(submitter, tid)
    assert delivery["state"] == "delivered" and delivery["attempts"] == 2
    redirected = delivery["history"][0]
    assert redirected["status_code"] == 302
    assert redirected["error"] == (
        f"answered HTTP 302 redirecting to {receiver.url(elsewhere)}; webhooks do not "
        "follow redirects: give the final URL as webhook_url"
    )
    assert receiver.received(elsewhere) == []


def test_a_receiver_slower_than_the_timeout_is_a_failed_attempt(submitter, receiver):
    where = path()
    url = receiver.answer(where, (200, {}, TIMEOUT + 1.0), 200)
    tid = submit(submitter, b"audio", webhook_url=url).json()["id"]
    submitter.post(f"/v1/transcriptions/{tid}/cancel")

    delivery = wait_until_final(submitter, tid)
    assert delivery["state"] == "delivered" and delivery["attempts"] == 2
    slow = delivery["history"][0]
    assert slow["status_code"] is None
    assert slow["error"] == "no answer within 1 s (SCRIBEFARM_WEBHOOK_TIMEOUT_SECONDS)"
    assert TIMEOUT * 900 <= slow["milliseconds"] < (TIMEOUT + 1.0) * 1000


def test_retries_stop_when_the_retry_window_ends(server, submitter, receiver):
    where = path()
    url = receiver.answer(where, *[503] * 100)
    tid = submit(submitter, b"audio", webhook_url=url).json()["id"]
    submitter.post(f"/v1/transcriptions/{tid}/cancel")
    wait_for_requests(receiver, where, 1)
    # Age the delivery to just before the end of its 24-hour window.
    server.sql(
        "UPDATE webhook_deliveries SET created_at = now() - interval '24 hours' "
        "+ interval '1 second' WHERE transcription_id = $1",
        tid,
    )
    delivery = wait_until_final(submitter, tid)
    assert delivery["state"] == "failed"
    assert delivery["history"][-1]["status_code"] == 503
    count = delivery["attempts"]
    time.sleep(8 * RETRY_BASE)
    assert len(receiver.received(where)) == count  # nothing after it failed


# --- every finished state ----------------------------------------------------


def test_failed_and_canceled_transcriptions_notify_with_their_status(submitter, worker, receiver):
    failing, canceling = path(), path()
    failed = submit(submitter, b"audio", webhook_url=receiver.url(failing)).json()["id"]
    [chunk] = worker.claim()
    assert worker.fail(chunk, "not an audio file", permanent=True).status_code == 200
    canceled = submit(submitter, b"audio", webhook_url=receiver.url(canceling)).json()["id"]
    submitter.post(f"/v1/transcriptions/{canceled}/cancel")

    [failed_request] = wait_for_requests(receiver, failing, 1)
    [canceled_request] = wait_for_requests(receiver, canceling, 1)
    assert {k: failed_request.json[k] for k in ("id", "status")} == {
        "id": failed,
        "status": "failed",
    }
    assert {k: canceled_request.json[k] for k in ("id", "status")} == {
        "id": canceled,
        "status": "canceled",
    }
    assert wait_until_final(submitter, failed)["status"] == "failed"
    assert wait_until_final(submitter, canceled)["status"] == "canceled"


def test_no_webhook_url_means_no_delivery(submitter, worker):
    tid = submit(submitter, b"audio").json()["id"]
    succeed(worker, tid)
    assert deliveries(submitter, tid) == []


def test_a_retried_transcription_that_finishes_again_is_announced_again(
    submitter, worker, receiver
):
    where = path()
    tid = submit(submitter, b"audio", webhook_url=receiver.url(where)).json()["id"]
    submitter.post(f"/v1/transcriptions/{tid}/cancel")
    wait_until_final(submitter, tid)
    assert submitter.post(f"/v1/transcriptions/{tid}/retry").status_code == 200
    succeed(worker, tid)
    requests = wait_for_requests(receiver, where, 2)
    assert [r.json["status"] for r in requests] == ["canceled", "succeeded"]
    assert len({r.json["delivery_id"] for r in requests}) == 2
    items = deliveries(submitter, tid)
    assert [d["status"] for d in items] == ["canceled", "succeeded"]


# --- the allow-list ----------------------------------------------------------


def test_a_loopback_url_without_the_allow_list_fails_at_once_naming_it(make_server, receiver):
    """A URL that was acceptable when submitted but is refused when sent (the allow-list
    narrowed, or its name now resolves inside): the delivery fails with no retries."""
    server = make_server(webhook_retry_base_seconds=RETRY_BASE, poll_seconds=0.2)
    where = path()
    with server.client(server.create_key("submit")) as client:
        refused = submit(client, b"audio", webhook_url=receiver.url(where))
        assert refused.status_code == 422 and refused.json()["code"] == "url_refused"
        assert "SCRIBEFARM_URL_ALLOWLIST" in refused.json()["message"]
        tid = submit(client, b"audio").json()["id"]
        server.sql(
            "UPDATE transcriptions SET options = options || jsonb_build_object("
            "'webhook_url', $2::text) WHERE id = $1",
            uuid.UUID(tid),
            receiver.url(where),
        )
        assert client.post(f"/v1/transcriptions/{tid}/cancel").status_code == 200
        delivery = wait_until_final(client, tid)
        assert delivery["state"] == "failed" and delivery["attempts"] == 1
        [attempt] = delivery["history"]
        assert attempt["status_code"] is None
        assert attempt["error"] == (
            "refused: 127.0.0.1 is a loopback address; this farm only fetches public "
            "addresses. To allow it, add it to SCRIBEFARM_URL_ALLOWLIST."
        )
        time.sleep(8 * RETRY_BASE)
        assert deliveries(client, tid)[0]["attempts"] == 1
    assert receiver.received(where) == []


# --- several servers ---------------------------------------------------------


def test_two_servers_on_one_board_send_each_delivery_once(server, submitter, receiver, tmp_path):
    other = Server(server.database_url, tmp_path / "other", dict(server.settings)).start()
    try:
        wheres = [path() for _ in range(20)]
        tids = [
            submit(submitter, b"audio", webhook_url=receiver.url(w)).json()["id"] for w in wheres
        ]
        for tid in tids:  # each cancel wakes both senders at once
            assert submitter.post(f"/v1/transcriptions/{tid}/cancel").status_code == 200
        for tid in tids:
            assert wait_until_final(submitter, tid)["attempts"] == 1
        time.sleep(0.5)
        assert [len(receiver.received(w)) for w in wheres] == [1] * len(wheres)
    finally:
        other.stop()


# --- the deliveries endpoint -------------------------------------------------


def test_deliveries_are_visible_to_their_submitter_and_admin_only(server, keys, receiver):
    with server.client(keys["submit"]) as mine:
        tid = submit(mine, b"audio", webhook_url=receiver.url(path())).json()["id"]
        mine.post(f"/v1/transcriptions/{tid}/cancel")
        assert len(deliveries(mine, tid)) == 1
        unknown = mine.get(f"/v1/transcriptions/{uuid.uuid4()}/webhooks")
        assert unknown.status_code == 404 and unknown.json()["code"] == "not_found"
    with server.client(server.create_key("submit")) as theirs:
        response = theirs.get(f"/v1/transcriptions/{tid}/webhooks")
        assert response.status_code == 404 and response.json()["code"] == "not_found"
    with server.client(keys["admin"]) as admin:
        assert len(deliveries(admin, tid)) == 1
    with server.client(keys["worker"]) as worker:
        assert worker.get(f"/v1/transcriptions/{tid}/webhooks").status_code == 403


def test_the_sender_picks_due_deliveries_through_their_index(postgres_url):
    url = create_database(postgres_url)
    db.migrate(url)
    key = sql(
        url,
        "INSERT INTO api_keys (name, role, key_hash, prefix) "
        "VALUES ('k', 'submit', 'h', 'p') RETURNING id",
    )[0]["id"]
    tid = uuid.uuid4()
    sql(
        url,
        "INSERT INTO transcriptions (id, api_key_id, state, source_key, source_bytes, "
        "options, model, priority) VALUES ($1, $2, 'canceled', 's', 1, '{}', 'tiny.en', 0)",
        tid,
        key,
    )
    sql(
        url,
        "INSERT INTO webhook_deliveries (transcription_id, url, status, state) "
        "SELECT $1, 'https://example.com/', 'canceled', "
        "CASE WHEN s % 100 = 0 THEN 'pending' ELSE 'delivered' END "
        "FROM generate_series(1, 20000) AS s",
        tid,
    )
    sql(url, "ANALYZE webhook_deliveries")
    for query in (
        webhooks.CLAIM_DUE.replace("$1", "16").replace("$2", "50"),
        webhooks.NEXT_DUE,
    ):
        plan = "\n".join(row["QUERY PLAN"] for row in sql(url, "EXPLAIN " + query))
        assert "ix_webhook_deliveries_due" in plan, plan
        assert "Seq Scan on webhook_deliveries" not in plan, plan
