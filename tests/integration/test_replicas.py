"""Several server replicas on one PostgreSQL: any of them serves any request, workers
spread across them, and the board-wide duties run on one at a time (the leader), taken
over by another when it dies."""

from __future__ import annotations

import signal
import uuid

import httpx

from tests.farm import (
    BURST_SETTINGS,
    ProtocolWorker,
    Server,
    chunk_plan,
    chunk_transcript,
    create_database,
    submit,
    wait_for,
)


def leading(server: Server) -> bool:
    ready = httpx.get(server.url + "/readyz", timeout=10).json()
    assert ready["status"] == "ready"
    return ready["leader"]


def test_two_replicas_share_the_board_and_hand_over_leadership(postgres_url, tmp_path_factory):
    url = create_database(postgres_url)
    shared = tmp_path_factory.mktemp("replicas")  # the storage and signing secret they share
    settings = {k: str(v) for k, v in BURST_SETTINGS.items()}
    replicas = [Server(url, shared, settings).start(), Server(url, shared, settings).start()]
    workers: list[ProtocolWorker] = []
    try:
        wait_for(lambda: sum(map(leading, replicas)) == 1, 20, "one leader")
        wait_for(lambda: sum(map(leading, replicas)) == 1, 20, "still one")
        leader, survivor = sorted(replicas, key=leading, reverse=True)
        worker_key, submit_key = (leader.create_key(role) for role in ("worker", "submit"))

        # Submitted through one replica, planned and transcribed through both.
        with leader.client(submit_key) as submitter:
            tid = submit(submitter, b"audio bytes").json()["id"]
        workers = [ProtocolWorker(server, worker_key) for server in (survivor, leader)]
        [plan_job] = workers[0].claim()
        assert workers[0].complete(plan_job, chunk_plan(4)).status_code == 200
        held = [job for w in workers for job in w.claim(max_jobs=2)]
        assert len(held) == 4
        for w, job in [(workers[0], held[0]), (workers[0], held[1]), (workers[1], held[2])]:
            assert w.complete(job, chunk_transcript(job)).status_code == 200

        # The leader dies. What its last completion left (counted, not merged: a server
        # that stopped in between) is merged by the survivor, once it leads.
        leader.stop(signal.SIGKILL)
        wait_for(lambda: leading(survivor), 20, "the survivor to take over")
        last = held[3]
        survivor.sql(
            "UPDATE jobs SET state = 'succeeded', result = $2, finished_at = now() WHERE id = $1",
            uuid.UUID(last["id"]),
            chunk_transcript(last),
        )
        survivor.sql(
            "UPDATE transcriptions SET jobs_done = jobs_done + 1 WHERE id = $1", uuid.UUID(tid)
        )
        with survivor.client(submit_key) as submitter:

            def finished() -> bool:
                return submitter.get(f"/v1/transcriptions/{tid}").json()["state"] != "running"

            wait_for(finished, 20, "the survivor's sweep to merge the transcript")
            transcript = submitter.get(f"/v1/transcriptions/{tid}/transcript?format=json")
        texts = [s["text"] for s in transcript.json()["segments"]]
        assert texts == [f"chunk {i}" for i in range(4)]
    finally:
        for w in workers:
            w.close()
        for server in replicas:
            server.stop()
