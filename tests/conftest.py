"""Shared fixtures: a real PostgreSQL (embedded, or TEST_DATABASE_URL) and real servers."""

from __future__ import annotations

import os
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.farm import (
    BURST_SETTINGS,
    Postgres,
    ProtocolWorker,
    Server,
    create_database,
    free_port,
)

# What the quick tier (./dev test -m "not slow", under half the time) leaves out: whole farms
# transcribing with the real model, real speech, a browser, fuzzing, chaos. The whole
# suite (./dev test, and CI) runs everything.
SLOW = (
    "tests/chaos/",
    "tests/browser/",
    "tests/integration/test_farm.py",
    "tests/integration/test_fidelity.py",
    "tests/integration/test_realspeech.py",
    "tests/integration/test_fuzz.py",
    "tests/integration/test_autoscaler.py",
    "tests/integration/test_bad_media.py",
    "tests/integration/test_cli_up.py",
    "tests/integration/test_audio.py::test_an_hour_is_planned_in_bounded_memory",
    "tests/integration/test_api.py::test_a_large_upload_streams_to_storage_with_flat_server_memory",
)


def pytest_collection_modifyitems(items: list[pytest.Item]) -> None:
    for item in items:
        if item.nodeid.startswith(SLOW):
            item.add_marker(pytest.mark.slow)


@pytest.fixture(scope="session")
def postgres_url(tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    """The PostgreSQL server the tests create their databases on."""
    if url := os.environ.get("TEST_DATABASE_URL"):
        yield url
        return
    pg = Postgres(tmp_path_factory.mktemp("postgres"))
    yield pg.uri


@pytest.fixture(scope="module")
def make_server(
    postgres_url: str, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Callable[..., Server]]:
    """Starts servers on fresh databases; each stops when the module's tests are done."""
    servers: list[Server] = []

    def start(**settings: object) -> Server:
        data_dir: Path = tmp_path_factory.mktemp("farm")
        settings = {**BURST_SETTINGS, **settings}
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


@pytest.fixture
def submitter(server: Server, keys: dict[str, str]) -> Iterator[httpx.Client]:
    """An API client with the module's submit key."""
    with server.client(keys["submit"]) as client:
        yield client


@pytest.fixture
def worker(server: Server, keys: dict[str, str]) -> Iterator[ProtocolWorker]:
    """A registered worker speaking the protocol, whose results the test chooses."""
    w = ProtocolWorker(server, keys["worker"])
    yield w
    w.close()


@pytest.fixture(scope="session")
def media(tmp_path_factory: pytest.TempPathFactory):
    """Speech from known text and its conversions, made once per session."""
    from tests.speech import shared_media

    return shared_media(tmp_path_factory)


@dataclass(frozen=True)
class S3Server:
    """An empty bucket on a real S3 API server on loopback, and how to reach it."""

    endpoint_url: str
    bucket: str
    region: str = "us-east-1"
    access_key_id: str = "test-access-key"
    secret_access_key: str = "test-secret-key"

    @property
    def env(self) -> dict[str, str]:
        """The environment that points a server process (or Settings()) at the bucket."""
        return {
            "SCRIBEFARM_S3_BUCKET": self.bucket,
            "SCRIBEFARM_S3_ENDPOINT_URL": self.endpoint_url,
            "SCRIBEFARM_S3_REGION": self.region,
            "SCRIBEFARM_S3_ACCESS_KEY_ID": self.access_key_id,
            "SCRIBEFARM_S3_SECRET_ACCESS_KEY": self.secret_access_key,
        }

    @property
    def settings(self) -> dict[str, str]:
        """The same, as keyword arguments for `make_server`."""
        return {k.removeprefix("SCRIBEFARM_").lower(): v for k, v in self.env.items()}

    def client(self):  # -> botocore S3 client
        """A boto3 client for the bucket (moto brings boto3), for setup and checks."""
        import boto3

        return boto3.client(
            "s3",
            endpoint_url=self.endpoint_url,
            region_name=self.region,
            aws_access_key_id=self.access_key_id,
            aws_secret_access_key=self.secret_access_key,
        )


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    """moto's S3 in server mode: a real S3 HTTP API (multipart uploads, presigned GETs,
    Range) on a loopback port, shared by the session; every test gets its own bucket."""
    from moto.server import ThreadedMotoServer

    port = free_port()
    moto = ThreadedMotoServer(ip_address="127.0.0.1", port=port, verbose=False)
    moto.start()
    yield f"http://127.0.0.1:{port}"
    moto.stop()


@pytest.fixture
def s3_server(moto_endpoint: str) -> S3Server:
    """A fresh, empty bucket on the loopback S3 server."""
    s3 = S3Server(moto_endpoint, f"scribefarm-{uuid.uuid4().hex[:12]}")
    s3.client().create_bucket(Bucket=s3.bucket)
    return s3
