"""What the server's routes share, typed: one `ServerState` per application, made by
create_app and completed by its lifespan (the board and the waiters need the database).
Routes reach it with `server_state(request)`, never through `request.app.state`."""

from __future__ import annotations

import asyncio
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from fastapi import Request

if TYPE_CHECKING:
    from server.auth import KeyCache
    from server.board import Board
    from server.dashboard import DashboardState
    from server.dashboard.events import OpenStreams
    from server.doorbell import Doorbell
    from server.leadership import Leadership
    from server.notifications import FinishedWaiter
    from server.probes import ProbeLimiter
    from server.settings import Settings
    from server.storage import Storage


@dataclass
class MetricsCache:
    """The board's metrics row and when it was read, shared by the scrapes of a few
    seconds (api/metrics.py)."""

    lock: asyncio.Lock = field(default_factory=asyncio.Lock)
    read_at: float = 0.0
    row: Any = None


@dataclass
class ServerState:
    settings: Settings
    storage: Storage
    keys: KeyCache
    probes: ProbeLimiter
    dashboard: DashboardState
    open_streams: OpenStreams
    metrics_cache: MetricsCache = field(default_factory=MetricsCache)
    # From the lifespan on: what needs the database.
    board: Board = field(init=False)
    doorbell: Doorbell = field(init=False)
    finished: FinishedWaiter = field(init=False)
    leadership: Leadership = field(init=False)


def server_state(request: Request) -> ServerState:
    return request.app.state.server
