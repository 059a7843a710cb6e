"""The submission API: submit, follow, cancel, retry, and read transcripts."""

from __future__ import annotations

import base64
import binascii
from collections.abc import Awaitable, Callable
from datetime import datetime
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from server import submission, transcripts
from server.auth import Caller, allow
from server.errors import ApiError, error_responses
from server.state import server_state
from server.uploads import Upload, file_stream
from shared.protocol import (
    Progress,
    TranscriptFormat,
    Transcription,
    TranscriptionOptions,
    TranscriptionPage,
    TranscriptionState,
)

router = APIRouter(
    prefix="/v1/transcriptions",
    tags=["transcriptions"],
    responses=error_responses(401, 403, 422),
)
Submitter = Annotated[Caller, allow("submit", "admin")]


def submission_schema() -> dict[str, Any]:
    """Two ways to submit, documented by hand: the handler reads the body itself."""
    options = TranscriptionOptions.model_json_schema()
    fields = {name: form_field(schema) for name, schema in options["properties"].items()}
    upload = {"file": {"type": "string", "format": "binary"}, **fields}
    from_url = {
        "url": submission.UrlSource.model_json_schema()["properties"]["url"],
        **options["properties"],
    }

    def body(properties: dict[str, Any], required: str) -> dict[str, Any]:
        schema = {"type": "object", "required": [required], "properties": properties}
        return {"schema": {**schema, "additionalProperties": False}}

    content = {
        "multipart/form-data": body(upload, "file"),
        "application/json": body(from_url, "url"),
    }
    return {"requestBody": {"required": True, "content": content}}


def form_field(schema: dict[str, Any]) -> dict[str, Any]:
    """An option as a form field: it cannot be null (leaving it out means the default)."""
    variants = [v for v in schema.get("anyOf", ()) if v != {"type": "null"}]
    if len(variants) != 1:
        return schema
    rest = {k: v for k, v in schema.items() if k not in ("anyOf", "default")}
    return {**variants[0], **rest}


@router.post(
    "",
    status_code=201,
    response_model=Transcription,
    openapi_extra=submission_schema(),
    responses=error_responses(413, 415, 429),
    summary="Submit an audio or video file (multipart 'file' plus options) or a URL (JSON)",
)
async def submit(request: Request, caller: Submitter) -> Transcription:
    content_type = request.headers.get("content-type", "")
    if content_type.split(";")[0].strip() == "application/json":
        source = submission.parse_source(await request.body())
        row = await submission.from_url(server_state(request), caller, source)
    else:
        row = await submit_upload(request, caller)
    return transcription_view(row)


async def submit_upload(
    request: Request,
    caller: Caller,
    read_options: Callable[[Upload], Awaitable[TranscriptionOptions]] | None = None,
) -> Any:
    """The HTTP side of an upload, for every route that takes one: the multipart body's
    `file` part streams to submission.from_upload."""
    state = server_state(request)
    upload = Upload()
    file = file_stream(request, upload, "file", state.settings.max_upload_bytes)
    return await submission.from_upload(state, caller, upload, file, read_options)


