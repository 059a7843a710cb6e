"""API errors: JSON bodies with a stable `code` and a message a person can act on."""

from __future__ import annotations

import logging
import traceback
from collections.abc import Sequence
from typing import Any

import asyncpg
from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel
from starlette.exceptions import HTTPException as StarletteHTTPException

from server.board.errors import BoardError, Conflict, Invalid, NotFound, OverLimit, text_refused
from shared.protocol import ErrorBody

log = logging.getLogger(__name__)

# What each error status means on this API, for the OpenAPI schema. Routes list theirs
# with `error_responses(...)`, so the schema documents every status they can answer.
ERROR_DESCRIPTIONS = {
    400: "The request is malformed.",
    401: "No API key, or an unknown, revoked or expired one.",
    403: "The API key's role may not use this route.",
    404: "No such object (or not one this key may see).",
    409: "The object is not in a state that allows this.",
    413: "The body (an upload, a form field, a job result) is over its limit; `message` "
    "names the setting.",
    415: "The body is not of a media type this route accepts.",
    422: "A parameter or a field of the body is missing or malformed; `message` names it.",
    426: "The worker speaks an older or another major version of the worker protocol.",
    429: "Over a limit; nothing was done. Try again after `Retry-After` seconds.",
    503: "The server cannot reach its database.",
    504: "The work goes on, but took longer than this request waits.",
}
RETRY_AFTER = {
    "Retry-After": {
        "description": "Seconds to wait before trying again.",
        "schema": {"type": "integer"},
    }
}
RESPONSE_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"description": "`Bearer`", "schema": {"type": "string"}}},
    429: RETRY_AFTER,
    503: RETRY_AFTER,
}


def database_down_response() -> dict[str, Any]:
    """The 503 every route that reads the board may answer, in OpenAPI's own form."""
    return {
        "description": ERROR_DESCRIPTIONS[503],
        "headers": RETRY_AFTER,
        "content": {
            "application/json": {"schema": {"$ref": f"#/components/schemas/{ErrorBody.__name__}"}}
        },
    }


def body_too_large_response() -> dict[str, Any]:
    """The 413 every route with a body may answer (server/bodylimit.py), in OpenAPI's form."""
    schema = {"$ref": f"#/components/schemas/{ErrorBody.__name__}"}
    return {
        "description": ERROR_DESCRIPTIONS[413],
        "content": {"application/json": {"schema": schema}},
    }


def error_responses(
    *statuses: int,
    model: type[BaseModel] = ErrorBody,
    descriptions: dict[int, str] | None = None,
) -> dict[int | str, dict[str, Any]]:
    """`responses=` for a route: each status with the error body `model` and what it
    means on that route (`descriptions`), else in general (ERROR_DESCRIPTIONS)."""
    descriptions = descriptions or {}
    return {
        status: {
            "model": model,
            "description": descriptions.get(status, ERROR_DESCRIPTIONS[status]),
            **({"headers": RESPONSE_HEADERS[status]} if status in RESPONSE_HEADERS else {}),
        }
        for status in statuses
    }


class ApiError(Exception):
    def __init__(self, status: int, code: str, message: str, headers: dict | None = None):
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


# The one place the board's refusals become HTTP statuses.
BOARD_STATUS: dict[type[BoardError], int] = {
    NotFound: 404,
    Conflict: 409,
    Invalid: 422,
    OverLimit: 429,
}


def as_api_error(exc: ApiError | BoardError) -> ApiError:
    if isinstance(exc, ApiError):
        return exc
    headers = {"Retry-After": str(exc.retry_after)} if exc.retry_after else None
    return ApiError(BOARD_STATUS[type(exc)], exc.code, exc.message, headers)


def error_response(status: int, code: str, message: str, headers=None) -> JSONResponse:
    return JSONResponse({"code": code, "message": message}, status_code=status, headers=headers)


# PostgreSQL's text and jsonb cannot hold NUL (U+0000): asyncpg raises these when a
# request's text carries one, wherever it was going to be stored. It is bad input.
TEXT_REFUSED = (asyncpg.CharacterNotInRepertoireError, asyncpg.UntranslatableCharacterError)


# While PostgreSQL is down or restarting, requests answer 503 with Retry-After (what
# workers and polite clients retry on) rather than a bare 500.
DATABASE_DOWN = (
    asyncpg.PostgresConnectionError,  # the connection broke mid-request
    asyncpg.OperatorInterventionError,  # shutting down, starting up, crashed
    asyncpg.TooManyConnectionsError,
    OSError,  # refused, or its socket is gone: counted only when asyncpg raised it
)
DATABASE_RETRY_SECONDS = 5


def raised_by_asyncpg(exc: BaseException) -> bool:
    return any(
        frame.f_globals.get("__name__", "").startswith("asyncpg")
        for frame, _ in traceback.walk_tb(exc.__traceback__)
    )


def describe_validation(errors: Sequence[Any]) -> str:
    """One readable line per problem: where it is and what is wrong."""
    lines = []
    for err in errors:
        where = ".".join(str(p) for p in err["loc"] if p not in ("body", "query", "path"))
        lines.append(f"{where or 'request'}: {err['msg']}")
    return "; ".join(lines)


def install(app: FastAPI) -> None:
    async def api_error(_: Request, exc: Exception):
        error = as_api_error(exc)
        return error_response(error.status, error.code, error.message, error.headers)

    for kind in (ApiError, BoardError):
        app.add_exception_handler(kind, api_error)

    @app.exception_handler(RequestValidationError)
    async def invalid(_: Request, exc: RequestValidationError):
        return error_response(422, "invalid_request", describe_validation(exc.errors()))

    async def refused_text(_: Request, exc: Exception):
        error = as_api_error(text_refused())
        return error_response(error.status, error.code, error.message)

    for refused in TEXT_REFUSED:
        app.add_exception_handler(refused, refused_text)

    async def database_down(_: Request, exc: Exception):
        if not raised_by_asyncpg(exc):
            raise exc  # not the database: a bug, answered 500 and logged as one
        log.warning("the database is unreachable: %r", exc)
        message = "the board's database is unreachable; try again shortly"
        headers = {"Retry-After": str(DATABASE_RETRY_SECONDS)}
        return error_response(503, "database_unavailable", message, headers)

    for down in DATABASE_DOWN:
        app.add_exception_handler(down, database_down)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(_: Request, exc: StarletteHTTPException):
        # FastAPI answers 400 for a body it cannot parse (JSON that is not UTF-8).
        codes = {400: "malformed_body", 404: "not_found", 405: "method_not_allowed"}
        code = codes.get(exc.status_code, "http_error")
        return error_response(exc.status_code, code, str(exc.detail), exc.headers)
