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
from collections.abc import AsyncIterator, Mapping

from fastapi import APIRouter, Request
from fastapi.responses import StreamingResponse

from server.dashboard.pages import CurrentViewer, HtmlErrors
from server.dashboard.screens import SCREENS, Screen, render_fragments
from server.dashboard.session import SignInRequired, Viewer
from server.errors import ApiError

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
    return StreamingResponse(
        stream(request, viewer, screen, request.query_params),
        media_type="text/event-stream",
        headers={"Cache-Control": "no-store", "X-Accel-Buffering": "no"},
    )


async def stream(
    request: Request, viewer: Viewer, screen: Screen, params: Mapping[str, str]
) -> AsyncIterator[str]:
    state = request.app.state
    sent: dict[str, str] = {}  # fragment -> digest of the HTML last sent
    memo: dict = {}  # what a screen keeps between ticks
    quiet_since = time.monotonic()
    yield f"retry: {RECONNECT_MILLISECONDS}\n\n"
    while not await request.is_disconnected():
        try:
            if await state.dashboard.keys.usable(state.board, viewer.key_id) is None:
                raise SignInRequired()
            context = await screen.load(request, viewer, params, memo)
        except ApiError:
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
