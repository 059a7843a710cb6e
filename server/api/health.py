"""Liveness and readiness for load balancers and orchestrators."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Request

from server.errors import ApiError, error_responses
from server.state import server_state

log = logging.getLogger(__name__)
router = APIRouter(tags=["health"])
PUBLIC = {"x-scribefarm-roles": ["public"]}


@router.get("/healthz", openapi_extra=PUBLIC)
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    openapi_extra=PUBLIC,
    responses=error_responses(503, descriptions={503: "Not ready: the database is unreachable."}),
)
async def readyz(request: Request) -> dict[str, str | bool]:
    """Ready when the database answers; `leader` tells whether this replica runs the
    board-wide duties (autoscaler, retention, the sweep) now."""
    state = server_state(request)
    try:
        await state.board.ping()
    except Exception as exc:
        # The exception names hosts, users and databases: it goes to the log, not to
        # whoever asks (this route needs no key).
        log.warning("not ready: the database is unreachable: %r", exc)
        message = "the board's database is unreachable; see the server's log"
        raise ApiError(503, "database_unavailable", message) from exc
    return {"status": "ready", "leader": state.leadership.leading}
