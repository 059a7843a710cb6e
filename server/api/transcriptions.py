"""The submission API: submit, follow, cancel, retry, and read transcripts."""

from __future__ import annotations

import asyncio
import base64
import binascii
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator, Callable
from datetime import datetime
from typing import Annotated, Any
from urllib.parse import urlsplit
from uuid import UUID, uuid4

from fastapi import APIRouter, Query, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import Field, HttpUrl, ValidationError

from server import transcripts
from server.auth import Caller, allow
from server.errors import ApiError, describe_validation, error_responses
from server.uploads import Upload, file_stream
from shared import urlguard
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
    from_url = {"url": UrlSource.model_json_schema()["properties"]["url"], **options["properties"]}

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


class UrlSource(TranscriptionOptions):
    url: HttpUrl = Field(description="http(s) URL workers read the media from (range requests).")


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
        row = await submit_url(request, caller)
    else:
        row = await submit_upload(request, caller)
    return transcription_view(row)


async def submit_upload(
    request: Request,
    caller: Caller,
    read_options: Callable[[Upload], TranscriptionOptions] | None = None,
) -> Any:
    """Streams the multipart `file` to storage and queues its transcription; returns its
    row. `read_options` turns the other form fields into options (ours by default)."""
    state = request.app.state
    limited = caller.role != "admin"
    if limited:  # before the upload streams in, not after
        await state.board.transcriptions.check_limits(caller.key_id)
    transcription_id = uuid4()
    key = f"sources/{transcription_id}"
    upload, digest = Upload(), hashlib.sha256()
    stream = file_stream(request, upload, "file", state.settings.max_upload_bytes)
    size = await state.storage.write(key, hashing(stream, digest))
    try:
        if upload.file_parts != 1:
            raise ApiError(422, "file_required", "send exactly one multipart field named 'file'")
        if size == 0:
            raise ApiError(422, "empty_file", "the uploaded file is empty")
        options = (read_options or parse_options)(upload)
        await check_options(request, options)
        check_priority(request, caller, options)
        model = options.model or state.settings.default_model
        await state.board.transcriptions.submit(
            owner=caller.key_id,
            transcription_id=transcription_id,
            filename=upload.filename,
            source_key=key,
            source_url=None,
            source_bytes=size,
            options=options.model_dump(mode="json"),
            model=model,
            dedup_key=dedup_key(digest.hexdigest(), options, model),
            limited=limited,
        )
    except BaseException:
        await state.storage.delete(key)
        raise
    return await state.board.transcriptions.get(transcription_id, None)


async def submit_url(
    request: Request, caller: Caller, read_source: Callable[[Request], Any] | None = None
) -> Any:
    """Queues a transcription of media at a URL; workers read it from there. The URL and
    options come from `read_source(request)` (an awaitable; the JSON body by default)."""
    state = request.app.state
    limited = caller.role != "admin"
    if limited:  # before the URL is probed, not after
        await state.board.transcriptions.check_limits(caller.key_id)
    source = await (read_source or json_source)(request)
    await check_options(request, source)
    check_priority(request, caller, source)
    url = str(source.url)
    with state.probes.probe(caller.key_id) if limited else contextlib.nullcontext():
        await guarded(urlguard.final_url, url, state.settings.allowlist, "url")
    options = TranscriptionOptions.model_validate(source.model_dump(exclude={"url"}))
    transcription_id = uuid4()
    await state.board.transcriptions.submit(
        owner=caller.key_id,
        transcription_id=transcription_id,
        filename=urlsplit(url).path.rsplit("/", 1)[-1] or None,
        source_key=None,
        source_url=url,
        source_bytes=None,
        options=options.model_dump(mode="json"),
        model=options.model or state.settings.default_model,
        dedup_key=None,  # the content behind a URL can change
        limited=limited,
    )
    return await state.board.transcriptions.get(transcription_id, None)


async def json_source(request: Request) -> UrlSource:
    return parse_source(await request.body())


def parse_source(data: bytes | dict[str, Any]) -> UrlSource:
    try:
        if isinstance(data, bytes):
            return UrlSource.model_validate_json(data)
        return UrlSource.model_validate(data)
    except ValidationError as exc:
        raise ApiError(422, "invalid_request", describe_validation(exc.errors())) from exc


def parse_options(upload: Upload) -> TranscriptionOptions:
    try:
        return TranscriptionOptions.model_validate(upload.fields)
    except ValidationError as exc:
        raise ApiError(422, "invalid_request", describe_validation(exc.errors())) from exc


