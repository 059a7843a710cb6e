"""Upgrades: a board whose schema is one release old, with work in flight, is migrated
by the new server as it starts, and that work finishes; workers of the previous
protocol version are told to upgrade and change nothing."""

from __future__ import annotations

import uuid

import pytest

from server import db
from server.board.keys import hash_key, new_key
from shared.protocol import PROTOCOL_VERSION
from tests.farm import ProtocolWorker, Server, chunk_transcript, create_database, sql

pytestmark = pytest.mark.timeout(120)

# The last release's schema (session 1 shipped migrations 0001 and 0002).
PREVIOUS_SCHEMA = "0002"


def key_of_role(url: str, role: str) -> str:
    key = new_key()
    sql(
        url,
        "INSERT INTO api_keys (name, role, key_hash, prefix) VALUES ($1, $1, $2, $3)",
        role,
        hash_key(key),
        key[:10],
    )
    return key


def in_flight(url: str, submitter: str) -> uuid.UUID:
    """What a running board holds mid-transcription, written in the old schema: a
    running transcription of three chunks, one done, one leased (its worker died with
    the old version), one queued."""
    tid = uuid.uuid4()
    owner = sql(url, "SELECT id FROM api_keys WHERE key_hash = $1", hash_key(submitter))[0]["id"]
    sql(
        url,
        "INSERT INTO transcriptions (id, api_key_id, state, source_key, source_bytes, options, "
        "model, priority, duration_seconds, jobs_total, jobs_done, audio_seconds_done, "
        "started_at) VALUES ($1, $2, 'running', 'sources/old', 10, $3, 'tiny.en', 0, 30, 3, 1, "
        "10, now())",
        tid,
        owner,
        {"model": None, "language": None, "word_timestamps": False, "priority": 0},
    )
    done = chunk_transcript({"chunk": {"index": 0, "start": 0.0, "end": 10.0}}, "done before")
    result = {**done, "segments": [{**s, "words": None} for s in done["segments"]]}
    jobs = [
        (0, "chunk", "succeeded", None, None, None),
        (1, "transcribe", "succeeded", 0.0, 10.0, result),
        (2, "transcribe", "leased", 10.0, 20.0, None),
        (3, "transcribe", "queued", 20.0, 30.0, None),
    ]
    for seq, kind, state, start, end, result in jobs:
        sql(
            url,
            "INSERT INTO jobs (transcription_id, kind, state, seq, model, priority, submitted_at, "
            "start_seconds, end_seconds, max_attempts, attempts, result, lease_id, "
            "lease_expires_at) VALUES ($1, $2, $3::text, $4, 'tiny.en', 0, now(), $5, $6, 5, "
            "CASE WHEN $3::text = 'queued' THEN 0 ELSE 1 END, $7, "
            "CASE WHEN $3::text = 'leased' THEN gen_random_uuid() END, "
            "CASE WHEN $3::text = 'leased' THEN now() - interval '1 minute' END)",
            tid,
            kind,
            state,
            seq,
            start,
            end,
            result,
        )
    return tid


def test_work_in_flight_survives_the_upgrade_and_finishes(postgres_url, tmp_path):
    url = create_database(postgres_url)
    db.migrate(url, PREVIOUS_SCHEMA)
    keys = {role: key_of_role(url, role) for role in ("submit", "worker")}
    tid = in_flight(url, keys["submit"])

    server = Server(url, tmp_path).start()  # migrates to the newest schema as it starts
    try:
        assert sql(url, "SELECT version_num FROM alembic_version")[0]["version_num"] != "0002"
        with server.client(keys["worker"]) as old_worker:
            refused = old_worker.post(
                "/v1/jobs/claim",
                json={"worker_id": str(uuid.uuid4()), "max_jobs": 8},
                headers={"X-Scribefarm-Protocol": "1.0"},
            )
        assert refused.status_code == 426
        assert f"speaks worker protocol {PROTOCOL_VERSION}" in refused.json()["message"]
        assert "Upgrade the worker" in refused.json()["message"]
        states = sql(url, "SELECT state FROM jobs WHERE transcription_id = $1 ORDER BY seq", tid)
        assert [r["state"] for r in states] == ["succeeded", "succeeded", "leased", "queued"]

        worker = ProtocolWorker(server, keys["worker"])
        claimed = worker.claim(max_jobs=8)  # the queued one, and the expired lease
        assert sorted(job["chunk"]["index"] for job in claimed) == [1, 2]
        for job in claimed:
            assert worker.complete(job, chunk_transcript(job)).status_code == 200
        worker.close()
        with server.client(keys["submit"]) as client:
            view = client.get(f"/v1/transcriptions/{tid}").json()
            document = client.get(f"/v1/transcriptions/{tid}/transcript").json()
        assert view["state"] == "succeeded"
        assert document["text"] == "done before chunk 1 chunk 2"
    finally:
        server.stop()
