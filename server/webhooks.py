"""Webhooks: tell a submitter's URL that its transcription finished.

An outbox. Migration 0003's trigger inserts a `pending` row into webhook_deliveries in
the very transaction that finishes a transcription (succeeded, failed or canceled, by
whichever statement: the merge, a dead job, a cancel) and NOTIFYs `scribefarm_finished`.
So a webhook is queued exactly when a transcription really finished, and never for a
change that rolled back. This module is the outbox's sender; its SQL lives here with
it, as server/board/ holds the job board's. Every server process runs one sender;
several share the work through FOR UPDATE SKIP LOCKED.

One attempt, with no transaction open during the HTTP request:
1. claim (CLAIM_DUE): one statement takes due rows and pushes their next_attempt_at
   ahead by a lease, so no other sender picks them meanwhile; a sender that dies
   mid-request leaves the row due again once the lease runs out;
2. check the URL against the allow-list (shared.urlguard), on every attempt since DNS
   answers change: a refused URL fails the delivery at once;
3. POST the signed payload (docs/webhooks.md), following no redirects;
4. record the attempt (RECORD_ATTEMPT), fenced on the lease: a 2xx answer delivers it;
   anything else is retried with exponential backoff and jitter until
   SCRIBEFARM_WEBHOOK_RETRY_HOURS after the delivery was created, then it has failed.

Delivery is at least once (a sender may die after the POST, before recording it):
receivers deduplicate on the payload's `delivery_id`.
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import hmac
import json
import logging
import time
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any
from uuid import UUID

import asyncpg
import httpx

from server.notifications import FINISHED_CHANNEL, Notifications
from server.settings import Settings
from shared.urlguard import UrlRefused, UrlUnreachable, send_pinned

log = logging.getLogger(__name__)


SIGNATURE_HEADER = "Scribefarm-Signature"
USER_AGENT = "scribefarm-webhooks/1"
CONCURRENCY = 16  # deliveries in flight per server process
IDLE_POLL_SECONDS = 5.0  # the fallback for NOTIFYs missed while reconnecting

# Walks ix_webhook_deliveries_due (next_attempt_at, over pending rows only) in order;
# SKIP LOCKED lets the senders of several server processes pass each other. The lease
# is next_attempt_at pushed $2 seconds ahead: the row is not due again until the
# attempt is recorded or the lease runs out. The new next_attempt_at is the fence
# RECORD_ATTEMPT names.
CLAIM_DUE = """
WITH due AS (
    SELECT id FROM webhook_deliveries
    WHERE state = 'pending' AND next_attempt_at <= now()
    ORDER BY next_attempt_at
    LIMIT $1
    FOR UPDATE SKIP LOCKED
)
UPDATE webhook_deliveries d
SET next_attempt_at = now() + make_interval(secs => $2)
FROM due WHERE d.id = due.id
RETURNING d.id, d.transcription_id, d.url, d.status, d.attempts + 1 AS attempt,
          d.next_attempt_at AS lease
"""

# Primary key lookup; fenced on the lease (next_attempt_at as CLAIM_DUE set it), so an
# attempt whose lease ran out and was taken over records nothing. $4: delivered (2xx);
# $5: give up now (the URL is refused). Otherwise the next attempt comes after an
# exponential backoff with jitter ($7 seconds doubling per attempt, at most $8), from
# the database clock, but no later than the end of the retry window ($6 seconds after
# creation); an attempt that fails once the window is over fails the delivery.
RECORD_ATTEMPT = """
UPDATE webhook_deliveries
SET attempts = attempts + 1,
    history = history || jsonb_build_array($3::jsonb),
    state = CASE
        WHEN $4 THEN 'delivered'
        WHEN $5 OR now() >= created_at + make_interval(secs => $6) THEN 'failed'
        ELSE 'pending'
    END,
    delivered_at = CASE WHEN $4 THEN now() END,
    next_attempt_at = least(
        created_at + make_interval(secs => $6),
        now() + make_interval(
            secs => least($8::float8, $7::float8 * power(2, attempts)) * (0.5 + random())
        )
    )
