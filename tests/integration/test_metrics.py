"""GET /metrics, scraped and parsed with prometheus_client's own parser, as Prometheus
would read it; /healthz and /readyz; the queue statements of the autoscaler and KEDA."""

from __future__ import annotations

import time
import uuid

import pytest
from prometheus_client.parser import text_string_to_metric_families

from server import db
from server.board import reads
from tests.farm import chunk_plan, chunk_transcript, create_database, sql, submit


def scrape(server) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
    """Every sample, by name and labels."""
    with server.client(None) as anonymous:
        response = anonymous.get("/metrics")
    assert response.status_code == 200
    assert response.headers["content-type"].startswith("text/plain")
    families = text_string_to_metric_families(response.text)
    return {(s.name, tuple(sorted(s.labels.items()))): s.value for f in families for s in f.samples}


def sample(samples, name: str, **labels: str) -> float:
    return samples[(name, tuple(sorted(labels.items())))]


def test_metrics_show_the_queue_leases_workers_speed_and_webhook_failures(
    server, submitter, worker
):
    first = submit(submitter, b"first").json()["id"]
    submit(submitter, b"second")
    [chunk] = worker.claim()
    assert worker.complete(chunk, chunk_plan(3, seconds=10.0)).status_code == 200
    [transcribe] = worker.claim()
    server.sql(
        "INSERT INTO webhook_deliveries (transcription_id, url, status, state) "
        "VALUES ($1, 'https://example.com/hook', 'succeeded', 'failed')",
        first,
    )

    samples = scrape(server)
    assert sample(samples, "scribefarm_jobs", kind="chunk", state="queued") == 1
    assert sample(samples, "scribefarm_jobs", kind="transcribe", state="queued") == 2
    assert sample(samples, "scribefarm_jobs_audio_seconds", kind="transcribe", state="queued") == 20
    assert sample(samples, "scribefarm_jobs", kind="transcribe", state="leased") == 1
    assert sample(samples, "scribefarm_jobs_audio_seconds", kind="transcribe", state="leased") == 10
    assert sample(samples, "scribefarm_leases", state="live") == 1
    assert sample(samples, "scribefarm_leases", state="expired") == 0
    assert sample(samples, "scribefarm_workers_active") == 1
    assert sample(samples, "scribefarm_webhook_deliveries", state="failed") == 1
    durations_before = samples.get(
        ("scribefarm_job_duration_seconds_count", (("kind", "transcribe"),)), 0
    )

    # 10 s of audio in 0.01 s of model time: 1000x realtime.
    assert worker.complete(transcribe, chunk_transcript(transcribe)).status_code == 200
    samples = scrape(server)
    assert sample(samples, "scribefarm_model_realtime_factor", model="tiny.en") == 1000
    assert sample(samples, "scribefarm_job_duration_seconds_count", kind="transcribe") == (
        durations_before + 1
    )
    assert ("scribefarm_jobs", (("kind", "transcribe"), ("state", "leased"))) not in samples
    # Its model ran 0.01 s over a life of (now) 100 s.
    server.sql(
        "UPDATE workers SET registered_at = now() - interval '100 seconds' WHERE id = $1",
        uuid.UUID(worker.id),
    )
    busy = sample(scrape(server), "scribefarm_worker_engine_busy_ratio", worker="test-worker")
    assert 0.9e-4 < busy <= 1e-4


def test_health_and_readiness(server):
    with server.client(None) as anonymous:
        assert anonymous.get("/healthz").json() == {"status": "ok"}
        assert anonymous.get("/readyz").json()["status"] == "ready"


