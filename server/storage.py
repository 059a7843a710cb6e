"""Object storage for sources and large results: a local directory by default, or any
S3-compatible bucket (AWS S3, Tigris, R2, MinIO) when SCRIBEFARM_S3_BUCKET is set.

Workers never hold storage credentials: they read through signed, time-limited URLs
(the server's own /v1/media links for the local backend, presigned GETs for S3).
"""

from __future__ import annotations

import contextlib
import hashlib
import hmac
import logging
import os
import re
import time
from collections.abc import AsyncIterator, Iterator
from datetime import timedelta
from pathlib import Path
from typing import Protocol

import anyio
import obstore
from obstore.store import S3Store

from server.errors import ApiError
from server.settings import Settings

READ_CHUNK_BYTES = 1024 * 1024
# Multipart uploads hold at most PART_BYTES × PART_CONCURRENCY of an upload in memory.
PART_BYTES = 5 * 1024 * 1024  # S3's minimum part size
PART_CONCURRENCY = 4
BUCKET_NAME = re.compile(r"[a-z0-9][a-z0-9.-]{1,61}[a-z0-9]")
log = logging.getLogger(__name__)


class Storage(Protocol):
    """What the server needs from object storage; both backends behave alike."""

    async def write(self, key: str, chunks: AsyncIterator[bytes]) -> int:
        """Streams `chunks` into `key`, returns the size; readers never see half of it."""

    async def put(self, key: str, data: bytes) -> None: ...

    def read(self, key: str) -> AsyncIterator[bytes]:
        """The object's bytes as they arrive (`async for chunk in storage.read(key)`); a
        missing object raises a 404 ApiError on the first iteration."""

    async def delete(self, key: str) -> None:
        """Deleting a missing object is fine: retried cleanups must not fail."""

    async def exists(self, key: str) -> bool: ...

    def media_url(self, key: str, ttl_seconds: float, base_url: str) -> str:
        """An absolute URL a worker GETs (with HTTP Range) to read `key` for a while."""


def open_storage(settings: Settings) -> Storage:
    """S3 when a bucket is named, else the local directory under the data directory."""
    if settings.s3_bucket:
        return S3Storage(
            settings.s3_bucket,
            endpoint_url=settings.s3_endpoint_url,
            region=settings.s3_region,
            access_key_id=settings.s3_access_key_id,
            secret_access_key=settings.s3_secret_access_key,
        )
    return LocalStorage(settings.storage_dir, settings.signing_secret)


def check_key(key: str) -> str:
    """One rule for keys on every backend, so a key that works on a laptop works on S3
    too, and none can leave the local storage directory."""
    parts = key.split("/")
    if not key.isprintable() or "\\" in key or any(p in ("", ".", "..") for p in parts):
        raise ApiError(
            400,
            "bad_key",
            f"storage key {key!r} must be relative names joined by '/', none empty, '.' or '..'",
        )
    return key


async def one_chunk(data: bytes) -> AsyncIterator[bytes]:
    yield data


class LocalStorage:
    """A directory on the server's disk; workers read it through /v1/media links the
    server signs with an HMAC and serves with Range support."""

    def __init__(self, root: Path, secret: bytes):
        self.root = root
        self.secret = secret
        root.mkdir(parents=True, exist_ok=True)

    def path(self, key: str) -> Path:
        return self.root / check_key(key)

    async def write(self, key: str, chunks: AsyncIterator[bytes]) -> int:
        """Written under a temporary name and renamed, so a reader never sees half an
        object."""
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

    async def put(self, key: str, data: bytes) -> None:
        await self.write(key, one_chunk(data))

    async def read(self, key: str) -> AsyncIterator[bytes]:
        try:
            f = await anyio.open_file(self.path(key), "rb")
        except (FileNotFoundError, IsADirectoryError) as exc:
            raise ApiError(404, "not_found", f"no object {key}") from exc
        async with f:
            while chunk := await f.read(READ_CHUNK_BYTES):
                yield chunk

    async def delete(self, key: str) -> None:
        self.path(key).unlink(missing_ok=True)

    async def exists(self, key: str) -> bool:
        return self.path(key).is_file()

    def media_url(self, key: str, ttl_seconds: float, base_url: str) -> str:
        return base_url + self.signed_path(key, ttl_seconds)

    def signed_path(self, key: str, ttl_seconds: float) -> str:
        check_key(key)
        expires = int(time.time() + ttl_seconds)
        return f"/v1/media/{key}?expires={expires}&signature={self.signature(key, expires)}"

    def signature(self, key: str, expires: int) -> str:
        message = f"{key}\n{expires}".encode()
        return hmac.new(self.secret, message, hashlib.sha256).hexdigest()

    def verify(self, key: str, expires: int, signature: str) -> Path:
        """The file behind a /v1/media link, if the link is genuine and still valid."""
        if expires < time.time():
            raise ApiError(403, "link_expired", "this media link has expired; claim the job again")
        if not hmac.compare_digest(self.signature(key, expires), signature):
            raise ApiError(403, "bad_signature", "this media link's signature does not match")
        path = self.path(key)
        if not path.exists():
            raise ApiError(404, "not_found", f"no object {key}")
        return path


