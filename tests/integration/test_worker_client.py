"""The worker's board client against a real HTTP server that misbehaves on cue:
transient failures are retried, other 4xx are not, 409 means the lease is lost."""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
import pytest

from shared.protocol import ChunkPlan, ClaimedJob
from tests.farm import free_port
from worker.client import BoardClient, BoardError, LeaseLost


class Scripted(BaseHTTPRequestHandler):
    """Answers each request with the next (status, body) of the script."""

    script: list[tuple[int, dict]] = []
    seen: list[str] = []

    def do_POST(self) -> None:  # noqa: N802 (http.server's naming)
        self.rfile.read(int(self.headers.get("content-length", 0)))
        Scripted.seen.append(self.path)
        status, body = Scripted.script.pop(0)
        payload = json.dumps(body).encode()
        self.send_response(status)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(payload)))
        if status == 429:
            self.send_header("retry-after", "0")
        self.end_headers()
        self.wfile.write(payload)

    def log_message(self, *args: object) -> None:
        pass


@pytest.fixture
def board() -> Iterator[str]:
    Scripted.script, Scripted.seen = [], []
    server = ThreadingHTTPServer(("127.0.0.1", 0), Scripted)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()


JOB = ClaimedJob.model_validate(
    {
        "id": str(uuid.uuid4()),
        "kind": "chunk",
        "lease_id": str(uuid.uuid4()),
        "lease_expires_at": "2026-01-01T00:00:00Z",
        "attempt": 1,
        "transcription_id": str(uuid.uuid4()),
        "source_url": "http://x/y",
        "options": {},
        "model": "tiny.en",
        "chunk_target_seconds": 60,
        "chunk_max_seconds": 120,
    }
)


def run(coro):
    return asyncio.run(coro)


def test_5xx_and_429_are_retried_until_the_board_answers(board):
    ok = (200, {"lease_expires_at": "2026-01-01T00:00:00Z"})
    Scripted.script = [(503, {}), (500, {}), (429, {}), ok]
    client = BoardClient(board, "sf_key")
    run(client.heartbeat(JOB))
    assert len(Scripted.seen) == 4


def test_connection_errors_are_retried_for_the_retry_period():
    client = BoardClient(f"http://127.0.0.1:{free_port()}", "sf_key", retry_seconds=1.5)
    started = time.monotonic()
    with pytest.raises(httpx.ConnectError):
        run(client.heartbeat(JOB))
    assert time.monotonic() - started >= 1.5  # kept trying, then gave up


def test_4xx_is_not_retried(board):
    Scripted.script = [(422, {"code": "invalid_request", "message": "max_jobs: too big"})]
    client = BoardClient(board, "sf_key")
    with pytest.raises(BoardError, match="max_jobs: too big"):
        run(client.heartbeat(JOB))
    assert len(Scripted.seen) == 1


def test_409_means_the_lease_is_lost(board):
    Scripted.script = [(409, {"code": "lease_lost", "message": "lease is no longer current"})]
    client = BoardClient(board, "sf_key")
    with pytest.raises(LeaseLost, match="no longer current"):
        run(client.heartbeat(JOB))
    assert len(Scripted.seen) == 1


def test_a_batch_over_the_result_limit_goes_in_halves(board):
    plan = ChunkPlan(duration_seconds=1.0, chunks=[])
    finished = [(JOB.model_copy(update={"id": uuid.uuid4()}), plan) for _ in range(3)]
    ids = [str(job.id) for job, _ in finished]
    too_large = {"code": "result_too_large", "message": "over the limit"}

    def outcomes(*indexes):
        return {"outcomes": [{"job_id": ids[i], "state": "succeeded"} for i in indexes]}

    # 3 → 1 + 2; the 2 are still too large → 1 + 1.
    Scripted.script = [(413, too_large), (200, outcomes(0)), (413, too_large)]
    Scripted.script += [(200, outcomes(1)), (200, outcomes(2))]
    client = BoardClient(board, "sf_key")
    got = run(client.complete(finished)).outcomes
    assert [str(o.job_id) for o in got] == ids
    assert Scripted.seen == ["/v1/jobs/batch"] * 5
