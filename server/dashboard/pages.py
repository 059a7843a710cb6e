"""The dashboard's pages and forms, served by the board itself (no schema entries: the
API's OpenAPI document stays the API's)."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Annotated, Any
from urllib.parse import urlencode
from uuid import UUID

from fastapi import APIRouter, Depends, Request
from fastapi.responses import HTMLResponse, JSONResponse, RedirectResponse, Response
from fastapi.routing import APIRoute

from server import submission
from server.api import transcriptions as api
from server.board.errors import BoardError
from server.dashboard.screens import SCREENS, templates
from server.dashboard.session import (
    COOKIE,
    CSRF_FIELD,
    DASHBOARD_ROLES,
    Session,
    SignInRequired,
    Viewer,
    check_csrf,
    current_viewer,
    set_cookie,
    small_form,
)
from server.errors import ApiError, as_api_error
from server.state import server_state
from shared.protocol import TranscriptFormat

SECURITY_HEADERS = {
    # Everything is served from here; media may come from a bucket or the user's URL.
    "Content-Security-Policy": "default-src 'self'; script-src 'self'; style-src 'self'; "
    "img-src 'self' data:; media-src * blob:; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'self'",
    "X-Content-Type-Options": "nosniff",
    "Referrer-Policy": "same-origin",
    "Cache-Control": "no-store",
}


class HtmlErrors(APIRoute):
    """A browser finding an error gets a page (or the sign-in form); scripts get the
    API's JSON error."""

    def get_route_handler(self):
        handler = super().get_route_handler()

        async def handle(request: Request) -> Response:
            try:
                return await handler(request)
            except (ApiError, BoardError) as exc:
                if "text/html" not in request.headers.get("accept", ""):
                    raise
                if isinstance(exc, SignInRequired):
                    target = "/signin?" + urlencode({"next": request.url.path})
                    return RedirectResponse(target, 303)
                error = as_api_error(exc)
                return render(request, "error.html", {"error": error}, status=error.status)

        return handle


router = APIRouter(route_class=HtmlErrors, include_in_schema=False)
CurrentViewer = Annotated[Viewer, Depends(current_viewer)]


def render(
    request: Request,
    template: str,
    context: dict[str, Any],
    *,
    viewer: Viewer | None = None,
    session: Session | None = None,
    status: int = 200,
) -> HTMLResponse:
    session = session or (viewer.session if viewer else None)
    signer = server_state(request).dashboard.signer
    context = {**context, "viewer": viewer, "csrf": signer.csrf_token(session) if session else ""}
    return templates.TemplateResponse(
        request, template, context, status_code=status, headers=SECURITY_HEADERS
    )


def safe_next(target: Any) -> str:
    """Only a path on this site: never another site (open redirects)."""
    target = str(target or "/")
    return target if target.startswith("/") and not target.startswith("//") else "/"


async def show(request: Request, viewer: Viewer, name: str, params: Mapping[str, str]):
    screen = SCREENS[name]
    if screen.admin_only and not viewer.is_admin:
        raise ApiError(403, "forbidden", "this page is for admin keys")
    context = await screen.load(request, viewer, params, {})
    context |= {"page": name, "events": f"/events/{name}?{urlencode(dict(params))}"}
    return render(request, screen.template, context, viewer=viewer)


# --- signing in and out ---------------------------------------------------------------


@router.get("/signin")
async def sign_in_form(request: Request, next: str = "/") -> Response:
    dashboard = server_state(request).dashboard
    session = dashboard.signer.decode(request.cookies.get(COOKIE))
    if session is None:
        session = Session.new()
    elif session.key_id and await dashboard.keys.usable(
        server_state(request).board, session.key_id
    ):
        return RedirectResponse(safe_next(next), 303)
    response = render(request, "signin.html", {"next": safe_next(next)}, session=session)
    set_cookie(request, response, dashboard.signer, session)
    return response


@router.post("/signin")
async def sign_in(request: Request) -> Response:
    state = server_state(request)
    session = state.dashboard.signer.decode(request.cookies.get(COOKIE)) or Session.new()
    await check_csrf(request, session)
    form = await small_form(request)
    key = str(form.get("key", "")).strip()
    caller = await state.keys.lookup(state.board, key) if key else None
    problem = None
    if caller is None:
        problem = 401, "That key is unknown, revoked or expired."
    elif caller.role not in DASHBOARD_ROLES:
        problem = 403, "A worker key cannot sign in: use a submit or admin key."
    if problem:
        context = {"next": safe_next(form.get("next")), "problem": problem[1]}
        return render(request, "signin.html", context, session=session, status=problem[0])
    response = RedirectResponse(safe_next(form.get("next")), 303)
    # A new session (and CSRF token) on signing in: a planted cookie is worth nothing.
    set_cookie(request, response, state.dashboard.signer, Session.new(caller.key_id))
    return response


