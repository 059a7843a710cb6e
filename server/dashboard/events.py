"""Live updates: one server-sent event stream per open page.

Each tick runs the page's one query, renders the page's fragments and sends those
whose HTML changed since the last tick (nothing at all when nothing changed). The
stream ends when the browser goes away; it asks the page to `reload` when it cannot
go on (the key behind the session was revoked, the transcription deleted): the page
then shows why.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import time
from collections import Counter
from collections.abc import AsyncIterator, Mapping
from uuid import UUID

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from server.board.errors import BoardError
from server.dashboard.pages import CurrentViewer, HtmlErrors
from server.dashboard.screens import SCREENS, Screen, render_fragments
from server.dashboard.session import SignInRequired, Viewer
from server.errors import ApiError
from server.state import server_state

# Each open stream runs its page's query every tick: one session (or one key, through
# many sessions) opening streams without end would load the board at will.
MAX_STREAMS_PER_SESSION = 8  # a person's open tabs
MAX_STREAMS_PER_KEY = 32
KEEPALIVE_SECONDS = 15.0  # a comment now and then keeps proxies from closing the stream
RECONNECT_MILLISECONDS = 3000

router = APIRouter(route_class=HtmlErrors, include_in_schema=False)


@router.get("/events/{name}")
async def events(request: Request, name: str, viewer: CurrentViewer) -> StreamingResponse:
    screen = SCREENS.get(name)
    if screen is None:
        raise ApiError(404, "not_found", f"no page {name!r}")
    if screen.admin_only and not viewer.is_admin:
        raise ApiError(403, "forbidden", "this page is for admin keys")
    counter = server_state(request).open_streams
    counter.open(viewer)
    return StreamingResponse(
        counted(stream(request, viewer, screen, request.query_params), counter, viewer),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


class OpenStreams:
    """Live streams open in this server process, by session and by key."""

    def __init__(self) -> None:
        self.sessions: Counter[str] = Counter()
        self.keys: Counter[UUID] = Counter()

    def open(self, viewer: Viewer) -> None:
        session, key = viewer.session.nonce, viewer.key_id
        if (
            self.sessions[session] >= MAX_STREAMS_PER_SESSION
            or self.keys[key] >= MAX_STREAMS_PER_KEY
        ):
            raise ApiError(
                429,
                "too_many_streams",
                f"this session has {self.sessions[session]} live pages open (at most "
                f"{MAX_STREAMS_PER_SESSION}; {MAX_STREAMS_PER_KEY} for one key): close some "
                "tabs, then reload",
                {"Retry-After": "10"},
            )
        self.sessions[session] += 1
        self.keys[key] += 1

    def close(self, viewer: Viewer) -> None:
        self.sessions[viewer.session.nonce] -= 1
        self.keys[viewer.key_id] -= 1
        self.sessions += Counter()  # drops the zeros
        self.keys += Counter()


async def counted(
    events: AsyncIterator[str], counter: OpenStreams, viewer: Viewer
) -> AsyncIterator[str]:
    """The stream's events; it stops counting when the stream ends, however it ends."""
    try:
        async for event in events:
            yield event
    finally:
        counter.close(viewer)


async def stream(
    request: Request, viewer: Viewer, screen: Screen, params: Mapping[str, str]
) -> AsyncIterator[str]:
    state = server_state(request)
    sent: dict[str, str] = {}  # fragment -> digest of the HTML last sent
    memo: dict = {}  # what a screen keeps between ticks
    quiet_since = time.monotonic()
    yield f"retry: {RECONNECT_MILLISECONDS}\n\n"
    while not await request.is_disconnected():
        try:
            if await state.dashboard.keys.usable(state.board, viewer.key_id) is None:
                raise SignInRequired()
            context = await screen.load(request, viewer, params, memo)
        except (ApiError, BoardError):
            yield "event: reload\ndata: {}\n\n"
            return
        context |= {"viewer": viewer, "csrf": state.dashboard.signer.csrf_token(viewer.session)}
        changed = changed_fragments(render_fragments(screen, context), sent)
        if changed:
            yield f"event: fragments\ndata: {json.dumps(changed)}\n\n"
            quiet_since = time.monotonic()
        elif time.monotonic() - quiet_since > KEEPALIVE_SECONDS:
            yield ": keepalive\n\n"
            quiet_since = time.monotonic()
        await asyncio.sleep(screen.tick_seconds)


def changed_fragments(fragments: dict[str, str], sent: dict[str, str]) -> dict[str, str]:
    """The fragments whose HTML differs from what was sent last; remembers them as sent."""
    changed = {}
    for name, html in fragments.items():
        digest = hashlib.sha256(html.encode()).hexdigest()
        if sent.get(name) != digest:
            sent[name] = digest
            changed[name] = html
    return changed
