"""Object storage for sources and large results: a local directory by default.

Workers never hold storage credentials: they read through signed, time-limited URLs.
"""

from __future__ import annotations

import hashlib
import hmac
import os
import time
from collections.abc import AsyncIterator
from pathlib import Path

import anyio

from server.errors import ApiError


class LocalStorage:
    def __init__(self, root: Path, secret: bytes):
        self.root = root
        self.secret = secret
        root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        path = (self.root / key).resolve()
        if not path.is_relative_to(self.root.resolve()):
            raise ApiError(400, "bad_key", "storage keys cannot leave the storage directory")
        return path

    async def write(self, key: str, chunks: AsyncIterator[bytes]) -> int:
        """Streams `chunks` into `key`; returns the size. Written under a temporary name
        and renamed, so a reader never sees half an object."""
        path = self.path(key)
        path.parent.mkdir(parents=True, exist_ok=True)
        partial = path.with_name(path.name + ".partial")
        size = 0
        try:
            async with await anyio.open_file(partial, "wb") as f:
                async for chunk in chunks:
                    await f.write(chunk)
                    size += len(chunk)
            os.replace(partial, path)
        finally:
            partial.unlink(missing_ok=True)
        return size

    async def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    def signed_path(self, key: str, ttl_seconds: float) -> str:
        expires = int(time.time() + ttl_seconds)
        return f"/v1/media/{key}?expires={expires}&signature={self.signature(key, expires)}"

    def signature(self, key: str, expires: int) -> str:
        message = f"{key}\n{expires}".encode()
        return hmac.new(self.secret, message, hashlib.sha256).hexdigest()

    def verify(self, key: str, expires: int, signature: str) -> Path:
        if expires < time.time():
            raise ApiError(403, "link_expired", "this media link has expired; claim the job again")
        if not hmac.compare_digest(self.signature(key, expires), signature):
            raise ApiError(403, "bad_signature", "this media link's signature does not match")
        path = self.path(key)
        if not path.exists():
            raise ApiError(404, "not_found", f"no object {key}")
        return path
