"""OpenAI's transcription endpoint, so the official clients (and tools built on them)
can use the farm: `POST /v1/audio/transcriptions`.

The upload goes through the farm like any `POST /v1/transcriptions` (same streaming,
storage, dedup and jobs), then the request waits for the transcription to finish and
answers in the format asked for. Waiting costs no database connection: one LISTEN per
server process hears the `scribefarm_finished` NOTIFY that migration 0003's trigger
sends, and wakes the requests waiting on that transcription; a poll covers NOTIFYs
missed while the listener reconnects. A client that hangs up stops the wait (the
transcription goes on, and a resubmission of the same file reuses it once it is done).

Errors on this router take OpenAI's shape, `{"error": {"message", "type", "param",
"code"}}`, which the official client turns into its exceptions, and keep the `code`
and `message` every scribefarm error has at the top level. docs/api.md lists what is
supported.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable, Coroutine
from dataclasses import dataclass
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, Response
from fastapi.routing import APIRoute
from pydantic import BaseModel, Field, ValidationError

from server import references, transcripts
from server.api.transcriptions import submit_upload
from server.auth import WAIT_RECHECK_SECONDS, Caller, allow, key_gone
from server.board.errors import BoardError, text_refused
from server.errors import (
    TEXT_REFUSED,
    ApiError,
    as_api_error,
    describe_validation,
    error_responses,
)
from server.state import server_state
from server.uploads import Upload
from shared.protocol import TranscriptionOptions

log = logging.getLogger(__name__)

RESPONSE_FORMATS = ("json", "text", "srt", "vtt", "verbose_json", "diarized_json")
GRANULARITIES = ("segment", "word")
# The name clients send for the board's default model.
DEFAULT_MODEL_ALIAS = "whisper-1"
# Array fields arrive as repeated `name[]` parts (the official client's encoding).
ARRAY_FIELDS = ("timestamp_granularities[]", "timestamp_granularities")
KNOWN_FIELDS = frozenset(
    {
        "model",
        "language",
        "prompt",
        "response_format",
        "temperature",
        "stream",
        "chunking_strategy",
        references.NAMES_FIELD,
        references.REFERENCES_FIELD,
        *ARRAY_FIELDS,
    }
)
TRANSCRIPTION_HEADER = "X-Scribefarm-Transcription-Id"
FINISHED_STATES = ("succeeded", "failed", "canceled")
# While the listener is up, a NOTIFY wakes waiters; the poll is only a safety net.
LISTENING_POLL_SECONDS = 10.0
# Where the shared submission code's errors point, in OpenAI's `param`.
PARAMS = {
    "file_required": "file",
    "empty_file": "file",
    "upload_too_large": "file",
    "unknown_model": "model",
}


# --- errors -------------------------------------------------------------------------


class OpenAIError(ApiError):
    """An error answered as given (the status is OpenAI's), naming the field at fault."""

    def __init__(
        self,
        status: int,
        code: str,
        message: str,
        param: str | None = None,
        headers: dict[str, str] | None = None,
    ):
        super().__init__(status, code, message, headers)
        self.param = param


class OpenAIErrorDetail(BaseModel):
    message: str
    type: str = Field(description="`invalid_request_error`, `requests` (429) or `server_error`.")
    param: str | None = Field(description="The request field at fault, if one is.")
    code: str


class OpenAIErrorBody(BaseModel):
    """OpenAI's error shape, with scribefarm's `code` and `message` at the top level too."""

    error: OpenAIErrorDetail
    code: str
    message: str


def error_response(
    status: int, code: str, message: str, param: str | None, headers: dict | None
) -> JSONResponse:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    if status == 429:
        kind = "requests"  # OpenAI's type for request-rate limits
    error = {"message": message, "type": kind, "param": param, "code": code}
    if status != 429:  # over a limit: nothing was queued; the client retries after Retry-After
        # Sending the upload again cannot change these answers: the official client must
        # not retry (it would on a 5xx), starting a second transcription of the file.
        headers = {**(headers or {}), "x-should-retry": "false"}
    body = {"error": error, "code": code, "message": message}
    return JSONResponse(body, status_code=status, headers=headers)


class OpenAIRoute(APIRoute):
    """Answers this router's errors (auth included) in OpenAI's shape."""

    def get_route_handler(self) -> Callable[[Request], Coroutine[Any, Any, Response]]:
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except OpenAIError as exc:
                return error_response(exc.status, exc.code, exc.message, exc.param, exc.headers)
            except (ApiError, BoardError) as refused:
                exc = as_api_error(refused)
                # OpenAI answers invalid requests with 400, where scribefarm says 422.
                status = 400 if exc.status == 422 else exc.status
                param = PARAMS.get(exc.code)
                return error_response(status, exc.code, exc.message, param, exc.headers)
            except RequestValidationError as exc:
                message = describe_validation(exc.errors())
                return error_response(400, "invalid_request", message, None, None)
            except TEXT_REFUSED:  # a NUL in a form field: an invalid value, as OpenAI says
                invalid = text_refused()
                return error_response(400, invalid.code, invalid.message, None, None)

        return handle


# --- waiting for transcriptions to finish -------------------------------------------


async def wait_until_finished(request: Request, transcription_id: UUID, caller: Caller) -> Any:
    """The transcription's row once it has finished; None when the client hung up.
    Raises a 504 after SCRIBEFARM_OPENAI_WAIT_SECONDS."""
    state = server_state(request)
    waiter = state.finished
    loop = asyncio.get_running_loop()
    deadline = loop.time() + state.settings.openai_wait_seconds
    # The body has been read, so receive() now returns only when the client hangs up.
    hung_up = asyncio.ensure_future(request.receive())
    try:
        while True:
            with waiter.watch(transcription_id) as event:
                row = await state.board.transcriptions.get(transcription_id, caller.owner_filter)
                if row["state"] in FINISHED_STATES:
                    return row
                remaining = deadline - loop.time()
                if remaining <= 0:
                    raise still_running(state.settings.openai_wait_seconds, row)
                poll = LISTENING_POLL_SECONDS if waiter.listening else state.settings.poll_seconds
                woken = asyncio.ensure_future(event.wait())
                await asyncio.wait(
                    {woken, hung_up},
                    # In slices, so a revoked key's wait ends within 5 s.
                    timeout=min(remaining, poll, WAIT_RECHECK_SECONDS),
                    return_when=asyncio.FIRST_COMPLETED,
                )
                woken.cancel()
                if hung_up.done():
                    log.info(
                        "the client waiting for transcription %s hung up; it goes on",
                        transcription_id,
                    )
                    return None
                if not await state.keys.active(state.board, caller.key_id):
                    gone = key_gone()
                    raise OpenAIError(gone.status, gone.code, gone.message, headers=gone.headers)
    finally:
        hung_up.cancel()


def still_running(waited: float, row: Any) -> OpenAIError:
    tid = row["id"]
    return OpenAIError(
        504,
        "transcription_timeout",
        f"transcription {tid} is still {row['state']} after {waited:g} s "
        f"(SCRIBEFARM_OPENAI_WAIT_SECONDS); it goes on: fetch its transcript later with "
        f"GET /v1/transcriptions/{tid}/transcript",
        headers={TRANSCRIPTION_HEADER: str(tid)},
    )


# --- the request ----------------------------------------------------------------------


@dataclass(frozen=True)
class OpenAIRequest:
    response_format: str
    granularities: tuple[str, ...]
    options: TranscriptionOptions


def read_request(upload: Upload) -> OpenAIRequest:
    """OpenAI's form fields (other than `file`) as our options and how to answer."""
    fields = upload.fields
    unknown = sorted(set(fields) - KNOWN_FIELDS)
    if unknown:
        raise OpenAIError(
            400,
            "unknown_parameter",
            f"unknown parameter {unknown[0]!r}; supported: file, "
            + ", ".join(sorted(KNOWN_FIELDS - {"timestamp_granularities"})),
            unknown[0],
        )
    model = fields.get("model", "").strip()
    if not model:
        raise OpenAIError(
            400,
            "missing_required_parameter",
            f"'model' is required: send '{DEFAULT_MODEL_ALIAS}' for this board's default "
            "model, or a model name its workers have",
            "model",
        )
    response_format = fields.get("response_format", "json").strip() or "json"
    if response_format not in RESPONSE_FORMATS:
        raise OpenAIError(
            400,
            "invalid_value",
            f"response_format {response_format!r} is not supported; use one of "
            + ", ".join(RESPONSE_FORMATS),
            "response_format",
        )
    granularities = tuple(
        value.strip()
        for name in ARRAY_FIELDS
        for value in upload.repeated.get(name, [])
        if value.strip()
    )
    if bad := [g for g in granularities if g not in GRANULARITIES]:
        raise OpenAIError(
            400,
            "invalid_value",
            f"timestamp_granularities[] {bad[0]!r} is not supported; use segment or word",
            "timestamp_granularities",
        )
    if fields.get("stream", "false").strip().lower() not in ("false", "0", ""):
        raise OpenAIError(
            400,
            "unsupported_value",
            "streaming is not supported: omit 'stream' (OpenAI ignores it for whisper-1)",
            "stream",
        )
    if temperature := fields.get("temperature", "").strip():  # accepted, not used
        try:
            if not 0 <= float(temperature) <= 1:
                raise ValueError
        except ValueError:
            raise OpenAIError(
                400,
                "invalid_value",
                f"temperature {temperature!r}: a number between 0 and 1",
                "temperature",
            ) from None
    if fields.get("chunking_strategy", "auto").strip() != "auto":  # the farm chunks anyway
        raise OpenAIError(
            400,
            "invalid_value",
            "chunking_strategy: only 'auto' (the farm cuts the audio at its silences)",
            "chunking_strategy",
        )
    # Words cost an alignment pass: only computed when they will be returned.
    words = response_format == "verbose_json" and "word" in granularities
    options = {
        "model": None if model == DEFAULT_MODEL_ALIAS else model,
        "language": fields.get("language", "").strip() or None,
        "word_timestamps": words,
        "prompt": fields.get("prompt", "").strip() or None,  # every chunk's initial prompt
        "diarize": response_format == "diarized_json",
    }
    try:
        parsed = TranscriptionOptions.model_validate(options)
    except ValidationError as exc:
        first = exc.errors()[0]["loc"]
        raise OpenAIError(
            400,
            "invalid_value",
            describe_validation(exc.errors()),
            str(first[0]) if first else None,
        ) from exc
    return OpenAIRequest(response_format, granularities, parsed)


# --- the route --------------------------------------------------------------------------


def request_schema() -> dict[str, Any]:
    """OpenAI's multipart request, documented by hand: the handler reads the body."""
    text = {"type": "string"}
    properties = {
        "file": {"type": "string", "format": "binary"},
        "model": {
            **text,
            "pattern": r"\S",
            "maxLength": 200,
            "description": f"'{DEFAULT_MODEL_ALIAS}' for the board's default model, or a "
            "model name its workers have",
        },
        "language": {
            **text,
            "pattern": "^[a-z]{2,3}$",
            "description": "ISO 639-1 code such as 'en'; detected if omitted",
        },
        "prompt": {
            **text,
            "maxLength": 1000,
            "description": "Initial prompt for every window (context, names, spellings).",
        },
        "response_format": {"type": "string", "enum": list(RESPONSE_FORMATS), "default": "json"},
        "timestamp_granularities[]": {
            "type": "array",
            "items": {"type": "string", "enum": list(GRANULARITIES)},
            "description": "With verbose_json: 'word' adds word timestamps.",
        },
        "temperature": {
            "type": "number",
            "minimum": 0,
            "maximum": 1,
            "description": "Accepted and ignored.",
        },
        "stream": {"type": "boolean", "enum": [False], "description": "Only false: no streaming."},
        "chunking_strategy": {
            "type": "string",
            "enum": ["auto"],
            "description": "Accepted: the farm always cuts the audio at its silences.",
        },
    }
    schema = {
        "type": "object",
        "required": ["file", "model"],
        "properties": properties,
        "additionalProperties": False,  # other fields are refused, not ignored
    }
    return {
        "requestBody": {"required": True, "content": {"multipart/form-data": {"schema": schema}}}
    }


router = APIRouter(prefix="/v1/audio", tags=["openai-compatible"], route_class=OpenAIRoute)
Submitter = Annotated[Caller, allow("submit", "admin")]


@router.post(
    "/transcriptions",
    openapi_extra=request_schema(),
    summary="OpenAI-compatible transcription: upload, wait, and get the transcript",
    responses={
        200: {
            "content": {
                "application/json": {},
                "text/plain": {},
                transcripts.MEDIA_TYPES["srt"]: {},
                transcripts.MEDIA_TYPES["vtt"]: {},
            }
        },
        **error_responses(
            400,
            401,
            403,
            413,
            415,
            422,
            429,
            504,
            model=OpenAIErrorBody,
            descriptions={
                400: "A missing `file` or `model`, an unknown field or value, a malformed form.",
                422: "The transcription failed (`transcription_failed`) or was canceled "
                "(`transcription_canceled`).",
                504: "Still running after SCRIBEFARM_OPENAI_WAIT_SECONDS "
                "(`transcription_timeout`); it goes on.",
            },
        ),
    },
)
async def create_transcription(request: Request, caller: Submitter) -> Response:
    """Submits the file through the farm, waits until its transcription finishes (up to
    SCRIBEFARM_OPENAI_WAIT_SECONDS) and answers as OpenAI does. The transcription's id
    is in the X-Scribefarm-Transcription-Id header."""
    parsed: OpenAIRequest | None = None

    async def read_options(upload: Upload) -> TranscriptionOptions:
        nonlocal parsed
        parsed = read_request(upload)
        try:
            return await references.with_known_speakers(parsed.options, upload)
        except references.ReferenceRefused as exc:
            raise OpenAIError(400, "invalid_value", str(exc), "known_speaker_references") from exc

    row = await submit_upload(request, caller, read_options)
    assert parsed is not None  # submit_upload read the options, or raised
    transcription_id = row["id"]
    headers = {TRANSCRIPTION_HEADER: str(transcription_id)}
    row = await wait_until_finished(request, transcription_id, caller)
    if row is None:  # nobody is listening any more
        return Response(status_code=499)
    if row["state"] != "succeeded":
        what = "failed" if row["state"] == "failed" else "was canceled"
        reason = f": {row['error']}" if row["error"] else ""
        message = f"transcription {transcription_id} {what}{reason}"
        raise OpenAIError(422, f"transcription_{row['state']}", message, headers=headers)
    document = await server_state(request).board.transcriptions.transcript_document(
        transcription_id, caller.owner_filter
    )
    return answer(document, parsed, headers)


def answer(document: dict[str, Any], parsed: OpenAIRequest, headers: dict[str, str]) -> Response:
    fmt = parsed.response_format
    if fmt == "json":
        return JSONResponse({"text": document["text"]}, headers=headers)
    if fmt == "text":
        return PlainTextResponse(document["text"] + "\n", headers=headers)
    if fmt == "verbose_json":
        granularities = parsed.granularities or ("segment",)
        body = transcripts.verbose_json(
            document, segments="segment" in granularities, words="word" in granularities
        )
        return JSONResponse(body, headers=headers)
    if fmt == "diarized_json":
        return JSONResponse(transcripts.diarized_json(document), headers=headers)
    rendered = transcripts.render(document, fmt)
    return Response(rendered, media_type=transcripts.MEDIA_TYPES[fmt], headers=headers)
