"""Signed, time-limited reads of stored media, with HTTP Range support."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse

from server.errors import error_responses
from server.state import server_state

router = APIRouter(tags=["media"])

BINARY = {"application/octet-stream": {"schema": {"type": "string", "format": "binary"}}}
TEXT = {"text/plain": {"schema": {"type": "string"}}}
# Starlette's FileResponse answers Range requests; its own refusals are plain text.
RANGE_HEADER = {
    "name": "Range",
    "in": "header",
    "required": False,
    "description": "Read only part of the file (`bytes=0-1023`): answered with 206.",
    "schema": {"type": "string"},
}
RESPONSES: dict[int | str, dict[str, Any]] = {
    200: {"description": "The whole file.", "content": BINARY},
    206: {
        "description": "The ranges asked for in `Range`.",
        "content": {**BINARY, "multipart/byteranges": {"schema": {"type": "string"}}},
    },
    400: {"description": "The `Range` header is malformed.", "content": TEXT},
    416: {"description": "The `Range` asked for lies outside the file.", "content": TEXT},
    **error_responses(
        403,
        404,
        422,
        descriptions={403: "The link's signature does not match, or the link has expired."},
    ),
}


ROUTE: dict[str, Any] = {
    "openapi_extra": {"x-scribefarm-roles": ["signed-url"], "parameters": [RANGE_HEADER]},
    "response_class": FileResponse,
    "responses": RESPONSES,
    "summary": "Read stored media through a signed link handed out with a job",
}


# One route per method, so each operation has its own id in the schema.
@router.get("/v1/media/{key:path}", **ROUTE)
@router.head("/v1/media/{key:path}", **ROUTE)
async def media(
    request: Request,
    key: str,
    expires: Annotated[int, Query(ge=0)],
    signature: Annotated[str, Query(pattern="^[0-9a-f]{64}$")],  # an HMAC-SHA256, in hex
) -> FileResponse:
    path = server_state(request).storage.verify(key, expires, signature)
    return FileResponse(path, media_type="application/octet-stream")
