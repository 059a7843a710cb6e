"""What the board refuses. Domain errors, free of HTTP: server/errors.py answers each
kind with its status, and `retry_after` with a Retry-After header."""

from __future__ import annotations

from uuid import UUID


class BoardError(Exception):
    def __init__(self, code: str, message: str, retry_after: int | None = None):
        super().__init__(message)
        self.code = code
        self.message = message
        self.retry_after = retry_after


class NotFound(BoardError):
    """No such object, or not one the caller may see."""


class Conflict(BoardError):
    """The object is not in a state that allows this."""


class Invalid(BoardError):
    """A value the board cannot take."""


class OverLimit(BoardError):
    """Over a limit; nothing was done."""


def not_found(transcription_id: UUID) -> NotFound:
    return NotFound("not_found", f"no transcription {transcription_id}")


def text_refused() -> Invalid:
    """PostgreSQL's text and jsonb cannot hold NUL (U+0000)."""
    return Invalid("invalid_text", "text may not contain NUL characters (\\u0000); remove them")
