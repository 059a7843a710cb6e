"""Per-key limits on URL probes: each submitted URL is fetched by the server (the
guard's probe, shared/urlguard.py), and a probe that fails creates no transcription,
so the submission limits alone never counted it. Without this, one key could have the
server probe hosts without end, tying up the threads probes run in.

Counted in this server process (a board with several server processes allows that many
times as much): probes in the last minute up to SCRIBEFARM_SUBMISSIONS_PER_MINUTE, and
at most PROBES_AT_ONCE at the same time.
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import defaultdict, deque
from collections.abc import Iterator
from uuid import UUID

from server.errors import ApiError

PROBES_AT_ONCE = 2
WINDOW_SECONDS = 60.0


class ProbeLimiter:
    def __init__(self, per_minute: int) -> None:
        self.per_minute = per_minute
        self.recent: dict[UUID, deque[float]] = defaultdict(deque)
        self.running: dict[UUID, int] = defaultdict(int)

    @contextlib.contextmanager
    def probe(self, owner: UUID) -> Iterator[None]:
        """Counts one probe for `owner`, or raises 429 when it is over a limit."""
        now = time.monotonic()
        recent = self.recent[owner]
        while recent and recent[0] <= now - WINDOW_SECONDS:
            recent.popleft()
        if len(recent) >= self.per_minute:
            wait = max(1, math.ceil(recent[0] + WINDOW_SECONDS - now))
            raise ApiError(
                429,
                "too_many_probes",
                f"this key had {len(recent)} URLs fetched in the last minute; the limit is "
                f"{self.per_minute} a minute (SCRIBEFARM_SUBMISSIONS_PER_MINUTE), failed ones "
                f"included. Try again in {wait} s.",
                {"Retry-After": str(wait)},
            )
        if self.running[owner] >= PROBES_AT_ONCE:
            raise ApiError(
                429,
                "too_many_probes",
                f"this key already has {PROBES_AT_ONCE} URLs being fetched; submit the next "
                "when one of them is answered",
                {"Retry-After": "5"},
            )
        recent.append(now)
        self.running[owner] += 1
        try:
            yield
        finally:
            self.running[owner] -= 1
            if not self.running[owner]:
                del self.running[owner]
