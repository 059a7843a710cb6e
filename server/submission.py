"""Submission: the one way in for every transcription, whichever door it comes through
(the REST API's upload or URL, the OpenAI endpoint, the dashboard's forms).

It takes the server's state (board, storage, settings), never a request: routes parse
HTTP and hand over a byte stream or a URL source. Limits apply before the work they
limit: a key over its limits is refused before its upload streams or its URL is probed.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import json
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any
from urllib.parse import urlsplit
from uuid import uuid4

from pydantic import Field, HttpUrl, ValidationError

from server import references
from server.auth import Caller
from server.errors import ApiError, describe_validation
from server.state import ServerState
from server.uploads import Upload
from shared import urlguard
from shared.protocol import TranscriptionOptions


class UrlSource(TranscriptionOptions):
    url: HttpUrl = Field(description="http(s) URL workers read the media from (range requests).")


async def from_upload(
    state: ServerState,
    caller: Caller,
    upload: Upload,
    file: AsyncIterator[bytes],
    read_options: Callable[[Upload], Awaitable[TranscriptionOptions]] | None = None,
) -> Any:
    """Streams `file` (the upload's file part, as it arrives) to storage and queues its
    transcription; returns its row. `read_options` turns the upload's other fields into
    options (ours by default)."""
    limited = caller.role != "admin"
    if limited:  # before the upload streams in, not after
        await state.board.transcriptions.check_limits(caller.key_id)
    transcription_id = uuid4()
    key = f"sources/{transcription_id}"
    digest = hashlib.sha256()
    size = await state.storage.write(key, hashing(file, digest))
    try:
        if upload.file_parts != 1:
            raise ApiError(422, "file_required", "send exactly one multipart field named 'file'")
        if size == 0:
            raise ApiError(422, "empty_file", "the uploaded file is empty")
        options = await (read_options or parse_options)(upload)
        await check_options(state, caller, options)
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


async def from_url(state: ServerState, caller: Caller, source: UrlSource) -> Any:
    """Queues a transcription of media at a URL, which workers read from there; returns
    its row."""
    limited = caller.role != "admin"
    if limited:  # before the URL is probed, not after
        await state.board.transcriptions.check_limits(caller.key_id)
    await check_options(state, caller, source)
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


def parse_source(data: bytes | dict[str, Any]) -> UrlSource:
    try:
        if isinstance(data, bytes):
            return UrlSource.model_validate_json(data)
        return UrlSource.model_validate(data)
    except ValidationError as exc:
        raise ApiError(422, "invalid_request", describe_validation(exc.errors())) from exc


async def parse_options(upload: Upload) -> TranscriptionOptions:
    """The form's options; known speakers come as OpenAI sends them (references.py)."""
    fields = dict(upload.fields)
    for name in (references.NAMES_FIELD, references.REFERENCES_FIELD):
        fields.pop(name, None)
    try:
        options = TranscriptionOptions.model_validate(fields)
    except ValidationError as exc:
        raise ApiError(422, "invalid_request", describe_validation(exc.errors())) from exc
    try:
        return await references.with_known_speakers(options, upload)
    except references.ReferenceRefused as exc:
        raise ApiError(422, "invalid_reference", str(exc)) from exc


async def check_options(state: ServerState, caller: Caller, options: TranscriptionOptions):
    settings = state.settings
    await check_model(state, options.model)
    if (options.target_chunk_seconds or 0) > settings.max_chunk_seconds:
        raise ApiError(
            422,
            "invalid_request",
            f"target_chunk_seconds: at most {settings.max_chunk_seconds:g} on this board "
            "(SCRIBEFARM_MAX_CHUNK_SECONDS)",
        )
    # Priority decides whose work runs first: past the board's maximum only the
    # operator (an admin key) may ask for it.
    highest = settings.max_submit_priority
    if options.priority > highest and caller.role != "admin":
        raise ApiError(
            403,
            "priority_not_allowed",
            f"priority {options.priority} needs an admin key; this key may ask for at most "
            f"{highest} (SCRIBEFARM_MAX_SUBMIT_PRIORITY)",
        )
    if options.webhook_url is not None:
        await guarded(
            urlguard.check_url, str(options.webhook_url), settings.allowlist, "webhook_url"
        )


async def check_model(state: ServerState, model: str | None) -> None:
    """A model no worker has would wait in the queue for ever: refuse it now."""
    settings = state.settings
    if model is None or model == settings.default_model or model in settings.models:
        return
    served = await state.board.reads.served_models()
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
    if options.diarize:  # who spoke: how many, and who they may be
        shaping |= options.model_dump(
            include={"diarize", "num_speakers", "min_speakers", "max_speakers", "known_speakers"}
        )
    return hashlib.sha256(
        f"{source_sha256}|{json.dumps(shaping, sort_keys=True)}".encode()
    ).hexdigest()
