"""The submission API: submit, follow, cancel, retry, and read transcripts."""

from __future__ import annotations

import base64
import binascii
from datetime import datetime
from typing import Annotated, Any
from uuid import UUID, uuid4

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response
from pydantic import ValidationError

from server import transcripts
from server.auth import Caller, allow
from server.errors import ApiError, describe_validation
from server.protocol import (
    Progress,
    TranscriptFormat,
    Transcription,
    TranscriptionOptions,
    TranscriptionPage,
    TranscriptionState,
)
from server.uploads import Upload, file_stream

router = APIRouter(prefix="/v1/transcriptions", tags=["transcriptions"])
Submitter = Annotated[Caller, allow("submit", "admin")]


def upload_schema() -> dict[str, Any]:
    """The multipart body, documented by hand: the handler streams it itself."""
    options = TranscriptionOptions.model_json_schema()
    properties = {"file": {"type": "string", "format": "binary"}, **options["properties"]}
    return {
        "requestBody": {
            "required": True,
            "content": {
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "required": ["file"],
                        "properties": properties,
                        "additionalProperties": False,
                    }
                }
            },
        }
    }


@router.post(
    "",
    status_code=201,
    response_model=Transcription,
    openapi_extra=upload_schema(),
    summary="Submit an audio or video file (multipart field 'file' plus options)",
)
async def submit(request: Request, caller: Submitter) -> Transcription:
    state = request.app.state
    transcription_id = uuid4()
    key = f"sources/{transcription_id}"
    upload = Upload()
    limit = state.settings.max_upload_bytes
    size = await state.storage.write(key, file_stream(request, upload, "file", limit))
    try:
        options = validate_upload(upload, size, state.settings.max_chunk_seconds)
        await state.board.submit(
            owner=caller.key_id,
            transcription_id=transcription_id,
            filename=upload.filename,
            source_key=key,
            source_bytes=size,
            options=options.model_dump(mode="json"),
            model=options.model or state.settings.default_model,
        )
    except BaseException:
        await state.storage.delete(key)
        raise
    return transcription_view(await state.board.get(transcription_id, None))


def validate_upload(upload: Upload, size: int, max_chunk_seconds: float) -> TranscriptionOptions:
    if upload.file_parts != 1:
        raise ApiError(422, "file_required", "send exactly one multipart field named 'file'")
    if size == 0:
        raise ApiError(422, "empty_file", "the uploaded file is empty")
    try:
        options = TranscriptionOptions.model_validate(upload.fields)
    except ValidationError as exc:
        raise ApiError(422, "invalid_request", describe_validation(exc.errors())) from exc
    if (options.target_chunk_seconds or 0) > max_chunk_seconds:
        raise ApiError(
            422,
            "invalid_request",
            f"target_chunk_seconds: at most {max_chunk_seconds:g} on this board "
            "(SCRIBEFARM_MAX_CHUNK_SECONDS)",
        )
    return options


@router.get("", response_model=TranscriptionPage, summary="List transcriptions, newest first")
async def list_transcriptions(
    request: Request,
    caller: Submitter,
    state: TranscriptionState | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> TranscriptionPage:
    rows = await request.app.state.board.list(
        caller.owner_filter, state, decode_cursor(cursor), limit + 1
    )
    page = rows[:limit]
    more = len(rows) > limit
    return TranscriptionPage(
        items=[transcription_view(r) for r in page],
        next_cursor=encode_cursor(page[-1]) if more else None,
    )


@router.get("/{transcription_id}", response_model=Transcription)
async def get_transcription(
    request: Request, transcription_id: UUID, caller: Submitter
) -> Transcription:
    row = await request.app.state.board.get(transcription_id, caller.owner_filter)
    return transcription_view(row)


@router.post("/{transcription_id}/cancel", response_model=Transcription)
async def cancel(request: Request, transcription_id: UUID, caller: Submitter) -> Transcription:
    board = request.app.state.board
    await board.cancel(transcription_id, caller.owner_filter)
    return transcription_view(await board.get(transcription_id, caller.owner_filter))


@router.post("/{transcription_id}/retry", response_model=Transcription)
async def retry(request: Request, transcription_id: UUID, caller: Submitter) -> Transcription:
    board = request.app.state.board
    await board.retry_transcription(transcription_id, caller.owner_filter)
    return transcription_view(await board.get(transcription_id, caller.owner_filter))


@router.get(
    "/{transcription_id}/transcript",
    summary="The transcript as txt, srt, vtt or json",
    responses={200: {"content": {t: {} for t in transcripts.MEDIA_TYPES.values()}}},
)
async def get_transcript(
    request: Request,
    transcription_id: UUID,
    caller: Submitter,
    format: TranscriptFormat = "json",
) -> Response:
    board = request.app.state.board
    transcript = await board.transcript(transcription_id, caller.owner_filter)
    disposition = {"Content-Disposition": f'inline; filename="{transcription_id}.{format}"'}
    if format == "json":
        row = await board.get(transcription_id, caller.owner_filter)
        body = {"id": str(transcription_id), "model": row["model"], "options": row["options"]}
        return JSONResponse({**body, **transcript}, headers=disposition)
    return Response(
        transcripts.render(transcript, format),
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
