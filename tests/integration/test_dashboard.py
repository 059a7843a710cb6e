"""The dashboard over plain HTTP: sign-in, sessions, CSRF, the live stream, requeue,
speakers. (tests/browser/ drives it in a real browser.)"""

from __future__ import annotations

import base64
import contextlib
import json
import re
import time
from typing import Any

import httpx
import numpy as np
import pytest

from server import dashboard
from tests.farm import ProtocolWorker, chunk_plan, submit

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


# --- speakers (issue 16) ----------------------------------------------------------------

# A 30 s conversation in three 10 s chunks: who speaks when. Ann comes back in another
# chunk; the board's merge clusters every chunk's voices together.
CONVERSATION = [
    (0.5, 6.0, "ann"),
    (6.5, 9.5, "bob"),
    (10.5, 13.0, "bob"),
    (13.5, 19.5, "ann"),
    (20.5, 24.0, "cy"),
    (24.5, 29.5, "cy"),
]
VOICE_DIRECTIONS = {"ann": 0, "bob": 1, "cy": 2}  # three voices the encoder tells apart
# What the legend says: label, voice, speech (s: its turns, a pause of 1 s inside one)
# and share of the 27 s heard.
LEGEND = [
    ("S1", "ann", "11.5 s", "43 %"),
    ("S2", "bob", "6.5 s", "24 %"),
    ("S3", "cy", "9.0 s", "33 %"),
]


def voice_windows(start: float, end: float, who: str) -> list[dict[str, Any]]:
    """A diarizing worker's voices of one turn: an embedding per window of about 1.5 s
    (float16, base64, as on the wire)."""
    vector = np.zeros(256, dtype="<f2")
    vector[VOICE_DIRECTIONS[who]] = 1.0
    embedding = base64.b64encode(vector.tobytes()).decode()
    edges = np.linspace(start, end, max(2, round((end - start) / 1.5) + 1))
    return [
        {"start": float(a), "end": float(b), "embedding": embedding}
        for a, b in zip(edges, edges[1:], strict=False)
    ]


def diarized_chunk(job: dict[str, Any]) -> dict[str, Any]:
    """A transcribe job's result with the voices heard in it."""
    start, end = job["chunk"]["start"], job["chunk"]["end"]
    turns = [turn for turn in CONVERSATION if start <= turn[0] < end]
    return {
        "kind": "transcribe",
        "segments": [{"start": a, "end": b, "text": f"{who} talks"} for a, b, who in turns],
        "voices": [v for turn in turns for v in voice_windows(*turn)],
        "language": "en",
        "audio_seconds": end - start,
        "processing_seconds": 0.01,
    }


def upload_from_the_page(browser: Browserless, **fields: str) -> httpx.Response:
    """What the upload form's script sends: the options, then the file."""
    return browser.http.post(
        "/transcriptions",
        data=fields,
        files={"file": ("talk.wav", b"a conversation")},
        headers={"X-CSRF-Token": browser.csrf("/"), "Accept": "application/json"},
    )


def plan_conversation(worker: ProtocolWorker) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """Plans the queued transcription into its three chunks: (chunk job, transcribe jobs)."""
    [chunk_job] = worker.claim()
    assert worker.complete(chunk_job, chunk_plan(3, 10.0)).status_code == 200
    jobs = worker.claim(max_jobs=3)
    assert len(jobs) == 3
    return chunk_job, sorted(jobs, key=lambda job: job["chunk"]["start"])


@pytest.fixture(scope="module")
def quiet_board(make_server):
    """A board of its own: its protocol worker must claim no other test's jobs."""
    server = make_server()
    return server, {role: server.create_key(role) for role in ("submit", "worker")}


