"""Liveness and readiness for load balancers and orchestrators."""

from __future__ import annotations

from fastapi import APIRouter, Request

from server.errors import ApiError, error_responses

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
async def readyz(request: Request) -> dict[str, str]:
    try:
        await request.app.state.board.ping()
    except Exception as exc:
        message = f"the board's database is unreachable: {exc}"
        raise ApiError(503, "database_unavailable", message) from exc
    return {"status": "ready"}
