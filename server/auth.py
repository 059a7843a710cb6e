"""API keys and roles.

Keys are random 256-bit tokens shown once; the board stores only their sha256. Every
route names the roles it admits with `allow(...)`; the OpenAPI schema lists them under
`x-scribefarm-roles`, which the tests walk so no route can slip through unchecked.
"""

from __future__ import annotations

import hmac
import time
from dataclasses import dataclass
from typing import Annotated
from uuid import UUID

from fastapi import Depends, Request
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from server.board.keys import hash_key
from server.errors import ApiError
from server.state import server_state

ROLES = ("submit", "worker", "admin")
CACHE_SECONDS = 5.0  # how long a revocation may take to be noticed
# Long waits (a worker's long poll, an OpenAI request waiting for its transcript)
# recheck their key this often, so a revocation ends them within 5 s too.
WAIT_RECHECK_SECONDS = 2.0

bearer = HTTPBearer(auto_error=False, description="An API key: `Authorization: Bearer sf_...`")


@dataclass(frozen=True)
class Caller:
    key_id: UUID
    role: str

    @property
    def owner_filter(self) -> UUID | None:
        """Admin sees everything; a submit key only what it submitted."""
        return None if self.role == "admin" else self.key_id


class KeyCache:
    """Recently seen keys, so a busy worker does not cost a lookup per request."""

    def __init__(self) -> None:
        self._entries: dict[str, tuple[float, Caller | None]] = {}
        self._active: dict[UUID, tuple[float, bool]] = {}

    async def active(self, board, key_id: UUID) -> bool:
        """Whether the key is still neither revoked nor expired, for requests that wait:
        read at most every WAIT_RECHECK_SECONDS per key, however many wait on it."""
        hit = self._active.get(key_id)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        row = await board.keys.find_by_id(key_id)
        active = row is not None and not row["expired"] and not row["revoked"]
        if len(self._active) > 10_000:
            self._active.clear()
        self._active[key_id] = (time.monotonic() + WAIT_RECHECK_SECONDS, active)
        return active

    async def lookup(self, board, key: str) -> Caller | None:
        digest = hash_key(key)
        hit = self._entries.get(digest)
        if hit is not None and hit[0] > time.monotonic():
            return hit[1]
        row = await board.keys.find(digest)
        caller = None
        # The lookup is by an index on the hash, which leaks nothing usable about the
        # key; the final comparison is constant-time all the same.
        found = row is not None and hmac.compare_digest(row["key_hash"], digest)
        if found and not row["expired"] and not row["revoked"]:
            caller = Caller(row["id"], row["role"])
        if len(self._entries) > 10_000:
            self._entries.clear()
        self._entries[digest] = (time.monotonic() + CACHE_SECONDS, caller)
        return caller


class RoleCheck:
    def __init__(self, roles: tuple[str, ...]):
        self.roles = roles

    async def __call__(
        self,
        request: Request,
        credentials: Annotated[HTTPAuthorizationCredentials | None, Depends(bearer)],
    ) -> Caller:
        if credentials is None:
            raise ApiError(
                401,
                "unauthenticated",
                "this route needs an API key: send 'Authorization: Bearer <key>' "
                "(create one with 'scribefarm keys create')",
                {"WWW-Authenticate": "Bearer"},
            )
        state = server_state(request)
        caller = await state.keys.lookup(state.board, credentials.credentials)
        if caller is None:
            raise ApiError(
                401,
                "invalid_key",
                "the API key is unknown, revoked or expired",
                {"WWW-Authenticate": "Bearer"},
            )
        if caller.role not in self.roles:
            raise ApiError(
                403,
                "forbidden",
                f"a {caller.role} key cannot use this route; it needs a key with role "
                + " or ".join(self.roles),
            )
        return caller


def key_gone() -> ApiError:
    """A waiting request's key was revoked (or expired) while it waited."""
    return ApiError(
        401,
        "invalid_key",
        "the API key was revoked or expired while this request waited",
        {"WWW-Authenticate": "Bearer"},
    )


def allow(*roles: str):
    """Dependency admitting only keys with one of `roles`; yields the Caller."""
    return Depends(RoleCheck(roles))
