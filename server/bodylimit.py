"""A cap on every request body, enforced before the app reads it (pure ASGI middleware).

FastAPI reads and parses a JSON body before its dependencies run, auth included: without
this, anyone could make the server hold a body of any size (issue 13 measured 1.18 GB of
RSS for a 400 MB body to /v1/jobs/claim, sent with no key). Here a declared
Content-Length over the limit is answered 413 before a byte is read, and a streamed
(chunked) body is counted as it arrives and cut off when it crosses the limit.

Each route class has its own limit, each a setting named in the 413:
uploads `SCRIBEFARM_MAX_UPLOAD_BYTES` (plus the multipart overhead), chunk results (one,
or a batch's together) `SCRIBEFARM_MAX_RESULT_BYTES`, everything else
`SCRIBEFARM_MAX_REQUEST_BYTES`.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from server.settings import Settings
from server.uploads import MULTIPART_OVERHEAD

# The routes whose body is an upload (multipart): POST only.
UPLOAD_PATHS = re.compile(r"^/(v1/transcriptions|v1/audio/transcriptions|transcriptions)/?$")
RESULT_PATHS = re.compile(r"^/v1/jobs/([^/]+/complete|batch)/?$")
OPENAI_PATHS = re.compile(r"^/v1/audio/")


@dataclass(frozen=True)
class Limit:
    bytes: int
    code: str
    what: str
    setting: str

    def message(self) -> str:
        return f"{self.what} is over the limit of {self.bytes} bytes ({self.setting})"


class BodyTooLarge(Exception):
    """Raised from receive() once a streamed body crosses its limit."""


def limit_for(scope: Scope, settings: Settings) -> Limit:
    path, headers = scope["path"], dict(scope["headers"])
    content_type = headers.get(b"content-type", b"").split(b";")[0].strip().lower()
    if UPLOAD_PATHS.match(path) and content_type == b"multipart/form-data":
        return Limit(
            settings.max_upload_bytes + MULTIPART_OVERHEAD,
            "upload_too_large",
            "the upload",
            "SCRIBEFARM_MAX_UPLOAD_BYTES",
        )
    if RESULT_PATHS.match(path):
        return Limit(
            settings.max_result_bytes,
            "result_too_large",
            "the job result (a batch's together)",
            "SCRIBEFARM_MAX_RESULT_BYTES",
        )
    return Limit(
        settings.max_request_bytes,
        "body_too_large",
        "the request body",
        "SCRIBEFARM_MAX_REQUEST_BYTES",
    )


def declared_length(scope: Scope) -> int | None:
    for name, value in scope["headers"]:
        if name == b"content-length":
            return int(value) if value.isdigit() else None
    return None


class BodyLimit:
    """Outermost app layer: no route, dependency or auth check sees an oversized body."""

    def __init__(self, app: ASGIApp, settings: Settings) -> None:
        self.app = app
        self.settings = settings

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = limit_for(scope, self.settings)
        declared = declared_length(scope)
        if declared is not None and declared > limit.bytes:
            await self.refuse(scope, send, limit)  # unread: the connection closes after it
            return
        received = 0
        exceeded = False
        started = False

        async def counted_receive() -> Message:
            nonlocal received, exceeded
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit.bytes:
                    exceeded = True
                    raise BodyTooLarge(limit.message())
            return message

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if exceeded:
                return  # whatever the app made of the cut-off body, the answer is 413
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counted_receive, guarded_send)
        except Exception:
            if not exceeded:
                raise
        if exceeded and not started:
            await self.refuse(scope, send, limit)

    async def refuse(self, scope: Scope, send: Send, limit: Limit) -> None:
        body: dict = {"code": limit.code, "message": limit.message()}
        extra: list[tuple[bytes, bytes]] = []
        if OPENAI_PATHS.match(scope["path"]):  # that router answers in OpenAI's shape
            error = {**body, "type": "invalid_request_error", "param": None}
            body = {"error": error, **body}
            extra.append((b"x-should-retry", b"false"))
        payload = json.dumps(body).encode()
        headers = [
            (b"content-type", b"application/json"),
            (b"content-length", str(len(payload)).encode()),
            (b"connection", b"close"),  # the rest of the body is not worth reading
            *extra,
        ]
        await send({"type": "http.response.start", "status": 413, "headers": headers})
        await send({"type": "http.response.body", "body": payload})