@router.post("/signout")
async def sign_out(request: Request, viewer: CurrentViewer) -> Response:
    await check_csrf(request, viewer.session)
    response = RedirectResponse("/signin", 303)
    response.delete_cookie(COOKIE)
    return response


# --- transcriptions -------------------------------------------------------------------


@router.get("/")
async def transcriptions_page(request: Request, viewer: CurrentViewer) -> Response:
    return await show(request, viewer, "transcriptions", request.query_params)


@router.get("/transcriptions/{transcription_id}")
async def transcription_page(
    request: Request, transcription_id: str, viewer: CurrentViewer
) -> Response:
    return await show(request, viewer, "transcription", {"id": transcription_id})


@router.post("/transcriptions")
async def upload(request: Request, viewer: CurrentViewer) -> Response:
    """The page's upload (a script, for its progress bar): the CSRF token in a header,
    checked before a byte of the file is read."""
    await check_csrf(request, viewer.session)
    row = await api.submit_upload(request, viewer.caller)
    body = {"id": str(row["id"]), "url": f"/transcriptions/{row['id']}"}
    return JSONResponse(body, status_code=201)


async def form_source(request: Request) -> submission.UrlSource:
    form = await small_form(request)
    fields = {k: v for k, v in form.items() if k != CSRF_FIELD and v != ""}
    return submission.parse_source(fields)


@router.post("/transcriptions/from-url")
async def submit_url(request: Request, viewer: CurrentViewer) -> Response:
    await check_csrf(request, viewer.session)
    source = await form_source(request)
    row = await submission.from_url(server_state(request), viewer.caller, source)
    return RedirectResponse(f"/transcriptions/{row['id']}", 303)


@router.post("/transcriptions/{transcription_id}/cancel")
async def cancel(request: Request, transcription_id: UUID, viewer: CurrentViewer) -> Response:
    await check_csrf(request, viewer.session)
    await server_state(request).board.transcriptions.cancel(transcription_id, viewer.owner_filter)
    return RedirectResponse(safe_next((await small_form(request)).get("next")), 303)


@router.post("/transcriptions/{transcription_id}/retry")
async def retry(request: Request, transcription_id: UUID, viewer: CurrentViewer) -> Response:
    await check_csrf(request, viewer.session)
    await server_state(request).board.transcriptions.retry(transcription_id, viewer.owner_filter)
    return RedirectResponse(safe_next((await small_form(request)).get("next")), 303)


@router.get("/transcriptions/{transcription_id}/transcript")
async def download(
    request: Request,
    transcription_id: UUID,
    viewer: CurrentViewer,
    format: TranscriptFormat = "txt",
) -> Response:
    return await api.get_transcript(request, transcription_id, viewer.caller, format)


@router.get("/transcriptions/{transcription_id}/media")
async def media(request: Request, transcription_id: UUID, viewer: CurrentViewer) -> Response:
    """The source, for the page's audio player: a short-lived signed link to storage, or
    the URL it was submitted from."""
    state = server_state(request)
    row = await state.board.reads.transcription(transcription_id, viewer.owner_filter)
    if row["source_url"]:
        return RedirectResponse(row["source_url"], 307)
    base_url = str(request.base_url).rstrip("/")
    ttl = state.settings.signed_url_seconds
    return RedirectResponse(state.storage.media_url(row["source_key"], ttl, base_url), 307)


# --- workers and the board (admin) ----------------------------------------------------


@router.get("/workers")
async def workers_page(request: Request, viewer: CurrentViewer) -> Response:
    return await show(request, viewer, "workers", {})


@router.get("/board")
async def board_page(request: Request, viewer: CurrentViewer) -> Response:
    return await show(request, viewer, "board", {})


@router.post("/board/jobs/{job_id}/requeue")
async def requeue(request: Request, job_id: UUID, viewer: CurrentViewer) -> Response:
    await check_csrf(request, viewer.session)
    if not viewer.is_admin:
        raise ApiError(403, "forbidden", "only admin keys can requeue jobs")
    await server_state(request).board.transcriptions.requeue_dead_job(job_id)
    return RedirectResponse("/board", 303)