async def check_options(request: Request, options: TranscriptionOptions) -> None:
    settings = request.app.state.settings
    await check_model(request, options.model)
    if (options.target_chunk_seconds or 0) > settings.max_chunk_seconds:
        raise ApiError(
            422,
            "invalid_request",
            f"target_chunk_seconds: at most {settings.max_chunk_seconds:g} on this board "
            "(SCRIBEFARM_MAX_CHUNK_SECONDS)",
        )
    if options.webhook_url is not None:
        await guarded(
            urlguard.check_url, str(options.webhook_url), settings.allowlist, "webhook_url"
        )


def check_priority(request: Request, caller: Caller, options: TranscriptionOptions) -> None:
    """Priority decides whose work runs first: past the board's maximum only the
    operator (an admin key) may ask for it."""
    highest = request.app.state.settings.max_submit_priority
    if options.priority > highest and caller.role != "admin":
        raise ApiError(
            403,
            "priority_not_allowed",
            f"priority {options.priority} needs an admin key; this key may ask for at most "
            f"{highest} (SCRIBEFARM_MAX_SUBMIT_PRIORITY)",
        )


async def check_model(request: Request, model: str | None) -> None:
    """A model no worker has would wait in the queue for ever: refuse it now."""
    settings = request.app.state.settings
    if model is None or model == settings.default_model or model in settings.models:
        return
    served = await request.app.state.board.reads.served_models()
    if model in served:
        return
    offered = ", ".join(sorted({settings.default_model, *settings.models, *served})[:20])
    raise ApiError(
        422,
        "unknown_model",
        f"model: no worker of this farm has {model!r}; it offers {offered}. Start a worker "
        f"with --model {model} (or list it in SCRIBEFARM_MODELS), then submit again",
    )


async def guarded(check: Callable[..., Any], url: str, allowlist: Any, field: str) -> None:
    """Runs a urlguard check (DNS and HTTP: off the event loop); its refusal is a 422."""
    try:
        await asyncio.to_thread(check, url, allowlist)
    except urlguard.UrlRefused as exc:
        raise ApiError(422, "url_refused", f"{field}: {exc}") from exc
    except urlguard.UrlUnreachable as exc:
        raise ApiError(422, "url_unreachable", f"{field}: {exc}") from exc


async def hashing(chunks: AsyncIterator[bytes], digest: Any) -> AsyncIterator[bytes]:
    async for chunk in chunks:
        digest.update(chunk)
        yield chunk


def dedup_key(source_sha256: str, options: TranscriptionOptions, model: str) -> str:
    """Same audio and same options that shape the transcript: the same transcript."""
    shaping = options.model_dump(
        mode="json",
        include={
            "language",
            "target_chunk_seconds",
            "prompt",
            "hotwords",
            "detect_language_per_chunk",
        },
    )
    shaping |= {"model": model, "word_timestamps": options.word_timestamps}
    return hashlib.sha256(
        f"{source_sha256}|{json.dumps(shaping, sort_keys=True)}".encode()
    ).hexdigest()


@router.get("", response_model=TranscriptionPage, summary="List transcriptions, newest first")
async def list_transcriptions(
    request: Request,
    caller: Submitter,
    state: TranscriptionState | None = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> TranscriptionPage:
    rows = await request.app.state.board.transcriptions.list(
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
    row = await request.app.state.board.transcriptions.get(transcription_id, caller.owner_filter)
    return transcription_view(row)


@router.post(
    "/{transcription_id}/cancel",
    response_model=Transcription,
    responses=error_responses(404, 409, descriptions={409: "It has already finished."}),
)
async def cancel(request: Request, transcription_id: UUID, caller: Submitter) -> Transcription:
    board = request.app.state.board
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
    board = request.app.state.board
    await board.transcriptions.retry(transcription_id, caller.owner_filter)
    return transcription_view(await board.transcriptions.get(transcription_id, caller.owner_filter))


@router.delete("/{transcription_id}", status_code=204, responses=error_responses(404))
async def delete(request: Request, transcription_id: UUID, caller: Submitter) -> Response:
    """Deletes the transcription, its transcript and its stored media (canceling it
    first when it is still running)."""
    state = request.app.state
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
    board = request.app.state.board
    row = await board.transcriptions.transcript(transcription_id, caller.owner_filter)
    suffix = "json" if format == "verbose_json" else format
    disposition = {"Content-Disposition": f'inline; filename="{transcription_id}.{suffix}"'}
    storage = request.app.state.storage
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
