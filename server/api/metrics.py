"""GET /metrics: the Prometheus text format (server/metrics.py says what is in it)."""

from __future__ import annotations

import hmac
import time
from typing import Any

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server import metrics
from server.errors import ApiError
from server.state import server_state

router = APIRouter(tags=["health"])


@router.get(
    "/metrics",
    openapi_extra={"x-scribefarm-roles": ["public"]},
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"}},
)
async def prometheus_metrics(request: Request) -> Response:
    """Counts only (no names, no keys): public by default, like /healthz, for scrapers
    that cannot authenticate (Fly.io's); behind a token when SCRIBEFARM_METRICS_TOKEN
    is set."""
    settings = server_state(request).settings
    check_token(request, settings.metrics_token)
    row = await board_metrics(request, settings.metrics_cache_seconds)
    return Response(metrics.exposition(row), media_type=CONTENT_TYPE_LATEST)


def check_token(request: Request, token: Any) -> None:
    if token is None:
        return
    sent = request.headers.get("authorization", "").removeprefix("Bearer ").strip()
    if not hmac.compare_digest(sent.encode(), token.get_secret_value().encode()):
        raise ApiError(
            401,
            "unauthenticated",
            "/metrics needs the metrics token: send 'Authorization: Bearer <token>' "
            "(SCRIBEFARM_METRICS_TOKEN)",
            {"WWW-Authenticate": "Bearer"},
        )


async def board_metrics(request: Request, max_age: float) -> Any:
    """The board's metrics row, shared by the scrapes within `max_age` seconds: the
    query reads every job, so one scrape each per request would let anyone load the
    database at will (the route needs no key)."""
    state = server_state(request)
    cache = state.metrics_cache
    async with cache.lock:  # concurrent scrapes wait for the one query
        if cache.row is None or time.monotonic() - cache.read_at >= max_age:
            cache.row = await state.board.reads.metrics(metrics.SPEED_WINDOW_SECONDS)
            cache.read_at = time.monotonic()
        return cache.row
