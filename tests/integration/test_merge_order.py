"""Property: whatever order the chunks of a transcription complete in, across
workers, the merged transcript is the same. Against a real server and PostgreSQL."""

from __future__ import annotations

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from tests.farm import ProtocolWorker, chunk_plan, submit

CHUNKS = 5
SECONDS = 10.0


def result(job: dict) -> dict:
    """Segments that spill over their chunk's edges, as Whisper's sometimes do: the
    merge has to clamp them whatever arrived first."""
    start, end = job["chunk"]["start"], job["chunk"]["end"]
    index = job["chunk"]["index"]
    segments = [
        {"start": start - 0.3, "end": start + 4.0, "text": f" c{index}a"},
        {"start": start + 5.0, "end": end + 0.4, "text": f" c{index}b"},
    ]
    return {
        "kind": "transcribe",
        "segments": segments,
        "language": "en",
        "audio_seconds": end - start,
        "processing_seconds": 0.01,
    }


@pytest.fixture(scope="module")
def farm(make_server):
    server = make_server()
    keys = {role: server.create_key(role) for role in ("submit", "worker")}
    workers = [ProtocolWorker(server, keys["worker"], name=f"w{i}") for i in range(3)]
    client = server.client(keys["submit"])
    yield client, workers
    client.close()
    for worker in workers:
        worker.close()


def transcribe_in_order(client, workers, order: list[int], assignment: list[int]) -> dict:
    tid = submit(client, b"audio").json()["id"]
    [job] = workers[0].claim()
    assert workers[0].complete(job, chunk_plan(CHUNKS, SECONDS)).status_code == 200
    held = {}
    for worker_index in assignment:  # each chunk claimed by some worker
        for job in workers[worker_index].claim():
            held[job["chunk"]["index"]] = (workers[worker_index], job)
    assert sorted(held) == list(range(CHUNKS))
    for index in order:
        worker, job = held[index]
        assert worker.complete(job, result(job)).status_code == 200
    document = client.get(f"/v1/transcriptions/{tid}/transcript").json()
    return {key: document[key] for key in ("text", "segments", "duration_seconds")}


@settings(
    max_examples=15,
    deadline=None,
    derandomize=True,
)
@given(
    order=st.permutations(list(range(CHUNKS))),
    assignment=st.lists(st.integers(0, 2), min_size=CHUNKS, max_size=CHUNKS),
)
def test_any_completion_order_gives_the_same_transcript(farm, order, assignment):
    client, workers = farm
    in_order = transcribe_in_order(client, workers, list(range(CHUNKS)), [0] * CHUNKS)
    assert transcribe_in_order(client, workers, order, assignment) == in_order
    starts = [s["start"] for s in in_order["segments"]]
    assert starts == sorted(starts) and starts[0] >= 0  # clamped, in order
    assert in_order["segments"][-1]["end"] <= CHUNKS * SECONDS