class S3Storage:
    """A bucket on any S3-compatible service, through obstore. Uploads stream as
    multipart uploads (a reader sees the object only once it is complete); workers read
    through presigned GETs, so the bucket's credentials stay on the server."""

    def __init__(
        self,
        bucket: str,
        *,
        endpoint_url: str | None = None,
        region: str | None = None,
        access_key_id: str | None = None,
        secret_access_key: str | None = None,
    ):
        if not BUCKET_NAME.fullmatch(bucket) or ".." in bucket:
            raise ValueError(
                f"SCRIBEFARM_S3_BUCKET={bucket!r} is not a valid S3 bucket name: use 3 to 63 "
                "lowercase letters, digits, '.' and '-', starting and ending with a letter or digit"
            )
        config = {
            "endpoint": endpoint_url,
            "region": region,
            "access_key_id": access_key_id,
            "secret_access_key": secret_access_key,
        }
        self.bucket = bucket
        self.store = S3Store(
            bucket,
            # Path-style (endpoint/bucket/key) works on every S3-compatible service.
            virtual_hosted_style_request=False,
            # Plain http only when asked for by the endpoint (MinIO or moto on loopback).
            client_options={"allow_http": (endpoint_url or "").startswith("http://")},
            **{k: v for k, v in config.items() if v},
        )

    @contextlib.contextmanager
    def errors(self, key: str, writing: bool = False) -> Iterator[None]:
        """Storage failures become errors a person can act on, not bare 500s: the
        details (endpoint, bucket) go to the server's log, not to API clients."""
        try:
            yield
        except (FileNotFoundError, obstore.exceptions.BaseError) as exc:
            if isinstance(exc, FileNotFoundError) and not writing:
                raise ApiError(404, "not_found", f"no object {key}") from exc
            # (a write that finds nothing there found no bucket)
            log.error(
                "object storage failed on %s in bucket %s: %s. Check the SCRIBEFARM_S3_* "
                "settings, the credentials and that the bucket exists.",
                key,
                self.bucket,
                exc,
            )
            raise ApiError(
                502, "storage_error", "object storage failed; the server's log says why"
            ) from exc

    async def write(self, key: str, chunks: AsyncIterator[bytes]) -> int:
        size = 0

        async def counted() -> AsyncIterator[bytes]:
            nonlocal size
            async for chunk in chunks:
                if chunk:
                    size += len(chunk)
                    yield chunk

        with self.errors(check_key(key), writing=True):
            # An error from `chunks` (an upload over the limit) propagates unchanged and
            # obstore aborts the multipart upload: no object, no orphaned parts.
            await obstore.put_async(
                self.store,
                key,
                counted(),
                chunk_size=PART_BYTES,
                max_concurrency=PART_CONCURRENCY,
            )
        return size

    async def put(self, key: str, data: bytes) -> None:
        with self.errors(check_key(key), writing=True):
            await obstore.put_async(self.store, key, data)

    async def read(self, key: str) -> AsyncIterator[bytes]:
        with self.errors(check_key(key)):
            result = await obstore.get_async(self.store, key)
            async for chunk in result.stream(min_chunk_size=READ_CHUNK_BYTES):
                yield chunk

    async def delete(self, key: str) -> None:
        with self.errors(check_key(key)):
            await obstore.delete_async(self.store, key)

    async def exists(self, key: str) -> bool:
        with self.errors(check_key(key)):
            try:
                await obstore.head_async(self.store, key)
            except FileNotFoundError:
                return False
        return True

    def media_url(self, key: str, ttl_seconds: float, base_url: str) -> str:
        """A presigned GET straight to the bucket (`base_url` is not needed). With static
        credentials signing is local computation: no request is made."""
        with self.errors(check_key(key)):
            return obstore.sign(self.store, "GET", key, timedelta(seconds=ttl_seconds))
