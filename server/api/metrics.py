"""GET /metrics: the Prometheus text format (server/metrics.py says what is in it)."""

from __future__ import annotations

from fastapi import APIRouter, Request, Response
from prometheus_client import CONTENT_TYPE_LATEST

from server import metrics

router = APIRouter(tags=["health"])


@router.get(
    "/metrics",
    openapi_extra={"x-scribefarm-roles": ["public"]},
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "Prometheus text"}},
)
async def prometheus_metrics(request: Request) -> Response:
    """Counts only (no names, no keys): public, like /healthz, for scrapers that cannot
    authenticate (Fly.io's)."""
    row = await request.app.state.board.metrics(metrics.SPEED_WINDOW_SECONDS)
    return Response(metrics.exposition(row), media_type=CONTENT_TYPE_LATEST)
