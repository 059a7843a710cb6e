"""Network faults for the chaos suite, on loopback.

- `FaultyHttpProxy` sits in front of the S3 server (moto): while told to, it answers a
  share of requests with S3's own 500 InternalError / 503 SlowDown instead of
  forwarding them. The board's server and the workers' presigned GETs both go through
  it (the proxy's address is the bucket endpoint the server is configured with).
- `TcpProxy` sits between one worker and the board's server: `cut()` resets every
  connection and holds new ones without forwarding a byte (a black hole, as when a
  network drops packets) until `restore()` resets those too.

All proxies run on one asyncio loop in a daemon thread (`ProxyLoop`); their controls
are plain methods the test thread calls.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import socket
import struct
import threading
from collections import deque
from collections.abc import Coroutine, Iterator
from typing import Any, TypeVar

T = TypeVar("T")
HEAD_LIMIT = 64 * 1024

S3_ERRORS = {
    500: ("Internal Server Error", "InternalError", "We encountered an internal error."),
    503: ("Slow Down", "SlowDown", "Please reduce your request rate."),
}


class ProxyLoop:
    """An asyncio loop in a daemon thread, hosting the proxies."""

    def __init__(self) -> None:
        self.loop = asyncio.new_event_loop()
        self.thread = threading.Thread(target=self.loop.run_forever, daemon=True, name="proxies")
        self.thread.start()

    def run(self, coro: Coroutine[Any, Any, T], timeout: float = 30) -> T:
        return asyncio.run_coroutine_threadsafe(coro, self.loop).result(timeout)

    def call(self, fn: Any, *args: Any) -> None:
        self.loop.call_soon_threadsafe(fn, *args)

    def stop(self) -> None:
        async def cancel_all() -> None:
            tasks = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

        with contextlib.suppress(Exception):
            self.run(cancel_all(), timeout=10)
        self.loop.call_soon_threadsafe(self.loop.stop)
        self.thread.join(10)


class Handlers:
    """Strong references to running connection handlers: asyncio keeps only weak
    ones, and a handler waiting on an idle connection could be collected mid-wait."""

    def __init__(self) -> None:
        self.running: set[asyncio.Task] = set()

    @contextlib.contextmanager
    def track(self) -> Iterator[None]:
        task = asyncio.current_task()
        assert task is not None
        self.running.add(task)
        try:
            yield
        finally:
            self.running.discard(task)


def reset(writer: asyncio.StreamWriter) -> None:
    """Close with a TCP reset (SO_LINGER 0): the peer sees the connection die."""
    sock = writer.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    writer.transport.abort()


class TcpProxy:
    """Forwards 127.0.0.1:port to 127.0.0.1:upstream_port byte for byte, until cut."""

    def __init__(self, loop: ProxyLoop, upstream_port: int) -> None:
        self.loop = loop
        self.upstream_port = upstream_port
        self.is_cut = False
        self.links: set[asyncio.StreamWriter] = set()  # both ends of every live link
        self.held: set[asyncio.StreamWriter] = set()  # accepted while cut, never forwarded
        self.handlers = Handlers()
        self.port = loop.run(self._start())

    async def _start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0)
        return self.server.sockets[0].getsockname()[1]

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self.handlers.track():
            await self._forward(reader, writer)

    async def _forward(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        if self.is_cut:
            self.held.add(writer)  # nothing read, nothing answered, until restore()
            return
        try:
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
        except OSError:  # the server is down: the worker sees its connection reset
            reset(writer)
            return
        if self.is_cut:  # cut while connecting
            reset(up_writer)
            self.held.add(writer)
            return
        pair = {writer, up_writer}
        self.links |= pair
        try:
            await asyncio.gather(pipe(reader, up_writer), pipe(up_reader, writer))
        finally:
            self.links -= pair
            for w in pair:
                w.close()

    def cut(self) -> None:
        self.loop.run(self._cut())

    async def _cut(self) -> None:
        self.is_cut = True
        for writer in list(self.links):
            reset(writer)

    def restore(self) -> None:
        self.loop.run(self._restore())

    async def _restore(self) -> None:
        self.is_cut = False
        for writer in list(self.held):
            reset(writer)
        self.held.clear()

    def close(self) -> None:
        async def close() -> None:
            self.server.close()
            for writer in list(self.links | self.held):
                reset(writer)

        self.loop.run(close())


async def pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    """Copies until end of stream, then half-closes the other side."""
    try:
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
        if writer.can_write_eof():
            writer.write_eof()
    except (ConnectionError, OSError):
        pass


class FaultyHttpProxy:
    """An HTTP/1.1 reverse proxy for an S3 server that fails `error_rate` of requests.

    One request per client connection: the request goes upstream with
    `Connection: close` and the answer comes back the same way, so bodies of any
    framing end where the upstream closes, and the client simply reconnects.
    """

    def __init__(self, loop: ProxyLoop, upstream_port: int, seed: int) -> None:
        self.loop = loop
        self.upstream_port = upstream_port
        self.random = random.Random(seed)
        self.error_rate = 0.0
        # Decisions for the next requests (True: fail it), before error_rate applies.
        self.script: deque[bool] = deque()
        self.requests = 0
        self.failed = 0
        self.handlers = Handlers()
        self.port = loop.run(self._start())

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    async def _start(self) -> int:
        self.server = await asyncio.start_server(self._serve, "127.0.0.1", 0, limit=HEAD_LIMIT * 2)
        return self.server.sockets[0].getsockname()[1]

    def set_error_rate(self, rate: float) -> None:
        self.loop.call(setattr, self, "error_rate", rate)

    def fail_next(self, *decisions: bool) -> None:
        """Scripted faults: the next requests fail or pass in this order (replacing
        what is left of an earlier script)."""

        async def replace() -> None:
            self.script = deque(decisions)

        self.loop.run(replace())

    def _should_fail(self) -> bool:
        if self.script:
            return self.script.popleft()
        return self.random.random() < self.error_rate

    async def _serve(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        with self.handlers.track():
            await self._proxy(reader, writer)

    async def _proxy(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        try:
            head = await reader.readuntil(b"\r\n\r\n")
            method, headers = parse_head(head)
            self.requests += 1
            expects = headers.get("expect", "").lower() == "100-continue"
            if self._should_fail():
                self.failed += 1
                if not expects:  # the client is sending its body: take it first
                    await copy_body(reader, headers, None)
                writer.write(error_response(self.random.choice(list(S3_ERRORS)), method))
                await writer.drain()
                return
            up_reader, up_writer = await asyncio.open_connection("127.0.0.1", self.upstream_port)
            try:
                if expects:
                    writer.write(b"HTTP/1.1 100 Continue\r\n\r\n")
                up_writer.write(rewrite_head(head, drop=("connection", "keep-alive", "expect")))
                await copy_body(reader, headers, up_writer)
                await up_writer.drain()
                answer = await up_reader.readuntil(b"\r\n\r\n")
                while answer.startswith(b"HTTP/1.1 100"):  # an interim answer: skip it
                    answer = await up_reader.readuntil(b"\r\n\r\n")
                writer.write(rewrite_head(answer, drop=("connection", "keep-alive")))
                await pipe(up_reader, writer)
            finally:
                up_writer.close()
        except (asyncio.IncompleteReadError, asyncio.LimitOverrunError, ConnectionError, OSError):
            pass
        finally:
            writer.close()

    def close(self) -> None:
        async def close() -> None:
            self.server.close()

        self.loop.run(close())


def parse_head(head: bytes) -> tuple[str, dict[str, str]]:
    lines = head.decode("latin-1").split("\r\n")
    method = lines[0].split(" ", 1)[0]
    headers = {}
    for line in lines[1:]:
        if ":" in line:
            name, value = line.split(":", 1)
            headers[name.strip().lower()] = value.strip()
    return method, headers


def rewrite_head(head: bytes, drop: tuple[str, ...]) -> bytes:
    """The same head without the `drop` headers and with `Connection: close`."""
    lines = head.decode("latin-1").split("\r\n")
    kept = [lines[0]] + [
        line for line in lines[1:] if line and line.split(":", 1)[0].strip().lower() not in drop
    ]
    return ("\r\n".join([*kept, "Connection: close"]) + "\r\n\r\n").encode("latin-1")


async def copy_body(
    reader: asyncio.StreamReader, headers: dict[str, str], writer: asyncio.StreamWriter | None
) -> None:
    """Reads the request body (Content-Length or chunked), writing it on if `writer`."""

    def out(data: bytes) -> None:
        if writer is not None:
            writer.write(data)

    if "chunked" in headers.get("transfer-encoding", "").lower():
        while True:
            line = await reader.readuntil(b"\r\n")
            out(line)
            size = int(line.split(b";")[0].strip() or b"0", 16)
            if size == 0:
                while (trailer := await reader.readuntil(b"\r\n")) != b"\r\n":
                    out(trailer)
                out(b"\r\n")
                return
            out(await reader.readexactly(size + 2))
            if writer is not None:
                await writer.drain()
    left = int(headers.get("content-length", "0") or 0)
    while left > 0:
        data = await reader.read(min(left, 65536))
        if not data:
            raise asyncio.IncompleteReadError(b"", left)
        left -= len(data)
        out(data)
        if writer is not None:
            await writer.drain()


def error_response(status: int, method: str) -> bytes:
    reason, code, message = S3_ERRORS[status]
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>{message}</Message>"
        "<RequestId>chaos</RequestId></Error>"
    ).encode()
    head = (
        f"HTTP/1.1 {status} {reason}\r\nContent-Type: application/xml\r\n"
        f"Content-Length: {len(body)}\r\nConnection: close\r\n\r\n"
    ).encode()
    return head if method == "HEAD" else head + body
