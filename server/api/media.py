"""Signed, time-limited reads of stored media, with HTTP Range support."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Query, Request
from fastapi.responses import FileResponse

router = APIRouter(tags=["media"])


@router.api_route(
    "/v1/media/{key:path}",
    methods=["GET", "HEAD"],
    openapi_extra={"x-scribefarm-roles": ["signed-url"]},
    response_class=FileResponse,
    summary="Read stored media through a signed link handed out with a job",
)
async def media(
    request: Request,
    key: str,
    expires: Annotated[int, Query(ge=0)],
    signature: Annotated[str, Query(min_length=64, max_length=64)],
) -> FileResponse:
    path = request.app.state.storage.verify(key, expires, signature)
    return FileResponse(path, media_type="application/octet-stream")
