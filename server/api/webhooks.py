"""A transcription's webhook deliveries and every attempt at them (docs/webhooks.md)."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal
from uuid import UUID

from fastapi import APIRouter, Request
from pydantic import BaseModel, Field

from server import webhooks
from server.auth import Caller, allow
from server.errors import error_responses
from server.state import server_state

router = APIRouter(
    prefix="/v1/transcriptions", tags=["webhooks"], responses=error_responses(401, 403, 404, 422)
)
Submitter = Annotated[Caller, allow("submit", "admin")]


class WebhookAttempt(BaseModel):
    at: datetime = Field(description="When the attempt started.")
    status_code: int | None = Field(description="The receiver's HTTP status; null if none.")
    error: str | None = Field(description="Why the attempt did not deliver; null if it did.")
    milliseconds: int = Field(description="How long the attempt took.")


class WebhookDelivery(BaseModel):
    id: UUID = Field(description="The payload's delivery_id: the same on every attempt.")
    url: str
    status: Literal["succeeded", "failed", "canceled"] = Field(
        description="The transcription state it announces."
    )
    state: Literal["pending", "delivered", "failed"]
    attempts: int
    created_at: datetime
    next_attempt_at: datetime | None = Field(description="Not before this; null once final.")
    delivered_at: datetime | None
    history: list[WebhookAttempt] = Field(description="Every attempt, oldest first.")


class WebhookDeliveries(BaseModel):
    items: list[WebhookDelivery] = Field(description="One per time it finished, oldest first.")


@router.get(
    "/{transcription_id}/webhooks",
    response_model=WebhookDeliveries,
    summary="The transcription's webhook deliveries and their attempts",
)
async def list_webhook_deliveries(
    request: Request, transcription_id: UUID, caller: Submitter
) -> WebhookDeliveries:
    board = server_state(request).board
    await board.transcriptions.get(transcription_id, caller.owner_filter)  # 404 unless the caller's
    rows = await webhooks.deliveries(board.pool, transcription_id)
    return WebhookDeliveries(items=[WebhookDelivery.model_validate(dict(r)) for r in rows])
