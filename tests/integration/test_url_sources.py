"""URL sources: workers read the media straight from the user's URL, and nobody can
point the farm at its own network (loopback, private, link-local, metadata), not
through DNS and not through a redirect."""

from __future__ import annotations

import contextlib
import http.server
import threading
from collections.abc import Iterator
from urllib.parse import parse_qs, urlsplit
from uuid import UUID

import pytest

from tests.farm import WorkerProcess, wait_until_finished
from tests.speech import PARAGRAPHS, normalise_text, serve_directory

pytestmark = pytest.mark.timeout(300)


class Redirector(http.server.BaseHTTPRequestHandler):
    """GET /?to=URL answers 302 to URL; every request's Range header is recorded."""

    ranges: list[str | None] = []

    def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
        Redirector.ranges.append(self.headers.get("Range"))
        self.send_response(302)
        self.send_header("Location", parse_qs(urlsplit(self.path).query)["to"][0])
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


@contextlib.contextmanager
def redirector() -> Iterator[str]:
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), Redirector)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def submit_url(client, url: str, **options):
    return client.post("/v1/transcriptions", json={"url": url, **options})


@pytest.mark.parametrize(
    "url, kind",
    [
        ("http://127.0.0.1:9/audio.mp3", "loopback"),
        ("http://10.1.2.3/audio.mp3", "private"),
        ("http://169.254.169.254/latest/meta-data/", "link-local"),
        ("http://localhost:9/audio.mp3", "loopback"),  # a name resolving to loopback
        ("http://[::1]:9/audio.mp3", "loopback"),
    ],
)
def test_private_addresses_are_refused(server, keys, url, kind):
    with server.client(keys["submit"]) as client:
        response = submit_url(client, url)
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["code"] == "url_refused"
    assert kind in body["message"] and "SCRIBEFARM_URL_ALLOWLIST" in body["message"]


def test_other_schemes_and_bad_urls_are_refused(server, keys):
    with server.client(keys["submit"]) as client:
        assert submit_url(client, "file:///etc/passwd").status_code == 422
        assert submit_url(client, "not a url").json()["code"] == "invalid_request"
        response = client.post("/v1/transcriptions", json={"url": "http://x.test/a", "bogus": 1})
        assert response.status_code == 422 and "bogus" in response.json()["message"]


def test_a_webhook_to_a_private_address_is_refused_at_submission(server, keys):
    with server.client(keys["submit"]) as client:
        response = client.post(
            "/v1/transcriptions",
            files={"file": ("a.wav", b"audio")},
            data={"webhook_url": "http://169.254.169.254/hook"},
        )
    message = response.json()["message"]
    assert response.status_code == 422 and "webhook_url" in message and "link-local" in message


def test_a_redirect_to_a_private_address_is_refused(make_server, media):
    # The redirector's name is allowed; where it redirects to is not.
    server = make_server(url_allowlist="localhost")
    key = server.create_key("submit")
    speech = media.paragraphs((0,))
    with serve_directory(speech.parent) as files, redirector() as hops, server.client(key) as c:
        allowed = hops.replace("127.0.0.1", "localhost")
        assert submit_url(c, f"{files}/{speech.name}").json()["code"] == "url_refused"
        response = submit_url(c, f"{allowed}/?to={files}/{speech.name}")
        assert response.status_code == 422, response.text
        assert "127.0.0.1 is a loopback address" in response.json()["message"]


@pytest.fixture(scope="module")
def allowed_farm(make_server):
    server = make_server(url_allowlist="127.0.0.1", retry_base_seconds=0.2)
    keys = {role: server.create_key(role) for role in ("submit", "worker")}
    return server, keys


def test_workers_read_an_allowed_url_through_its_redirects(allowed_farm, media, tmp_path):
    server, keys = allowed_farm
    speech = media.paragraphs((0, 1), gap_seconds=1.0)
    (speech.parent / "notes.txt").write_text("this page is text, not media\n" * 100)
    worker = WorkerProcess(server, keys["worker"], "url-reader", ("--threads", "2")).start()
    Redirector.ranges.clear()
    try:
        with serve_directory(speech.parent) as files, redirector() as hops:
            with server.client(keys["submit"]) as client:
                response = submit_url(client, f"{hops}/?to={files}/{speech.name}")
                assert response.status_code == 201, response.text
                not_media = submit_url(client, f"{files}/notes.txt").json()["id"]
                view = wait_until_finished(client, response.json()["id"], timeout=180)
                assert view["state"] == "succeeded", view
                text = client.get(f"/v1/transcriptions/{view['id']}/transcript?format=txt").text
                failed = wait_until_finished(client, not_media, timeout=60)
    finally:
        worker.stop()
    # A URL that is not media fails its own transcription, with a reason.
    assert failed["state"] == "failed" and "no audio track" in failed["error"], failed
    assert view["filename"] is None  # the URL's path names no file
    words = normalise_text(text).split()
    reference = normalise_text(" ".join(PARAGRAPHS[i] for i in (0, 1))).split()
    assert len(set(words) & set(reference)) > 0.8 * len(set(reference))
    # The server and the worker only ask where the URL leads (one byte each time);
    # ffmpeg reads the media from the final URL itself.
    assert Redirector.ranges and set(Redirector.ranges) == {"bytes=0-0"}


def test_a_worker_checks_the_url_itself(allowed_farm, media):
    """The board allowed the URL, but this worker's allow-list does not: the worker
    refuses to read it, and the transcription fails with that reason, at once."""
    server, keys = allowed_farm
    speech = media.paragraphs((0,))
    worker = WorkerProcess(
        server, keys["worker"], "strict", ("--threads", "1", "--url-allowlist", "")
    ).start()
    try:
        with serve_directory(speech.parent) as files, server.client(keys["submit"]) as client:
            tid = submit_url(client, f"{files}/{speech.name}").json()["id"]
            view = wait_until_finished(client, tid, timeout=120)
    finally:
        worker.stop()
    assert view["state"] == "failed"
    assert "refused" in view["error"] and "SCRIBEFARM_URL_ALLOWLIST" in view["error"]
    [job] = server.sql("SELECT attempts FROM jobs WHERE transcription_id = $1", UUID(view["id"]))
    assert job["attempts"] == 1  # permanent: not retried


def test_an_unreachable_url_is_a_clear_error(allowed_farm):
    server, keys = allowed_farm
    with server.client(keys["submit"]) as client:
        response = submit_url(client, "http://127.0.0.1:9/nothing-listens-here.mp3")
    assert response.status_code == 422 and response.json()["code"] == "url_unreachable"
