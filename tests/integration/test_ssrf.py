"""ffmpeg opens no connection the URL guard has not approved (issue 13).

Two HTTP servers on loopback: the attacker's "public" host (127.0.0.1, allow-listed,
as a public address would be) and a target (127.0.0.2: loopback, refused by the guard,
standing for 169.254.169.254 or an internal service). The worker checks the URL with
the guard, then ffmpeg reads it; the attacker tries to make ffmpeg reach the target:
redirects after the probe, HLS and DASH playlists, concat scripts and subfile/concat
URLs, from a URL and from an uploaded file, and a DNS name that changes its answer
after the check (rebinding). The target must see 0 connections, and the error must not
carry what the target would have answered.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import ipaddress
import threading
import wave
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from shared import urlguard
from worker.audio import MediaError, probe_source, read_range, stream_audio
from worker.egress import Egress

ALLOW = urlguard.Allowlist.parse(["127.0.0.1/32"])  # the attacker's host only
SECRET = b"TARGET-SECRET-instance-credentials"


def wav_bytes(seconds: float = 2.0) -> bytes:
    t = np.arange(int(16000 * seconds)) / 16000
    samples = (np.sin(2 * np.pi * 440 * t) * 8000).astype("<i2")
    out = io.BytesIO()
    with wave.open(out, "wb") as w:
        w.setnchannels(1), w.setsampwidth(2), w.setframerate(16000)
        w.writeframes(samples.tobytes())
    return out.getvalue()


WAV = wav_bytes()


@contextlib.contextmanager
def http_server(host: str, answer: Callable, port: int = 0) -> Iterator[tuple[str, list[str]]]:
    """Serves `answer(handler, request_number)`; yields its base URL and the paths asked."""
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            seen.append(self.path)
            answer(self, len(seen))

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    server = http.server.ThreadingHTTPServer((host, port), Handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://{host}:{server.server_address[1]}", seen
    finally:
        server.shutdown()
        server.server_close()


def send(handler, status: int, body: bytes = b"", **headers: str) -> None:
    handler.send_response(status)
    for name, value in {"Content-Length": str(len(body)), **headers}.items():
        handler.send_header(name.replace("_", "-"), value)
    handler.end_headers()
    handler.wfile.write(body)


@pytest.fixture
def target():
    """The host nobody may reach: it answers with a secret, and counts connections."""
    with http_server("127.0.0.2", lambda h, n: send(h, 200, SECRET + WAV)) as (url, seen):
        yield url, seen


@pytest.fixture(scope="module")
def egress():
    proxy = Egress(ALLOW)
    yield proxy
    proxy.close()


def read_as_a_worker(url: str, egress: Egress) -> str:
    """What the worker does with a URL source: the guard's probe, then ffmpeg through
    the egress proxy (plan and range); returns the errors."""
    final = egress.open(url)
    errors = []
    for read in (
        lambda: list(stream_audio(final)),
        lambda: probe_source(final),
        lambda: read_range(final, 1.5, 1.9),
    ):
        try:
            read()
        except MediaError as exc:
            errors.append(exc.reason)
    return " ".join(errors)


def attacker(target_url: str, kind: str) -> Callable:
    playlists = {
        "hls": (
            "application/vnd.apple.mpegurl",
            f"#EXTM3U\n#EXT-X-TARGETDURATION:2\n#EXTINF:2.0,\n{target_url}/seg.wav\n"
            "#EXT-X-ENDLIST\n",
        ),
        "dash": (
            "application/dash+xml",
            '<?xml version="1.0"?><MPD xmlns="urn:mpeg:dash:schema:mpd:2011" '
            'type="static" mediaPresentationDuration="PT2S" minBufferTime="PT1S" '
            'profiles="urn:mpeg:dash:profile:isoff-on-demand:2011"><Period><AdaptationSet '
            'mimeType="audio/mp4"><Representation id="a" bandwidth="64000">'
            f"<BaseURL>{target_url}/seg.mp4</BaseURL></Representation></AdaptationSet>"
            "</Period></MPD>",
        ),
        "concat": ("text/plain", f"ffconcat version 1.0\nfile '{target_url}/seg.wav'\n"),
        "subfile": (
            "text/plain",
            f"ffconcat version 1.0\nfile 'subfile,,start,0,end,0,,:{target_url}/seg.wav'\n",
        ),
        "concat-protocol": (
            "text/plain",
            f"ffconcat version 1.0\nfile 'concat:{target_url}/a.wav|{target_url}/b.wav'\n",
        ),
    }

    def answer(handler, n: int) -> None:
        if kind == "redirect-after-probe":
            if n == 1:  # the guard's probe gets media; everything after it, a redirect
                send(handler, 200, WAV[:1], Content_Type="audio/wav")
            else:
                send(handler, 302, Location=f"{target_url}/seg.wav")
            return
        content_type, text = playlists[kind]
        send(handler, 200, text.encode(), Content_Type=content_type)

    return answer


ATTACKS = ["redirect-after-probe", "hls", "dash", "concat", "subfile", "concat-protocol"]


@pytest.mark.parametrize("kind", ATTACKS)
def test_ffmpeg_never_reaches_a_refused_host_from_a_url(target, egress, kind):
    target_url, target_seen = target
    suffix = {"hls": "/list.m3u8", "dash": "/manifest.mpd"}.get(kind, "/media")
    with http_server("127.0.0.1", attacker(target_url, kind)) as (url, seen):
        errors = read_as_a_worker(url + suffix, egress)
    assert target_seen == [], f"{kind}: the target was reached: {target_seen}"
    assert seen, "the attacker's host was not even asked"
    assert errors, f"{kind}: reading succeeded"
    assert SECRET.decode() not in errors


@pytest.mark.parametrize("kind", ["hls", "concat"])
def test_an_uploaded_playlist_cannot_reach_a_refused_host_either(target, kind, tmp_path):
    """Uploads are read from the farm's own storage (a file, or a signed URL): a
    playlist inside one must not open anything either."""
    target_url, target_seen = target
    path = tmp_path / "upload.bin"
    answer = attacker(target_url, kind)

    class Capture:
        def send_response(self, status):
            pass

        def send_header(self, name, value):
            pass

        def end_headers(self):
            pass

        wfile = io.BytesIO()

    captured = Capture()
    answer(captured, 1)
    path.write_bytes(captured.wfile.getvalue())
    with pytest.raises(MediaError):
        list(stream_audio(str(path)))
    with http_server("127.0.0.1", lambda h, n: send(h, 200, path.read_bytes())) as (url, _):
        with pytest.raises(MediaError) as error:  # as workers read it, over the farm's URL
            list(stream_audio(url + "/v1/media/sources/x"))
    assert target_seen == []
    assert SECRET.decode() not in error.value.reason


def ranged(body: bytes) -> Callable:
    """An origin that serves `body` and honours Range requests, as file hosts do."""

    def answer(handler, n: int) -> None:
        asked = handler.headers.get("Range", "")
        if not asked.startswith("bytes="):
            send(handler, 200, body, Accept_Ranges="bytes")
            return
        first, _, last = asked.removeprefix("bytes=").partition("-")
        end = min(int(last), len(body) - 1) if last else len(body) - 1
        part = body[int(first) : end + 1]
        send(handler, 206, part, Content_Range=f"bytes {first}-{end}/{len(body)}")

    return answer


def test_plain_media_from_an_allowed_host_still_reads(egress):
    with http_server("127.0.0.1", ranged(WAV)) as (url, seen):
        source = egress.open(url + "/talk.wav")
        samples = np.concatenate(list(stream_audio(source)))
        assert abs(len(samples) - 32000) <= 1
        assert len(read_range(source, 1.0, 1.5)) == 8000
    assert len(seen) >= 3  # the probe, then ffmpeg's reads, each through the proxy


def attacker_dns(monkeypatch, answers: Callable[[int], str]) -> list[str]:
    """The attacker's DNS: `media.attacker.test` resolves to `answers(n)` on its n-th
    lookup. Only the guard's resolver knows the name, so reading it at all shows that
    every connection went to an address the guard resolved and checked."""
    lookups: list[str] = []
    real = urlguard.resolve

    def resolve(host: str, port: int) -> list[urlguard.IpAddress]:
        if host != "media.attacker.test":
            return real(host, port)
        lookups.append(answers(len(lookups) + 1))
        return [ipaddress.ip_address(lookups[-1])]

    monkeypatch.setattr(urlguard, "resolve", resolve)
    return lookups


def test_every_connection_goes_to_the_address_the_guard_checked(egress, monkeypatch):
    with http_server("127.0.0.1", ranged(WAV)) as (url, seen):
        lookups = attacker_dns(monkeypatch, lambda n: "127.0.0.1")
        port = url.rsplit(":", 1)[1]
        source = egress.open(f"http://media.attacker.test:{port}/talk.wav")
        assert len(read_range(source, 1.0, 1.5)) == 8000
    assert len(lookups) == len(seen) >= 2  # one check per connection, each one pinned


def test_a_name_rebinding_to_a_refused_address_reaches_nothing(egress, monkeypatch):
    """The name answers the guard's probe with the attacker's public address, then
    with the target's: the target (same port, on 127.0.0.2) must see no connection."""
    with http_server("127.0.0.1", ranged(WAV)) as (url, seen):
        port = int(url.rsplit(":", 1)[1])
        target = http_server("127.0.0.2", lambda h, n: send(h, 200, SECRET + WAV), port)
        with target as (_, target_seen):
            attacker_dns(monkeypatch, lambda n: "127.0.0.1" if n == 1 else "127.0.0.2")
            errors = read_as_a_worker(f"http://media.attacker.test:{port}/talk.wav", egress)
    assert seen == ["/talk.wav"]  # the probe, and nothing after it
    assert target_seen == []
    assert "Refused by the URL guard" in errors
    assert SECRET.decode() not in errors
