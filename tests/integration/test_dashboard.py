"""The dashboard over plain HTTP: sign-in, sessions, CSRF, the live stream, requeue.
(tests/browser/ drives it in a real browser.)"""

from __future__ import annotations

import contextlib
import json
import re
import time

import httpx
import pytest

from server import dashboard
from tests.farm import ProtocolWorker, submit

HTML = {"Accept": "text/html"}


class Browserless:
    """A cookie jar that signs in through the dashboard's forms, as a browser would."""

    def __init__(self, server):
        self.http = httpx.Client(base_url=server.url, headers=HTML, timeout=10)

    def csrf(self, path: str = "/signin") -> str:
        page = self.http.get(path)
        assert page.status_code == 200, page.text
        return re.search(r'<meta name="csrf-token" content="([0-9a-f]*)">', page.text)[1]

    def sign_in(self, key: str) -> httpx.Response:
        return self.http.post("/signin", data={"key": key, "csrf_token": self.csrf(), "next": "/"})

    def events(self, name: str):
        return self.http.stream("GET", f"/events/{name}", headers={"Accept": "text/event-stream"})


def signed_in(server, key: str) -> Browserless:
    browser = Browserless(server)
    assert browser.sign_in(key).status_code == 303
    return browser


def next_event(lines) -> tuple[str, str]:
    """The next event's name and data (comments and retry lines skipped)."""
    name = None
    for line in lines:
        if line.startswith("event: "):
            name = line.removeprefix("event: ")
        elif line.startswith("data: ") and name:
            return name, line.removeprefix("data: ")
    raise AssertionError("the stream ended")


def test_signing_in_takes_the_forms_token_and_a_submit_or_admin_key(server, keys):
    browser = Browserless(server)
    refused = browser.http.post("/signin", data={"key": keys["submit"]})
    assert refused.status_code == 403 and "reload the page" in refused.text
    assert browser.sign_in("sf_not-a-real-key").status_code == 401
    worker = browser.sign_in(keys["worker"])
    assert worker.status_code == 403 and "worker key cannot sign in" in worker.text

    signed = browser.sign_in(keys["submit"])
    assert signed.status_code == 303 and signed.headers["location"] == "/"
    cookie = signed.headers["set-cookie"]
    assert "HttpOnly" in cookie and "SameSite=lax" in cookie
    assert keys["submit"] not in cookie and keys["submit"].removeprefix("sf_")[:20] not in cookie
    assert browser.http.get("/").status_code == 200


def test_pages_send_a_browser_to_sign_in_and_scripts_get_401(server):
    page = httpx.get(server.url + "/workers", headers=HTML)
    assert page.status_code == 303 and page.headers["location"] == "/signin?next=%2Fworkers"
    assert httpx.get(server.url + "/events/transcriptions").status_code == 401


def test_a_form_without_the_sessions_token_changes_nothing(server, keys):
    browser, other = signed_in(server, keys["submit"]), signed_in(server, keys["submit"])
    with server.client(keys["submit"]) as client:
        tid = submit(client, b"x").json()["id"]
        cancel = f"/transcriptions/{tid}/cancel"
        assert browser.http.post(cancel).status_code == 403
        assert browser.http.post(cancel, data={"csrf_token": other.csrf("/")}).status_code == 403
        assert client.get(f"/v1/transcriptions/{tid}").json()["state"] == "queued"
        done = browser.http.post(cancel, data={"csrf_token": browser.csrf("/"), "next": "/"})
        assert done.status_code == 303
        assert client.get(f"/v1/transcriptions/{tid}").json()["state"] == "canceled"


def test_a_revoked_key_loses_its_session_and_its_live_stream(server):
    key = server.create_key("submit")
    browser = signed_in(server, key)
    with browser.events("transcriptions") as stream:
        lines = stream.iter_lines()
        assert next_event(lines)[0] == "fragments"
        server.cli("keys", "revoke", key[:10])
        assert next_event(lines)[0] == "reload"  # within the key cache's 5 s
    page = browser.http.get("/")
    assert page.status_code == 303 and page.headers["location"].startswith("/signin")


def test_a_submit_key_cannot_open_the_admin_pages(server, keys):
    browser = signed_in(server, keys["submit"])
    assert browser.http.get("/workers").status_code == 403
    assert browser.http.get("/board").status_code == 403
    with browser.events("board") as stream:
        assert stream.status_code == 403


