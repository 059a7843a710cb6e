"""ffmpeg opens no connection the URL guard has not approved (issue 13).

Two HTTP servers on loopback: the attacker's "public" host (127.0.0.1, allow-listed,
as a public address would be) and a target (127.0.0.2: loopback, refused by the guard,
standing for 169.254.169.254 or an internal service). The worker checks the URL with
the guard, then ffmpeg reads it; the attacker tries to make ffmpeg reach the target:
redirects after the probe, HLS and DASH playlists, concat scripts and subfile/concat
URLs, from a URL and from an uploaded file. The target must see 0 connections, and the
error must not carry what the target would have answered.
"""

from __future__ import annotations

import contextlib
import http.server
import io
import threading
import wave
from collections.abc import Callable, Iterator

import numpy as np
import pytest

from server import urlguard
from worker.audio import MediaError, probe_source, read_range, stream_audio

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
def http_server(host: str, answer: Callable) -> Iterator[tuple[str, list[str]]]:
    """Serves `answer(handler, request_number)`; yields its base URL and the paths asked."""
    seen: list[str] = []

    class Handler(http.server.BaseHTTPRequestHandler):
        def do_GET(self) -> None:  # noqa: N802 (http.server's naming)
            seen.append(self.path)
            answer(self, len(seen))

        def log_message(self, format: str, *args: object) -> None:  # noqa: A002
            pass

    server = http.server.ThreadingHTTPServer((host, 0), Handler)
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


def read_as_a_worker(url: str) -> str:
    """What the worker does with a URL source: the guard, then ffmpeg (plan and range)."""
    final = urlguard.final_url(url, ALLOW)
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
def test_ffmpeg_never_reaches_a_refused_host_from_a_url(target, kind):
    target_url, target_seen = target
    suffix = {"hls": "/list.m3u8", "dash": "/manifest.mpd"}.get(kind, "/media")
    with http_server("127.0.0.1", attacker(target_url, kind)) as (url, seen):
        errors = read_as_a_worker(url + suffix)
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


def test_plain_media_from_an_allowed_host_still_reads(target):
    with http_server("127.0.0.1", lambda h, n: send(h, 200, WAV)) as (url, _):
        final = urlguard.final_url(url + "/talk.wav", ALLOW)
        samples = np.concatenate(list(stream_audio(final)))
        assert abs(len(samples) - 32000) <= 1
        assert len(read_range(final, 1.0, 1.5)) == 8000
