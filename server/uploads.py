"""Streaming multipart uploads: the file goes to storage as it arrives, never whole in
memory, and an upload over the limit is refused as soon as it crosses it."""

from __future__ import annotations

from collections.abc import AsyncIterator
from dataclasses import dataclass, field

from fastapi import Request
from python_multipart.exceptions import MultipartParseError
from python_multipart.multipart import MultipartParser, parse_options_header

from server.errors import ApiError

MAX_FIELD_BYTES = 8192
# The parts around the file are few and small; without these caps, fields (each kept in
# memory) and part headers could fill the whole upload limit.
MAX_FIELDS = 64
MAX_PART_HEADERS = 8  # per part (python-multipart's own default, set here so it stays)
MAX_PART_HEADER_BYTES = 4096  # per header line
# A known speaker's reference clip (OpenAI's field name; a data URL each: references.py).
REFERENCES_FIELD = "known_speaker_references[]"
# Fields that carry more than a short value, each with its cap, and how many may come.
LARGE_FIELDS = {REFERENCES_FIELD: 1536 * 1024}
MAX_LARGE_FIELDS = 4
MULTIPART_OVERHEAD = (  # headers and fields around the file
    1024 * 1024 + MAX_LARGE_FIELDS * max(LARGE_FIELDS.values())
)


@dataclass
class Upload:
    fields: dict[str, str] = field(default_factory=dict)  # the last value of each
    repeated: dict[str, list[str]] = field(default_factory=dict)  # every value of each
    filename: str | None = None
    file_parts: int = 0
    size: int = 0


class _Part:
    def __init__(self) -> None:
        self.headers: dict[bytes, bytes] = {}
        self.header_field = b""
        self.header_value = b""
        self.name: str | None = None
        self.is_file = False
        self.value = bytearray()


def upload_too_large(limit: int) -> ApiError:
    return ApiError(
        413,
        "upload_too_large",
        f"the upload is over the limit of {limit} bytes (SCRIBEFARM_MAX_UPLOAD_BYTES)",
    )


def boundary_of(request: Request) -> bytes:
    content_type, params = parse_options_header(request.headers.get("content-type", ""))
    if content_type != b"multipart/form-data" or b"boundary" not in params:
        raise ApiError(
            415,
            "multipart_required",
            "send the audio as multipart/form-data with a 'file' field "
            "(curl -F file=@audio.mp3 ...)",
        )
    return params[b"boundary"]


def file_stream(request: Request, upload: Upload, file_field: str, limit: int):
    """Parses the request body; yields the bytes of the `file_field` part as they arrive
    and collects the other (small) fields into `upload.fields`."""
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > limit + MULTIPART_OVERHEAD:
        raise upload_too_large(limit)
    pending: list[bytes] = []
    part = _Part()

    parts = large = 0

    def on_part_begin() -> None:
        nonlocal part, parts
        part = _Part()
        parts += 1
        if parts > MAX_FIELDS + 1:  # the fields and the file
            raise ApiError(
                413, "too_many_fields", f"the form has more than {MAX_FIELDS} fields; send fewer"
            )

    def on_header_field(data: bytes, start: int, end: int) -> None:
        part.header_field += data[start:end]

    def on_header_value(data: bytes, start: int, end: int) -> None:
        part.header_value += data[start:end]

    def on_header_end() -> None:
        part.headers[part.header_field.lower()] = part.header_value
        part.header_field, part.header_value = b"", b""

    def on_headers_finished() -> None:
        nonlocal large
        _, params = parse_options_header(part.headers.get(b"content-disposition", b""))
        part.name = params.get(b"name", b"").decode(errors="replace")
        part.is_file = part.name == file_field
        if part.name in LARGE_FIELDS:
            large += 1
            if large > MAX_LARGE_FIELDS:
                raise ApiError(
                    413, "too_many_fields", f"at most {MAX_LARGE_FIELDS} {part.name!r} fields"
                )
        if part.is_file:
            upload.file_parts += 1
            upload.filename = params.get(b"filename", b"").decode(errors="replace") or None

    def on_part_data(data: bytes, start: int, end: int) -> None:
        if part.is_file:
            pending.append(bytes(data[start:end]))
            upload.size += end - start
            return
        part.value += data[start:end]
        cap = LARGE_FIELDS.get(part.name, MAX_FIELD_BYTES)
        if len(part.value) > cap:
            raise ApiError(
                413,
                "field_too_large",
                f"form field {part.name!r} is over {cap} bytes; send a shorter value",
            )

    def on_part_end() -> None:
        if not part.is_file and part.name:
            value = part.value.decode(errors="replace")
            upload.fields[part.name] = value
            upload.repeated.setdefault(part.name, []).append(value)

    parser = MultipartParser(
        boundary_of(request),
        {
            "on_part_begin": on_part_begin,
            "on_header_field": on_header_field,
            "on_header_value": on_header_value,
            "on_header_end": on_header_end,
            "on_headers_finished": on_headers_finished,
            "on_part_data": on_part_data,
            "on_part_end": on_part_end,
        },
        max_header_count=MAX_PART_HEADERS,
        max_header_size=MAX_PART_HEADER_BYTES,
    )

    async def chunks() -> AsyncIterator[bytes]:
        async for body in request.stream():
            try:
                parser.write(body)
            except MultipartParseError as exc:
                if "Maximum header" in str(exc):  # python-multipart's caps, set above
                    raise ApiError(
                        413,
                        "part_headers_too_large",
                        f"a form part has more than {MAX_PART_HEADERS} headers or one over "
                        f"{MAX_PART_HEADER_BYTES} bytes; send fewer, shorter headers",
                    ) from exc
                message = f"the multipart body is malformed: {exc}"
                raise ApiError(422, "bad_multipart", message) from exc
            if upload.size > limit:
                raise upload_too_large(limit)
            for chunk in pending:
                yield chunk
            pending.clear()
        parser.finalize()

    return chunks()
