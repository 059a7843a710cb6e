"""API keys: only their SHA-256 is stored; the key itself is shown once, when made."""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime, timedelta
from uuid import UUID

import asyncpg

KEY_PREFIX = "sf_"

# key_hash is unique (its index): one lookup per uncached key.
FIND_KEY = """
SELECT id, role, key_hash, (expires_at IS NOT NULL AND expires_at <= now()) AS expired,
       revoked_at IS NOT NULL AS revoked
FROM api_keys WHERE key_hash = $1
"""

# Primary key lookup: a dashboard session names its key by id, never by the key.
FIND_KEY_BY_ID = """
SELECT id, role, name, prefix, (expires_at IS NOT NULL AND expires_at <= now()) AS expired,
       revoked_at IS NOT NULL AS revoked
FROM api_keys WHERE id = $1
"""

# A handful of rows: the operator's listing.
LIST_KEYS = """
SELECT id, name, role, prefix, created_at, expires_at, revoked_at,
       (expires_at IS NOT NULL AND expires_at <= now()) AS expired
FROM api_keys ORDER BY created_at
"""

# The one active key with this id, prefix or hash (several matches: none revoked).
REVOKE_KEY = """
WITH matches AS (
    SELECT id FROM api_keys
    WHERE revoked_at IS NULL AND (id::text = $1 OR prefix = $1 OR key_hash = $2)
)
UPDATE api_keys SET revoked_at = now()
WHERE id = (SELECT id FROM matches) AND (SELECT count(*) FROM matches) = 1
RETURNING prefix
"""

INSERT_KEY = """
INSERT INTO api_keys (name, role, key_hash, prefix, expires_at) VALUES ($1, $2, $3, $4, $5)
RETURNING id
"""


class Keys:
    def __init__(self, pool: asyncpg.Pool):
        self.pool = pool

    async def find(self, key_hash: str) -> asyncpg.Record | None:
        return await self.pool.fetchrow(FIND_KEY, key_hash)

    async def find_by_id(self, key_id: UUID) -> asyncpg.Record | None:
        return await self.pool.fetchrow(FIND_KEY_BY_ID, key_id)

    async def create(self, role: str, name: str, expires_in_days: float | None) -> str:
        """A new key of `role`; returns the key itself, which is stored nowhere."""
        key = new_key()
        expires = None
        if expires_in_days is not None:
            expires = datetime.now(UTC) + timedelta(days=expires_in_days)
        await self.pool.fetchval(INSERT_KEY, name, role, hash_key(key), key[:10], expires)
        return key

    async def list(self) -> list[asyncpg.Record]:
        return await self.pool.fetch(LIST_KEYS)

    async def revoke(self, id_prefix_or_key: str) -> str | None:
        """Revokes the one active key matching an id, a prefix or the key itself;
        returns its prefix."""
        return await self.pool.fetchval(REVOKE_KEY, id_prefix_or_key, hash_key(id_prefix_or_key))


def new_key() -> str:
    return KEY_PREFIX + secrets.token_urlsafe(32)


def hash_key(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()
