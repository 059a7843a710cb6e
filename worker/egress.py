"""How a worker reads a user's URL: ffmpeg never connects to it itself (issue 13).

ffmpeg is given a loopback URL of this proxy instead. Every request it makes there (the
first read, each range request when seeking, each reconnect) is checked by the URL
guard and sent to the address the guard approved (shared/urlguard.py `send_pinned`),
with the host's name in the Host header and TLS. A redirect goes back to ffmpeg
unfollowed (ffmpeg follows none), so neither the host nor its DNS answering
differently between the check and the connection (rebinding) can steer a read
anywhere the guard refuses.
"""

from __future__ import annotations

import asyncio
import secrets
import threading
from collections import OrderedDict
from urllib.parse import urlsplit

import httpx

from shared import urlguard

READ_SECONDS = 30.0  # a stalled origin: ffmpeg's own read timeout is about as long
REMEMBERED = 256  # sources a worker may still be reading (a claim's jobs and then some)
MAX_HEAD_BYTES = 16 * 1024  # ffmpeg's request line and headers are a few hundred bytes
# What ffmpeg needs to know of an answer: its length, its range, its type.
FORWARDED = ("content-type", "content-length", "content-range", "accept-ranges")


class Egress:
    """A loopback HTTP proxy in a thread of its own, one per worker process."""

    def __init__(self, allowlist: urlguard.Allowlist) -> None:
        self.allowlist = allowlist
        self._sources: OrderedDict[str, str] = OrderedDict()  # token -> the user's URL
        self._loop = asyncio.new_event_loop()
        self._started = threading.Event()
        self._thread = threading.Thread(target=self._run, name="egress", daemon=True)
        self._thread.start()
        self._started.wait()

    def open(self, url: str) -> str:
        """The URL ffmpeg reads `url` from, once the guard's probe has followed and
        checked its redirects (blocking; raises UrlRefused or UrlUnreachable)."""
        final = urlguard.final_url(url, self.allowlist)
        token = secrets.token_urlsafe(16)  # other local processes cannot guess it
        self._sources[token] = final
        while len(self._sources) > REMEMBERED:
            self._sources.popitem(last=False)
        # The source's own file name after the token: ffmpeg's format probe weighs it.
        name = urlsplit(final).path.rsplit("/", 1)[-1]
        return f"{self.base_url}/{token}/{name}"

    def close(self) -> None:
        self._loop.call_soon_threadsafe(self._loop.stop)
        self._thread.join(timeout=5)

    def _run(self) -> None:
        asyncio.set_event_loop(self._loop)
        self._client = httpx.AsyncClient(
            timeout=httpx.Timeout(READ_SECONDS, connect=10.0),
            # A connection opened for one pinned host must not carry another's request.
            limits=httpx.Limits(max_keepalive_connections=0),
        )
        server = self._loop.run_until_complete(
            asyncio.start_server(self._serve, "127.0.0.1", 0, limit=MAX_HEAD_BYTES)
        )
        self.base_url = f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        self._started.set()
        self._loop.run_forever()

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            method, token, headers = await _read_request(reader)
            url = self._sources.get(token)
            if method not in ("GET", "HEAD") or url is None:
                await _answer(writer, 404, "Not Found")
                return
            await self._forward(writer, method, url, headers)
        except (ValueError, asyncio.IncompleteReadError, asyncio.LimitOverrunError):
            await _answer(writer, 400, "Bad Request")
        except ConnectionError:
            pass  # ffmpeg closed its end (a seek): nothing to answer
        finally:
            writer.close()

    async def _forward(
        self, writer: asyncio.StreamWriter, method: str, url: str, headers: dict[str, str]
    ) -> None:
        asked = [(name, headers[name]) for name in ("range", "user-agent") if name in headers]
        asked.append(("accept-encoding", "identity"))  # the bytes as they are, for ffmpeg
        try:
            response = await urlguard.send_pinned(
                self._client, method, url, self.allowlist, headers=asked
            )
        except urlguard.UrlRefused:
            await _answer(writer, 403, "Refused by the URL guard")
            return
        except (urlguard.UrlUnreachable, httpx.HTTPError):
            await _answer(writer, 502, "Source unreachable")
            return
        try:
            kept = [(n, response.headers[n]) for n in FORWARDED if n in response.headers]
            writer.write(_head(response.status_code, response.reason_phrase, kept))
            async for chunk in response.aiter_raw():
                writer.write(chunk)
                await writer.drain()
        except httpx.HTTPError:
            pass  # cut short: ffmpeg sees fewer bytes than announced, and says so
        finally:
            await response.aclose()


async def _read_request(reader: asyncio.StreamReader) -> tuple[str, str, dict[str, str]]:
    head = await reader.readuntil(b"\r\n\r\n")
    request_line, *lines = head.decode("latin-1").split("\r\n")
    method, target, _version = request_line.split(" ")
    headers = {}
    for line in filter(None, lines):
        name, _, value = line.partition(":")
        headers[name.strip().lower()] = value.strip()
    return method, target.lstrip("/").split("/")[0], headers  # the token


def _head(status: int, reason: str, headers: list[tuple[str, str]]) -> bytes:
    lines = [f"HTTP/1.1 {status} {reason or 'Unknown'}", *(f"{n}: {v}" for n, v in headers)]
    return ("\r\n".join([*lines, "Connection: close", "", ""])).encode("latin-1")


async def _answer(writer: asyncio.StreamWriter, status: int, reason: str) -> None:
    writer.write(_head(status, reason, [("content-length", "0")]))
    await writer.drain()