def test_the_pages_stay_out_of_the_api_schema(server):
    paths = httpx.get(server.url + "/openapi.json").json()["paths"]
    pages = {
        route.path
        for router in (dashboard.pages.router, dashboard.events.router)
        for route in router.routes
    }
    assert len(pages) >= 10 and not pages & set(paths)


def test_the_live_stream_sends_what_changed_and_nothing_else(server, keys):
    browser = signed_in(server, keys["admin"])
    with server.client(keys["submit"]) as client:
        tid = submit(client, b"x", "live.wav").json()["id"]
        browser.http.timeout = httpx.Timeout(10, read=3)
        with browser.events("transcriptions") as stream:
            lines = stream.iter_lines()
            name, data = next_event(lines)
            assert name == "fragments" and tid in json.loads(data)["rows"]
            client.post(f"/v1/transcriptions/{tid}/cancel")
            name, data = next_event(lines)
            rows = json.loads(data)["rows"]
            assert re.search(
                rf'state-canceled">\s*<td data-label="File"><a href="/transcriptions/{tid}"', rows
            )
            with pytest.raises(httpx.ReadTimeout):  # nothing changed: nothing sent
                next_event(lines)


def test_requeue_of_a_dead_job_retries_its_transcription(make_server):
    server = make_server()
    keys = {role: server.create_key(role) for role in ("submit", "worker", "admin")}
    with server.client(keys["submit"]) as client:
        tid = submit(client, b"not audio").json()["id"]
        worker = ProtocolWorker(server, keys["worker"])
        [job] = worker.claim()
        worker.fail(job, "not media", permanent=True)
        assert client.get(f"/v1/transcriptions/{tid}").json()["state"] == "failed"
        requeue = f"/board/jobs/{job['id']}/requeue"

        submitter = signed_in(server, keys["submit"])
        assert (
            submitter.http.post(requeue, data={"csrf_token": submitter.csrf("/")}).status_code
            == 403
        )
        admin = signed_in(server, keys["admin"])
        assert "not media" in admin.http.get("/board").text
        # Not media at all: its page offers no player.
        assert 'id="player"' not in admin.http.get(f"/transcriptions/{tid}").text
        done = admin.http.post(requeue, data={"csrf_token": admin.csrf("/board")})
        assert done.status_code == 303 and done.headers["location"] == "/board"
        assert client.get(f"/v1/transcriptions/{tid}").json()["state"] == "running"
        assert 'id="player"' in admin.http.get(f"/transcriptions/{tid}").text
        [row] = server.sql("SELECT state, attempts, error FROM jobs WHERE id = $1", job["id"])
        assert row == {"state": "queued", "attempts": 0, "error": None}
        again = admin.http.post(requeue, data={"csrf_token": admin.csrf("/board")})
        assert again.status_code == 409 and "is not dead" in again.text
        worker.close()


def test_a_long_source_planned_in_spans_shows_its_spans_and_a_dead_spans_planner(server, keys):
    with server.client(keys["submit"]) as client:
        tid = submit(client, b"long audio").json()["id"]
    worker = ProtocolWorker(server, keys["worker"], "span-planner")
    [first] = worker.claim()
    body = {"lease_id": first["lease_id"], "cuts": [300.0, 600.0]}
    assert worker.http.post(f"/v1/jobs/{first['id']}/split", json=body).status_code == 200
    [span] = worker.claim()
    worker.fail(span, "the span could not be read", permanent=True)
    page = signed_in(server, keys["submit"]).http.get(f"/transcriptions/{tid}").text
    assert "into 3 spans by <strong>span-planner</strong>" in page
    assert "Planning span" in page  # the dead planner, among the failed jobs
    worker.close()


def test_one_session_may_hold_only_a_few_live_streams(server, keys):
    """Each live stream runs its page's query every tick (issue 13)."""
    browser = signed_in(server, keys["submit"])
    with contextlib.ExitStack() as open_pages:
        streams = [
            open_pages.enter_context(browser.events("transcriptions"))
            for _ in range(dashboard.events.MAX_STREAMS_PER_SESSION)
        ]
        assert all(s.status_code == 200 for s in streams)
        with browser.events("transcriptions") as one_more:
            assert one_more.status_code == 429
        other = signed_in(server, keys["admin"])  # another session is not held back
        with other.events("transcriptions") as theirs:
            assert theirs.status_code == 200
        streams[0].close()  # a tab closed: its place is free once the server sees it go

        def reopened() -> bool:
            with browser.events("transcriptions") as again:
                return again.status_code == 200

        deadline = time.monotonic() + 15
        while not reopened():
            assert time.monotonic() < deadline, "a closed stream still counts"
            time.sleep(0.5)