WHERE id = $1 AND next_attempt_at = $2 AND state = 'pending'
RETURNING state, next_attempt_at
"""

# Uses ix_webhook_deliveries_due (its smallest key): how long the sender may sleep.
NEXT_DUE = """
SELECT extract(epoch FROM min(next_attempt_at) - now())::float8
FROM webhook_deliveries WHERE state = 'pending'
"""

# Uses ix_webhook_deliveries_transcription (transcription_id, created_at). A retried
# transcription that finishes again has a delivery per finish.
LIST_DELIVERIES = """
SELECT id, url, status, state, attempts, history, created_at, delivered_at,
       CASE WHEN state = 'pending' THEN next_attempt_at END AS next_attempt_at
FROM webhook_deliveries
WHERE transcription_id = $1
ORDER BY created_at, id
"""


def signature(secret: bytes, body: bytes, timestamp: int) -> str:
    """The Scribefarm-Signature header: HMAC-SHA256 over "<timestamp>.<body>"."""
    mac = hmac.new(secret, f"{timestamp}.".encode() + body, hashlib.sha256).hexdigest()
    return f"t={timestamp},v1={mac}"


def payload(row: asyncpg.Record) -> bytes:
    return json.dumps(
        {
            "id": str(row["transcription_id"]),
            "status": row["status"],
            "delivery_id": str(row["id"]),
            "attempt": row["attempt"],
        },
        separators=(",", ":"),
    ).encode()


async def deliveries(pool: asyncpg.Pool, transcription_id: UUID) -> list[asyncpg.Record]:
    return await pool.fetch(LIST_DELIVERIES, transcription_id)


@dataclass(frozen=True)
class Outcome:
    status_code: int | None = None
    error: str | None = None
    delivered: bool = False
    give_up: bool = False


class WebhookSender:
    """Sends due deliveries, up to CONCURRENCY at once, until cancelled."""

    def __init__(self, pool: asyncpg.Pool, settings: Settings, notifications: Notifications):
        self.pool = pool
        self.settings = settings
        self.in_flight: set[asyncio.Task[None]] = set()
        self.wake = asyncio.Event()
        # A finished transcription may have queued deliveries; on (re)connecting, look
        # for whatever finished while no one listened.
        notifications.subscribe(FINISHED_CHANNEL, lambda _id: self.wake.set(), self.wake.set)

    @property
    def lease_seconds(self) -> float:
        """Longer than any attempt can take: the URL check, then the request's timeout."""
        return 2 * self.settings.webhook_timeout_seconds + 30

    async def run(self) -> None:
        try:
            # No kept-alive connections: requests go to pinned addresses, and a connection
            # opened (and its certificate checked) for one host must not carry another's.
            async with httpx.AsyncClient(
                timeout=self.settings.webhook_timeout_seconds,
                headers={"User-Agent": USER_AGENT},
                limits=httpx.Limits(max_keepalive_connections=0),
            ) as http:
                while True:
                    self.wake.clear()  # before looking, so a NOTIFY meanwhile is kept
                    sleep = await self.send_due(http)
                    with contextlib.suppress(TimeoutError):
                        await asyncio.wait_for(self.wake.wait(), sleep)
        finally:
            tasks = list(self.in_flight)
            for task in tasks:
                task.cancel()
            await asyncio.gather(*tasks, return_exceptions=True)

    async def send_due(self, http: httpx.AsyncClient) -> float:
        """Starts what is due; returns how long to sleep unless woken."""
        try:
            free = CONCURRENCY - len(self.in_flight)
            if free <= 0:
                return IDLE_POLL_SECONDS  # a finishing delivery wakes the loop
            for row in await self.pool.fetch(CLAIM_DUE, free, self.lease_seconds):
                task = asyncio.create_task(self.deliver(http, row))
                self.in_flight.add(task)
                task.add_done_callback(self.done)
            due_in = await self.pool.fetchval(NEXT_DUE)
        except Exception as exc:  # the sender must outlive any one failure
            log.warning("webhook sender could not read its outbox, trying again: %s", exc)
            return IDLE_POLL_SECONDS
        if due_in is None:
            return IDLE_POLL_SECONDS
        return min(IDLE_POLL_SECONDS, max(due_in, 0.05))

    def done(self, task: asyncio.Task[None]) -> None:
        self.in_flight.discard(task)
        self.wake.set()

    async def deliver(self, http: httpx.AsyncClient, row: asyncpg.Record) -> None:
        started = datetime.now(UTC)
        clock = time.monotonic()
        try:
            outcome = await self.attempt(http, row)
        except Exception as exc:  # recorded as a failed attempt, never lost
            log.exception("webhook delivery %s crashed", row["id"])
            outcome = Outcome(error=f"internal error: {type(exc).__name__}: {exc}")
        entry: dict[str, Any] = {
            "at": started.isoformat(),
            "status_code": outcome.status_code,
            "error": outcome.error,
            "milliseconds": round((time.monotonic() - clock) * 1000),
        }
        try:
            recorded = await self.pool.fetchrow(
                RECORD_ATTEMPT,
                row["id"],
                row["lease"],
                entry,
                outcome.delivered,
                outcome.give_up,
                self.settings.webhook_retry_hours * 3600,
                self.settings.webhook_retry_base_seconds,
                self.settings.webhook_retry_max_seconds,
            )
        except (OSError, asyncpg.PostgresError, asyncpg.InterfaceError) as exc:
            # Sent again once the lease runs out: at least once.
            log.warning("could not record webhook delivery %s: %s", row["id"], exc)
            return
        where = f"webhook {row['id']} ({row['status']}) to {row['url']}, attempt {row['attempt']}"
        if recorded is None:
            log.warning("%s: its lease ran out before the attempt was recorded", where)
        elif recorded["state"] == "delivered":
            log.info("%s: delivered", where)
        elif recorded["state"] == "failed":
            log.warning("%s: failed for good: %s", where, outcome.error)
        else:
            log.info("%s: %s; next at %s", where, outcome.error, recorded["next_attempt_at"])

    async def attempt(self, http: httpx.AsyncClient, row: asyncpg.Record) -> Outcome:
        body = payload(row)
        headers = [
            ("Content-Type", "application/json"),
            (
                SIGNATURE_HEADER,
                signature(self.settings.webhook_signing_secret, body, int(time.time())),
            ),
        ]
        timeout = self.settings.webhook_timeout_seconds
        try:
            # The whole exchange, DNS included, not each read: a receiver dripping bytes
            # cannot hold a slot. The answer's body is never read.
            async with asyncio.timeout(timeout):
                response = await send_pinned(
                    http, "POST", row["url"], self.settings.allowlist, headers=headers, content=body
                )
                await response.aclose()
        except UrlRefused as exc:
            return Outcome(error=f"refused: {exc}", give_up=True)
        except UrlUnreachable as exc:
            return Outcome(error=str(exc))
        except (TimeoutError, httpx.TimeoutException):
            return Outcome(
                error=f"no answer within {timeout:g} s (SCRIBEFARM_WEBHOOK_TIMEOUT_SECONDS)"
            )
        except httpx.HTTPError as exc:
            return Outcome(error=f"request failed: {str(exc) or type(exc).__name__}")
        code = response.status_code
        if response.is_success:
            return Outcome(status_code=code, delivered=True)
        if response.is_redirect:
            where = response.headers.get("location", "elsewhere")
            return Outcome(
                status_code=code,
                error=f"answered HTTP {code} redirecting to {where}; webhooks do not follow "
                "redirects: give the final URL as webhook_url",
            )
        return Outcome(status_code=code, error=f"answered HTTP {code}; a 2xx answer is needed")
