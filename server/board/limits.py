"""What one key may have queued and submit: checked under LOCK_KEY at submission and
retry, and early (without the lock) before an upload is streamed."""

from __future__ import annotations

import math
from uuid import UUID

import asyncpg

from server.board.errors import OverLimit
from server.board.locks import LOCK_KEY
from server.settings import Settings

# A key's active transcriptions (ix_transcriptions_active) and its submissions in the
# last minute, retries included (ix_transcriptions_owner_created, ix_transcriptions_retried),
# with when the oldest of those leaves the minute.
KEY_USAGE = """
SELECT (SELECT count(*) FROM transcriptions
        WHERE api_key_id = $1 AND state IN ('queued', 'running')) AS active,
       count(*) AS last_minute,
       extract(epoch FROM min(submitted) + interval '1 minute' - now()) AS window_left
FROM (SELECT created_at FROM transcriptions
      WHERE api_key_id = $1 AND created_at > now() - interval '1 minute'
      UNION ALL
      SELECT retried_at FROM transcriptions
      WHERE api_key_id = $1 AND retried_at > now() - interval '1 minute') AS recent(submitted)
"""


async def hold(conn: asyncpg.Connection, settings: Settings, owner: UUID) -> None:
    """Checks under the key's lock, held to the end of the transaction: two submissions
    of one key cannot both pass the last free place."""
    await conn.execute(LOCK_KEY, str(owner))
    await check(conn, settings, owner)


async def check(conn: asyncpg.Connection, settings: Settings, owner: UUID) -> None:
    usage = await conn.fetchrow(KEY_USAGE, owner)
    active_limit = settings.max_active_per_key
    if usage["active"] >= active_limit:
        raise OverLimit(
            "too_many_active",
            f"this key has {usage['active']} transcriptions queued or running; the limit "
            f"is {active_limit} (SCRIBEFARM_MAX_ACTIVE_PER_KEY). Submit more as they finish.",
            retry_after=30,
        )
    rate_limit = settings.submissions_per_minute
    if usage["last_minute"] >= rate_limit:
        wait = max(1, math.ceil(usage["window_left"] or 1))
        raise OverLimit(
            "too_many_submissions",
            f"this key submitted {usage['last_minute']} transcriptions in the last minute; "
            f"the limit is {rate_limit} a minute (SCRIBEFARM_SUBMISSIONS_PER_MINUTE). "
            f"Try again in {wait} s.",
            retry_after=wait,
        )