def test_the_upload_form_asks_for_speakers_and_bad_counts_are_explained(quiet_board):
    server, keys = quiet_board
    browser = signed_in(server, keys["submit"])
    form = browser.http.get("/").text
    assert 'name="diarize" type="checkbox"' in form and "Tell speakers apart" in form
    assert 'name="num_speakers" type="number" min="1" max="32"' in form

    too_many = upload_from_the_page(browser, diarize="true", num_speakers="40")
    assert too_many.status_code == 422
    assert "num_speakers: Input should be less than or equal to 32" in too_many.json()["message"]
    not_asked = upload_from_the_page(browser, num_speakers="2")
    assert not_asked.status_code == 422 and "need diarize=true" in not_asked.json()["message"]
    by_url = browser.http.post(
        "/transcriptions/from-url",
        data={
            "csrf_token": browser.csrf("/"),
            "url": "https://example.com/a.mp3",
            "diarize": "true",
            "num_speakers": "0",
        },
    )
    assert by_url.status_code == 422 and "num_speakers: Input should be greater than" in by_url.text

    asked = upload_from_the_page(browser, diarize="true", num_speakers="3")
    assert asked.status_code == 201, asked.text
    worker = ProtocolWorker(server, keys["worker"])
    chunk_job, jobs = plan_conversation(worker)
    assert chunk_job["transcription_id"] == asked.json()["id"]
    assert chunk_job["options"]["diarize"] is True and chunk_job["options"]["num_speakers"] == 3
    for job in jobs:
        assert worker.complete(job, diarized_chunk(job)).status_code == 200
    worker.close()


def test_a_diarized_transcript_shows_its_speakers_turns_and_legend(quiet_board):
    server, keys = quiet_board
    browser = signed_in(server, keys["submit"])
    tid = upload_from_the_page(browser, diarize="true").json()["id"]
    worker = ProtocolWorker(server, keys["worker"])
    _, jobs = plan_conversation(worker)
    assert worker.complete(jobs[0], diarized_chunk(jobs[0])).status_code == 200
    running = browser.http.get(f"/transcriptions/{tid}").text
    assert "bob talks" in running  # the finished chunk's segments, no speakers yet
    assert 'class="turn' not in running and "speaker-legend" not in running
    for job in jobs[1:]:
        assert worker.complete(job, diarized_chunk(job)).status_code == 200
    worker.close()

    page = browser.http.get(f"/transcriptions/{tid}").text
    assert re.search(r"<dt>Speakers</dt><dd[^>]*>3 speakers</dd>", page)
    legend = re.search(r'<ul class="legend speakers".*?</ul>', page, re.S)[0]
    shown = re.findall(
        r'<li class="speaker-(\d)"><span class="speaker-label">(S\d)</span> '
        r'<span class="spoke">([^<]*)</span>',
        legend,
    )
    assert shown == [
        (str(i), label, f"{seconds} · {share}")
        for i, (label, _, seconds, share) in enumerate(LEGEND, start=1)
    ]
    # One turn per run of a voice, in its colour and with its label; Ann's second turn,
    # in another chunk, has her label and colour again.
    turns = re.findall(
        r'<li class="turn speaker-(\d)">\s*<span class="speaker-label">(S\d)</span>(.*?)</ol>',
        page,
        re.S,
    )
    said = [(colour, label, re.findall(r"(\w+) talks", body)) for colour, label, body in turns]
    assert said == [
        ("1", "S1", ["ann"]),
        ("2", "S2", ["bob", "bob"]),
        ("1", "S1", ["ann"]),
        ("3", "S3", ["cy", "cy"]),
    ]
    # The player still finds every line by its place in the transcript.
    assert re.findall(r'id="segment-(\d+)"', page) == [str(i) for i in range(6)]


def test_a_transcript_without_speakers_shows_none(quiet_board):
    server, keys = quiet_board
    browser = signed_in(server, keys["submit"])
    tid = upload_from_the_page(browser).json()["id"]
    worker = ProtocolWorker(server, keys["worker"])
    _, jobs = plan_conversation(worker)
    for job in jobs:
        result = {**diarized_chunk(job), "voices": None}
        assert worker.complete(job, result).status_code == 200
    worker.close()
    page = browser.http.get(f"/transcriptions/{tid}").text
    assert "ann talks" in page and "succeeded" in page
    assert "<dt>Speakers</dt>" not in page and "speaker-" not in page