def test_the_autoscaler_and_keda_queries_read_the_queue(postgres_url):
    """The statements the autoscaler and KEDA run, on a board holding one job of each
    kind and state."""
    url = create_database(postgres_url)
    db.migrate(url)
    key = sql(
        url,
        "INSERT INTO api_keys (name, role, key_hash, prefix) VALUES ('k', 'worker', 'h', 'p') "
        "RETURNING id",
    )[0]["id"]
    worker = sql(
        url,
        "INSERT INTO workers (api_key_id, name, engine, device, batch_size, models, kinds) "
        "VALUES ($1, 'w', 'e', 'cpu', 1, '{tiny.en}', '{chunk,transcribe}') RETURNING id",
        key,
    )[0]["id"]
    tid = uuid.uuid4()
    sql(
        url,
        "INSERT INTO transcriptions (id, api_key_id, state, source_key, source_bytes, options, "
        "model, priority) VALUES ($1, $2, 'running', 's', 1, '{}', 'tiny.en', 0)",
        tid,
        key,
    )
    jobs = [  # kind, model, state, seconds, lease expires in, finished seconds ago, result
        ("chunk", None, "queued", None, None, None, None),
        ("transcribe", "tiny.en", "queued", 30.0, None, None, None),
        ("transcribe", "tiny.en", "leased", 10.0, 20, None, None),  # a live lease
        ("transcribe", "tiny.en", "leased", 15.0, -5, None, None),  # its worker is gone
        ("transcribe", "tiny.en", "succeeded", 50.0, None, 60, {"processing_seconds": 1.0}),
        ("transcribe", "tiny.en", "dead", 40.0, None, 30, None),
        ("transcribe", "large-v3", "queued", 100.0, None, None, None),  # a GPU worker's
    ]
    for seq, (kind, model, state, seconds, expires_in, finished_ago, result) in enumerate(jobs):
        sql(
            url,
            "INSERT INTO jobs (transcription_id, kind, state, seq, model, priority, submitted_at, "
            "start_seconds, end_seconds, max_attempts, worker_id, lease_expires_at, leased_at, "
            "finished_at, result) VALUES ($1, $2, $3, $4, $10, 0, now(), 0, $5, 5, $6, "
            "now() + make_interval(secs => $7), now() - interval '100 seconds', "
            "now() - make_interval(secs => $8), $9::jsonb)",
            tid,
            kind,
            state,
            seq,
            seconds,
            worker,
            expires_in,
            finished_ago,
            result,
            model,
        )

    # KEDA: unfinished transcribe audio (queued or in progress) + 60 s per chunk job.
    assert sql(url, reads.KEDA_QUEUE_DEPTH)[0]["ceil"] == 30 + 10 + 15 + 100 + 60
    [state] = sql(url, reads.AUTOSCALER_QUEUE, 600.0, "tiny.en")
    assert state["queued_jobs"] == 3  # the chunk, the queued one, the one whose lease expired
    assert state["queued_audio_seconds"] == 30 + 15
    assert state["leased_jobs"] == 1
    # 50 s of audio from its claim (100 s ago) to its completion (60 s ago): 40 s busy.
    assert state["recent_audio_seconds"] == 50
    assert state["recent_busy_seconds"] == pytest.approx(40, abs=1)
    # The autoscaler counts what workers of its model can run: the chunk job, and the
    # large-v3 one only for large-v3 workers.
    [state] = sql(url, reads.AUTOSCALER_QUEUE, 600.0, "large-v3")
    assert (state["queued_jobs"], state["queued_audio_seconds"]) == (2, 100)


def test_scrapes_share_one_board_query_for_a_few_seconds(make_server):
    """/metrics needs no key: each scrape running the board's heaviest statement would
    let anyone load the database at will (issue 13)."""
    server = make_server(metrics_cache_seconds=3)
    with server.client(server.create_key("submit")) as client:
        submit(client, b"a first one")  # (a state with no jobs has no sample)
        time.sleep(3.2)
        before = sample(scrape(server), "scribefarm_jobs", kind="chunk", state="queued")
        submit(client, b"one more")
        assert sample(scrape(server), "scribefarm_jobs", kind="chunk", state="queued") == before
        time.sleep(3.2)
        after = sample(scrape(server), "scribefarm_jobs", kind="chunk", state="queued")
        assert after == before + 1


def test_metrics_can_be_put_behind_a_token(make_server):
    server = make_server(metrics_token="scrape-secret")
    with server.client(None) as anonymous:
        refused = anonymous.get("/metrics")
        assert refused.status_code == 401
        assert "SCRIBEFARM_METRICS_TOKEN" in refused.json()["message"]
        wrong = anonymous.get("/metrics", headers={"Authorization": "Bearer wrong"})
        assert wrong.status_code == 401
        allowed = anonymous.get("/metrics", headers={"Authorization": "Bearer scrape-secret"})
        assert allowed.status_code == 200 and "scribefarm_jobs" in allowed.text
