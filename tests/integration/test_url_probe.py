"""The guard's probe of a URL (issue 13): an overall deadline and no body read, so a
slow or endless answer cannot hold the server; and probes count against the key's
limits, failed ones included."""

from __future__ import annotations

import socket
import threading
import time
from collections.abc import Iterator

import pytest

from shared import urlguard
from tests.integration.test_ssrf import http_server, send

ALLOW = urlguard.Allowlist.parse(["127.0.0.1/32"])


def endless(handler, n: int) -> None:
    handler.send_response(200)
    handler.send_header("Content-Type", "audio/wav")
    handler.end_headers()
    block = b"\0" * 65536
    try:
        while True:  # a body that never ends
            handler.wfile.write(block)
    except OSError:
        pass


@pytest.fixture
def dripping() -> Iterator[str]:
    """A host that sends its status line one byte a second, for ever."""
    listener = socket.create_server(("127.0.0.1", 0))
    stop = threading.Event()

    def serve() -> None:
        while not stop.is_set():
            try:
                conn, _ = listener.accept()
            except OSError:
                return
            with conn:
                for byte in b"HTTP/1.1 200 OK\r\nX-Slow: " + b"a" * 1000:
                    if stop.is_set():
                        return
                    try:
                        conn.sendall(bytes([byte]))
                    except OSError:
                        break
                    time.sleep(1)

    threading.Thread(target=serve, daemon=True).start()
    yield f"http://127.0.0.1:{listener.getsockname()[1]}/slow.wav"
    stop.set()
    listener.close()


def test_an_endless_body_is_not_read(monkeypatch):
    monkeypatch.setattr(urlguard, "PROBE_SECONDS", 5.0)
    with http_server("127.0.0.1", endless) as (url, _):
        started = time.monotonic()
        assert urlguard.final_url(url + "/live.wav", ALLOW) == url + "/live.wav"
        assert time.monotonic() - started < 2


def test_a_slow_drip_ends_at_the_overall_deadline(monkeypatch, dripping):
    monkeypatch.setattr(urlguard, "PROBE_SECONDS", 3.0)  # each byte is within a read timeout
    started = time.monotonic()
    with pytest.raises(urlguard.UrlUnreachable, match="did not answer within 3 s"):
        urlguard.final_url(dripping, ALLOW)
    assert time.monotonic() - started < 5


def test_failed_probes_count_against_the_keys_limit(make_server):
    server = make_server(url_allowlist="127.0.0.1", submissions_per_minute=3)
    key = server.create_key("submit")
    with http_server("127.0.0.1", lambda h, n: send(h, 404)) as (url, seen):
        with server.client(key) as client:
            answers = [
                client.post("/v1/transcriptions", json={"url": f"{url}/{i}.wav"}) for i in range(5)
            ]
    codes = [(r.status_code, r.json()["code"]) for r in answers]
    assert codes[:3] == [(422, "url_unreachable")] * 3
    assert codes[3:] == [(429, "too_many_probes")] * 2
    assert "SCRIBEFARM_SUBMISSIONS_PER_MINUTE" in answers[3].json()["message"]
    assert int(answers[3].headers["retry-after"]) > 0
    assert len(seen) == 3  # the refused ones were not fetched