@router.get("", response_model=TranscriptionPage, summary="List transcriptions, newest first")
async def list_transcriptions(
    request: Request,
    caller: Submitter,
    state: TranscriptionState | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> TranscriptionPage:
    rows = await server_state(request).board.transcriptions.list(
        caller.owner_filter, state, decode_cursor(cursor), limit + 1
    )
    page = rows[:limit]
    more = len(rows) > limit
    return TranscriptionPage(
        items=[transcription_view(r) for r in page],
        next_cursor=encode_cursor(page[-1]) if more else None,
    )


@router.get("/{transcription_id}", response_model=Transcription, responses=error_responses(404))
async def get_transcription(
    request: Request, transcription_id: UUID, caller: Submitter
) -> Transcription:
    row = await server_state(request).board.transcriptions.get(
        transcription_id, caller.owner_filter
    )
    return transcription_view(row)


@router.post(
    "/{transcription_id}/cancel",
    response_model=Transcription,
    responses=error_responses(404, 409, descriptions={409: "It has already finished."}),
)
async def cancel(request: Request, transcription_id: UUID, caller: Submitter) -> Transcription:
    board = server_state(request).board
    await board.transcriptions.cancel(transcription_id, caller.owner_filter)
    return transcription_view(await board.transcriptions.get(transcription_id, caller.owner_filter))


@router.post(
    "/{transcription_id}/retry",
    response_model=Transcription,
    responses=error_responses(
        404,
        409,
        429,
        descriptions={
            409: "Only failed or canceled transcriptions can be retried.",
            429: "A retry is a new submission: it counts against the key's limits.",
        },
    ),
)
async def retry(request: Request, transcription_id: UUID, caller: Submitter) -> Transcription:
    board = server_state(request).board
    await board.transcriptions.retry(transcription_id, caller.owner_filter)
    return transcription_view(await board.transcriptions.get(transcription_id, caller.owner_filter))


@router.delete("/{transcription_id}", status_code=204, responses=error_responses(404))
async def delete(request: Request, transcription_id: UUID, caller: Submitter) -> Response:
    """Deletes the transcription, its transcript and its stored media (canceling it
    first when it is still running)."""
    state = server_state(request)
    for key in await state.board.transcriptions.delete(transcription_id, caller.owner_filter):
        await state.storage.delete(key)
    return Response(status_code=204)


@router.get(
    "/{transcription_id}/transcript",
    summary="The transcript as txt, srt, vtt, json or verbose_json",
    responses={
        200: {"content": {t: {} for t in transcripts.MEDIA_TYPES.values()}},
        **error_responses(404, 409, descriptions={409: "It has not succeeded (yet)."}),
    },
)
async def get_transcript(
    request: Request,
    transcription_id: UUID,
    caller: Submitter,
    format: TranscriptFormat = "json",
) -> Response:
    state = server_state(request)
    board, storage = state.board, state.storage
    row = await board.transcriptions.transcript(transcription_id, caller.owner_filter)
    suffix = "json" if format == "verbose_json" else format
    disposition = {"Content-Disposition": f'inline; filename="{transcription_id}.{suffix}"'}
    if format == "json" and row["transcript_key"]:  # stored as it is served
        if not await storage.exists(row["transcript_key"]):  # else a 404 mid-stream
            raise ApiError(404, "not_found", f"transcript object of {transcription_id} is gone")
        stream = storage.read(row["transcript_key"])
        headers = {**disposition, "Content-Length": str(row["transcript_bytes"])}
        return StreamingResponse(stream, media_type="application/json", headers=headers)
    document = await board.transcriptions.document(row)
    if format == "json":
        return JSONResponse(document, headers=disposition)
    return Response(
        transcripts.render(document, format),
        media_type=transcripts.MEDIA_TYPES[format],
        headers=disposition,
    )


def transcription_view(row: Any) -> Transcription:
    done, duration = row["audio_seconds_done"], row["duration_seconds"]
    eta = None
    if row["state"] == "running" and row["started_at"] and duration and done > 0:
        elapsed = (row["db_now"] - row["started_at"]).total_seconds()
        eta = max(0.0, elapsed * (duration - done) / done)
    return Transcription(
        id=row["id"],
        state=row["state"],
        filename=row["filename"],
        options=TranscriptionOptions.model_validate(row["options"]),
        model=row["model"],
        created_at=row["created_at"],
        started_at=row["started_at"],
        finished_at=row["finished_at"],
        duration_seconds=duration,
        progress=Progress(
            jobs_done=row["jobs_done"],
            jobs_total=row["jobs_total"],
            audio_seconds_done=done,
            audio_seconds_total=duration,
            eta_seconds=eta,
        ),
        error=row["error"],
    )


def encode_cursor(row: Any) -> str:
    raw = f"{row['created_at'].isoformat()}|{row['id']}"
    return base64.urlsafe_b64encode(raw.encode()).decode()


def decode_cursor(cursor: str | None) -> tuple[datetime, UUID] | None:
    if cursor is None:
        return None
    try:
        created, last_id = base64.urlsafe_b64decode(cursor.encode()).decode().split("|")
        return datetime.fromisoformat(created), UUID(last_id)
    except (ValueError, binascii.Error, UnicodeDecodeError) as exc:
        raise ApiError(422, "bad_cursor", "the cursor is not one this API returned") from exc
