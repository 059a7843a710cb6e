"""Dashboard sessions: a signed cookie naming the API key a person signed in with (by
its id, never the key itself), and a CSRF token per session that every form carries.

The key behind a session is looked up again every few seconds, so a revoked or
expired key loses its sessions as quickly as it loses API access.
"""

from __future__ import annotations

import hashlib
import hmac
import secrets
import time
from dataclasses import dataclass
from uuid import UUID

from fastapi import Request
from fastapi.responses import Response

from server.auth import CACHE_SECONDS, Caller
from server.errors import ApiError
from server.state import server_state
from server.uploads import MAX_FIELD_BYTES, MAX_FIELDS

COOKIE = "scribefarm_session"
SESSION_SECONDS = 12 * 3600
CSRF_FIELD = "csrf_token"
CSRF_HEADER = "x-csrf-token"
DASHBOARD_ROLES = ("submit", "admin")


@dataclass(frozen=True)
class Session:
    """A browser's session: a random nonce (its CSRF token derives from it), the key it
    signed in with, if any, and when it began."""

    nonce: str
    key_id: UUID | None
    issued_at: int

    @classmethod
    def new(cls, key_id: UUID | None = None) -> Session:
        return cls(secrets.token_urlsafe(18), key_id, int(time.time()))

    @property
    def expired(self) -> bool:
        return time.time() - self.issued_at > SESSION_SECONDS


class SessionSigner:
    """Signs session cookies and CSRF tokens with a key derived from the board's
    signing secret (so they can never pass for signed media links, nor these for them)."""

    def __init__(self, secret: bytes):
        self.key = hmac.new(secret, b"scribefarm dashboard sessions", hashlib.sha256).digest()

    def sign(self, message: str) -> str:
        return hmac.new(self.key, message.encode(), hashlib.sha256).hexdigest()

    def encode(self, session: Session) -> str:
        payload = f"{session.nonce}.{session.key_id or '-'}.{session.issued_at}"
        return f"{payload}.{self.sign('session|' + payload)}"

    def decode(self, cookie: str | None) -> Session | None:
        """The session in a cookie, when its signature holds and it has not expired."""
        parts = (cookie or "").split(".")
        if len(parts) != 4:
            return None
        payload = ".".join(parts[:3])
        if not hmac.compare_digest(self.sign("session|" + payload), parts[3]):
            return None
        nonce, key_id, issued_at = parts[:3]
        session = Session(nonce, None if key_id == "-" else UUID(key_id), int(issued_at))
        return None if session.expired else session

    def csrf_token(self, session: Session) -> str:
        return self.sign("csrf|" + session.nonce)

    def csrf_valid(self, session: Session, token: str | None) -> bool:
        return token is not None and hmac.compare_digest(self.csrf_token(session), token)


@dataclass(frozen=True)
class Viewer:
    """The person looking: the key they signed in with, and their session."""

    key_id: UUID
    role: str
    name: str
    prefix: str
    session: Session

    @property
    def caller(self) -> Caller:
        return Caller(self.key_id, self.role)

    @property
    def is_admin(self) -> bool:
        return self.role == "admin"

    @property
    def owner_filter(self) -> UUID | None:
        return self.caller.owner_filter


@dataclass(frozen=True)
class KeyInfo:
    role: str
    name: str
    prefix: str


class SessionKeys:
    """The keys of signed-in sessions by id, each looked up again after CACHE_SECONDS."""

    def __init__(self) -> None:
        self._entries: dict[UUID, tuple[float, KeyInfo | None]] = {}

    async def usable(self, board, key_id: UUID) -> KeyInfo | None:
        """The key, while it is neither revoked nor expired and may use the dashboard."""
        hit = self._entries.get(key_id)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        row = await board.keys.find_by_id(key_id)
        info = None
        if row and not row["revoked"] and not row["expired"] and row["role"] in DASHBOARD_ROLES:
            info = KeyInfo(row["role"], row["name"], row["prefix"])
        if len(self._entries) > 10_000:
            self._entries.clear()
        self._entries[key_id] = (time.monotonic() + CACHE_SECONDS, info)
        return info


class SignInRequired(ApiError):
    """No session, or its key can no longer be used: a page sends the browser to sign
    in; a script gets 401."""

    def __init__(self) -> None:
        super().__init__(401, "signed_out", "sign in to the dashboard with an API key")


def set_cookie(request: Request, response: Response, signer: SessionSigner, session: Session):
    response.set_cookie(
        COOKIE,
        signer.encode(session),
        max_age=SESSION_SECONDS,
        httponly=True,
        samesite="lax",
        secure=request.url.scheme == "https",
    )


async def current_viewer(request: Request) -> Viewer:
    """Dependency: the signed-in viewer of this request, or SignInRequired."""
    dashboard = server_state(request).dashboard
    session = dashboard.signer.decode(request.cookies.get(COOKIE))
    if session is None or session.key_id is None:
        raise SignInRequired()
    info = await dashboard.keys.usable(server_state(request).board, session.key_id)
    if info is None:
        raise SignInRequired()
    return Viewer(session.key_id, info.role, info.name, info.prefix, session)


def small_form(request: Request):
    """The dashboard's forms are a few short fields and never files: parse them with
    caps to match (the whole body is capped before this, by server/bodylimit.py)."""
    return request.form(max_files=0, max_fields=MAX_FIELDS, max_part_size=MAX_FIELD_BYTES)


async def check_csrf(request: Request, session: Session) -> None:
    """Every form carries the session's CSRF token: in a field, or (scripts) a header."""
    token = request.headers.get(CSRF_HEADER)
    content_type = request.headers.get("content-type", "")
    if token is None and content_type.startswith("application/x-www-form-urlencoded"):
        token = (await small_form(request)).get(CSRF_FIELD)
    if not server_state(request).dashboard.signer.csrf_valid(session, token):
        raise ApiError(
            403,
            "csrf_failed",
            "this form is out of date or came from another site: reload the page and try again",
        )
