"""While PostgreSQL is down, the API says so (503 with Retry-After, which workers and
polite clients retry on) instead of a bare 500, and it serves again once it is back."""

from __future__ import annotations

import httpx
import pytest

from tests.farm import BURST_SETTINGS, Postgres, ProtocolWorker, Server, create_database, wait_for


@pytest.fixture
def postgres(tmp_path_factory: pytest.TempPathFactory):
    """A PostgreSQL of this test's own, to stop and start."""
    pg = Postgres(tmp_path_factory.mktemp("outage-postgres"))
    yield pg
    pg.close()


def assert_database_down(response: httpx.Response) -> None:
    assert response.status_code == 503, response.text
    assert response.json()["code"] == "database_unavailable"
    assert int(response.headers["Retry-After"]) > 0


def test_requests_answer_503_while_the_database_is_down_and_succeed_after(
    postgres, tmp_path_factory
):
    server = Server(
        create_database(postgres.uri),
        tmp_path_factory.mktemp("outage-farm"),
        BURST_SETTINGS,
    ).start()
    keys = {role: server.create_key(role) for role in ("submit", "worker")}
    worker = ProtocolWorker(server, keys["worker"])
    try:
        with server.client(keys["submit"]) as client:
            assert client.get("/v1/transcriptions").status_code == 200

            postgres.stop("fast")
            assert_database_down(client.get("/v1/transcriptions"))
            assert_database_down(client.post("/v1/transcriptions", files={"file": b"RIFF"}))
            assert_database_down(worker.http.post("/v1/jobs/claim", json={"worker_id": worker.id}))
            ready = client.get("/readyz")  # no key needed: says nothing of the database
            assert ready.status_code == 503
            assert ready.json()["message"] == (
                "the board's database is unreachable; see the server's log"
            )
            assert client.get("/healthz").status_code == 200  # the process itself is fine

            def served() -> bool:  # 503 until the pool reconnects, never anything else
                response = client.get("/v1/transcriptions")
                if response.status_code != 200:
                    assert_database_down(response)
                return response.status_code == 200

            postgres.start()
            wait_for(served, 30, "the server to reach PostgreSQL again")
            submitted = client.post("/v1/transcriptions", files={"file": ("a.wav", b"RIFF")})
            assert submitted.status_code == 201, submitted.text
            assert worker.claim(), "the submission is on the board"
    finally:
        worker.close()
        server.stop()
