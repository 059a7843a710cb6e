"""The job board through a real server process and real PostgreSQL: claims, leases,
fencing, retries, fan-out and fan-in, cancel and retry.

Each test names the job-state transitions (docs/state_machine.md) it covers."""

from __future__ import annotations

import threading
import time
import uuid
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

from tests.farm import ProtocolWorker, chunk_plan, chunk_transcript, submit, wait_for

LEASE = 1.0
MAX_JOB = 3.0  # a job's wall-clock deadline


@pytest.fixture(scope="module")
def server(make_server):
    return make_server(
        lease_seconds=LEASE,
        max_job_seconds=MAX_JOB,
        retry_base_seconds=0.3,
        retry_max_seconds=2,
        max_attempts=3,
        poll_seconds=0.2,
    )


@pytest.fixture(autouse=True)
def clean_board(server):
    server.sql("TRUNCATE transcriptions, jobs, workers CASCADE")


def submit_planned(submitter, worker, chunks: int, seconds: float = 10.0) -> str:
    """A transcription whose chunk job has completed with `chunks` chunks."""
    tid = submit(submitter, b"audio bytes").json()["id"]
    [job] = worker.claim()
    assert job["kind"] == "chunk" and job["transcription_id"] == tid
    assert worker.complete(job, chunk_plan(chunks, seconds)).status_code == 200
    return tid


def job_rows(server, tid):
    return server.sql("SELECT * FROM jobs WHERE transcription_id = $1 ORDER BY seq", tid)


def test_claim_returns_jobs_in_priority_order_then_age(server, submitter, worker):
    low = submit(submitter, b"x", priority=-5).json()["id"]
    first = submit(submitter, b"x").json()["id"]
    high = submit(submitter, b"x", priority=10).json()["id"]
    second = submit(submitter, b"x").json()["id"]
    order = [j["transcription_id"] for j in worker.claim(max_jobs=10)]
    assert order == [high, first, second, low]


def test_claim_only_offers_jobs_for_models_the_worker_has(server, keys, submitter, worker):
    big = ProtocolWorker(server, keys["worker"], models=["large-v3"])  # it may be asked for
    tid = submit(submitter, b"x", model="large-v3").json()["id"]
    [chunk] = worker.claim()  # chunk jobs need no model: any worker cuts audio
    worker.complete(chunk, chunk_plan(2))
    assert worker.claim(max_jobs=5) == []
    jobs = big.claim(max_jobs=5)
    assert [j["model"] for j in jobs] == ["large-v3", "large-v3"]
    assert {j["transcription_id"] for j in jobs} == {tid}


def test_claim_takes_jobs_up_to_an_audio_budget_and_always_one(server, submitter, worker):
    submit_planned(submitter, worker, 6)  # 10 s chunks
    body = {"worker_id": worker.id, "max_jobs": 6, "max_audio_seconds": 25}
    first = worker.http.post("/v1/jobs/claim", json=body).json()["jobs"]
    assert [j["chunk"]["index"] for j in first] == [0, 1]
    body["max_audio_seconds"] = 5
    second = worker.http.post("/v1/jobs/claim", json=body).json()["jobs"]
    assert [j["chunk"]["index"] for j in second] == [2]
    assert len(worker.claim(max_jobs=6)) == 3  # the budget left the rest unlocked


def test_claim_for_unknown_worker_is_404(server, worker):
    response = worker.http.post(
        "/v1/jobs/claim", json={"worker_id": "00000000-0000-0000-0000-000000000000"}
    )
    assert response.status_code == 404
    assert response.json()["code"] == "unknown_worker"


# leased -> leased (heartbeat extends the lease, from the database clock)
def test_heartbeat_extends_the_lease(server, submitter, worker):
    submit(submitter, b"x")
    [job] = worker.claim()
    for _ in range(3):
        time.sleep(LEASE / 2)
        response = worker.heartbeat(job)
        assert response.status_code == 200, response.text
    # Kept alive past several lease lengths: nobody else can take it.
    assert worker.claim() == []
    assert worker.complete(job, chunk_plan(1)).status_code == 200


# leased -> leased (the deadline ends the lease however often it is renewed)
def test_heartbeats_do_not_extend_a_lease_past_the_jobs_deadline(server, submitter, worker):
    submit(submitter, b"x")
    [job] = worker.claim()
    began = time.monotonic()
    while time.monotonic() - began < MAX_JOB + LEASE:
        response = worker.heartbeat(job)  # a hung worker that still beats
        if response.status_code != 200:
            break
        time.sleep(LEASE / 4)
    assert response.status_code == 409 and response.json()["code"] == "lease_lost"
    assert MAX_JOB - LEASE / 4 <= time.monotonic() - began
    [again] = worker.claim()  # taken over: another attempt, elsewhere
    assert again["id"] == job["id"] and again["attempt"] == 2


# leased -> leased (expired lease taken over by another worker); fencing
def test_expired_lease_is_taken_over_and_the_old_lease_is_fenced(server, keys, submitter, worker):
    tid = submit(submitter, b"x").json()["id"]
    [job] = worker.claim()
    thief = ProtocolWorker(server, keys["worker"], name="thief")
    assert thief.claim() == []  # not expired yet
    time.sleep(LEASE + 0.3)
    [taken] = thief.claim()
    assert taken["id"] == job["id"] and taken["lease_id"] != job["lease_id"]
    assert taken["attempt"] == 2
    before = job_rows(server, tid)

    for late in (
        worker.heartbeat(job),
        worker.complete(job, chunk_plan(3)),
        worker.fail(job, "boom"),
        worker.release(job),
    ):
        assert late.status_code == 409, late.text
        assert late.json()["code"] == "lease_lost"
    assert job_rows(server, tid) == before

    assert thief.complete(taken, chunk_plan(1)).status_code == 200
    assert len(job_rows(server, tid)) == 2


# leased -> succeeded, repeated: idempotent
def test_repeated_complete_with_the_same_lease_is_idempotent(server, submitter, worker):
    tid = submit(submitter, b"x").json()["id"]
    [job] = worker.claim()
    first = worker.complete(job, chunk_plan(2))
    again = worker.complete(job, chunk_plan(2))
    assert first.status_code == again.status_code == 200
    assert again.json()["state"] == "succeeded"
    assert len(job_rows(server, tid)) == 3  # the plan fanned out once


def test_complete_with_the_wrong_kind_of_result_changes_nothing(server, submitter, worker):
    tid = submit(submitter, b"x").json()["id"]
    [job] = worker.claim()
    response = worker.complete(
        job, {**chunk_transcript({"chunk": {"start": 0, "end": 1, "index": 0}})}
    )
    assert response.status_code == 422
    assert job_rows(server, tid)[0]["state"] == "leased"


# leased -> queued (fail, backoff), then leased -> dead (attempts exhausted)
def test_failures_retry_with_backoff_then_the_job_is_dead(server, submitter, worker):
    tid = submit(submitter, b"x").json()["id"]
    delays = []
    for attempt in (1, 2):
        [job] = worker.claim(wait=5)
        assert job["attempt"] == attempt
        outcome = worker.fail(job, f"transient {attempt}")
        assert outcome.json()["state"] == "queued"
        row = job_rows(server, tid)[0]
        delays.append((row["run_after"] - row["finished_at"]).total_seconds())
        assert worker.claim() == []  # backing off
    # base 0.3 s doubling, with jitter in [0.5, 1.5)
    assert 0.15 <= delays[0] < 0.45 and 0.3 <= delays[1] < 0.9
    [job] = worker.claim(wait=5)
    assert job["attempt"] == 3
    assert worker.fail(job, "transient 3").json()["state"] == "dead"
    view = submitter.get(f"/v1/transcriptions/{tid}").json()
    assert view["state"] == "failed"
    assert view["error"] == "transient 3"


# leased -> dead (permanent error: no retry)
def test_permanent_errors_are_not_retried(server, submitter, worker):
    tid = submit(submitter, b"x").json()["id"]
    [job] = worker.claim()
    outcome = worker.fail(job, "not an audio file: PNG image", permanent=True)
    assert outcome.json()["state"] == "dead"
    assert job_rows(server, tid)[0]["attempts"] == 1
    view = submitter.get(f"/v1/transcriptions/{tid}").json()
    assert view["state"] == "failed" and "PNG image" in view["error"]


def test_a_dead_transcribe_job_fails_the_transcription_and_cancels_the_rest(
    server, submitter, worker
):
    tid = submit_planned(submitter, worker, 3)
    jobs = worker.claim(max_jobs=3)
    worker.fail(jobs[1], "model crashed", permanent=True)
    view = submitter.get(f"/v1/transcriptions/{tid}").json()
    assert view["state"] == "failed"
    assert view["error"].startswith("the chunk at 10.0-20.0 s failed after 1 attempt(s)")
    assert [r["state"] for r in job_rows(server, tid)] == [
        "succeeded",
        "canceled",
        "dead",
        "canceled",
    ]
    late = worker.heartbeat(jobs[0])
    assert late.status_code == 409 and late.json()["code"] == "job_canceled"


# leased -> dead (the rescuer: the last attempt's lease expired)
def test_a_job_whose_last_lease_expires_is_dead(server, submitter, worker):
    tid = submit(submitter, b"x").json()["id"]
    for _ in range(3):
        [job] = worker.claim(wait=5)  # and the worker dies holding it
    deadline = time.monotonic() + 10
    while submitter.get(f"/v1/transcriptions/{tid}").json()["state"] != "failed":
        assert time.monotonic() < deadline, "the rescuer did not fail the transcription"
        time.sleep(0.2)
    assert job_rows(server, tid)[0]["state"] == "dead"
    assert "lease expired" in submitter.get(f"/v1/transcriptions/{tid}").json()["error"]


# leased -> queued (release: a worker shutting down gives the job back)
def test_release_requeues_at_once_without_using_an_attempt(server, submitter, worker):
    tid = submit(submitter, b"x").json()["id"]
    [job] = worker.claim()
    assert worker.release(job).status_code == 200
    [again] = worker.claim()
    assert again["id"] == job["id"] and again["attempt"] == 1
    assert job_rows(server, tid)[0]["attempts"] == 1


# fan-out and fan-in
def test_fan_out_then_fan_in_merges_the_transcript(server, submitter, worker):
    tid = submit_planned(submitter, worker, 4)
    view = submitter.get(f"/v1/transcriptions/{tid}").json()
    assert view["state"] == "running" and view["duration_seconds"] == 40.0
    assert view["progress"]["jobs_total"] == 4
    jobs = worker.claim(max_jobs=10)
    assert [j["chunk"]["index"] for j in jobs] == [0, 1, 2, 3]
    for job in reversed(jobs):  # completion order does not matter
        assert worker.complete(job, chunk_transcript(job)).status_code == 200
    view = submitter.get(f"/v1/transcriptions/{tid}").json()
    assert view["state"] == "succeeded"
    assert view["progress"]["audio_seconds_done"] == 40.0
    transcript = submitter.get(f"/v1/transcriptions/{tid}/transcript").json()
    assert [s["text"] for s in transcript["segments"]] == [f"chunk {i}" for i in range(4)]
    assert transcript["text"] == "chunk 0 chunk 1 chunk 2 chunk 3"


def settle(worker, job, first: int, count: int, seconds: float = 10.0) -> httpx.Response:
    """Reports chunks first..first+count-1 of `job`'s plan as settled."""
    chunks = chunk_plan(first + count, seconds)["chunks"][first:]
    return worker.http.post(
        f"/v1/jobs/{job['id']}/chunks", json={"lease_id": job["lease_id"], "chunks": chunks}
    )


def test_settled_chunks_are_transcribed_while_planning_and_merged_once_planned(
    server, keys, submitter, worker
):
    """leased chunk job: settled chunks → queued transcribe jobs at once; the plan's
    completion queues only the rest; the merge waits for the plan."""
    tid = submit(submitter, b"audio bytes").json()["id"]
    [planner] = worker.claim()
    assert settle(worker, planner, 0, 2).status_code == 200
    other = ProtocolWorker(server, keys["worker"], "other")
    early = other.claim() + other.claim()
    assert [j["chunk"]["index"] for j in early] == [0, 1]
    for job in early:
        assert other.complete(job, chunk_transcript(job)).status_code == 200
    view = submitter.get(f"/v1/transcriptions/{tid}").json()
    assert view["state"] == "running", view  # all known jobs done, but the plan is not
    assert view["progress"]["jobs_total"] == 2 and view["duration_seconds"] is None
    assert settle(worker, planner, 1, 1).status_code == 200  # a repeat queues nothing
    assert worker.complete(planner, chunk_plan(3)).status_code == 200
    assert [r["seq"] for r in job_rows(server, tid) if r["kind"] == "transcribe"] == [1, 2, 3]
    [last] = other.claim()
    assert other.complete(last, chunk_transcript(last)).status_code == 200
    transcript = submitter.get(f"/v1/transcriptions/{tid}/transcript").json()
    assert transcript["text"] == "chunk 0 chunk 1 chunk 2"
    other.close()


def test_a_plan_whose_settled_chunks_are_all_done_merges_at_its_completion(
    server, submitter, worker
):
    tid = submit(submitter, b"audio bytes").json()["id"]
    [planner] = worker.claim()
    assert settle(worker, planner, 0, 2).status_code == 200
    for job in worker.claim(max_jobs=2):
        assert worker.complete(job, chunk_transcript(job)).status_code == 200
    assert worker.complete(planner, chunk_plan(2)).status_code == 200
    view = submitter.get(f"/v1/transcriptions/{tid}").json()
    assert view["state"] == "succeeded", view
    assert view["progress"]["jobs_done"] == view["progress"]["jobs_total"] == 2


def test_settled_chunks_are_fenced_on_the_chunk_jobs_lease(server, submitter, worker):
    tid = submit(submitter, b"audio bytes").json()["id"]
    [planner] = worker.claim()
    stale = settle(worker, {**planner, "lease_id": str(uuid.uuid4())}, 0, 1)
    assert stale.status_code == 409 and stale.json()["code"] == "lease_lost"
    assert settle(worker, planner, 0, 1).status_code == 200
    [transcribe] = worker.claim()
    assert settle(worker, transcribe, 1, 1).json()["code"] == "wrong_result_kind"
    assert submitter.post(f"/v1/transcriptions/{tid}/cancel").status_code == 200
    canceled = settle(worker, planner, 1, 1)
    assert canceled.status_code == 409 and canceled.json()["code"] == "job_canceled"
    assert len(job_rows(server, tid)) == 2  # the chunk job and the one settled chunk


def test_idle_workers_split_the_last_jobs_of_a_file(server, keys, submitter, worker):
    """Past half its audio budget, a claim takes at most its worker's share of the
    queue's head (split between the live workers): two workers split a file's last
    minute-long chunks instead of one taking them all. Short jobs still batch."""
    other = ProtocolWorker(server, keys["worker"], "other")

    def claim(who: ProtocolWorker) -> list[int]:
        body = {"worker_id": who.id, "max_jobs": 8, "max_audio_seconds": 120}
        jobs = who.http.post("/v1/jobs/claim", json=body).json()["jobs"]
        return [job["chunk"]["index"] for job in jobs]

    tid = submit(submitter, b"long").json()["id"]
    [planner] = worker.claim()
    assert worker.complete(planner, chunk_plan(4, seconds=60)).status_code == 200
    assert claim(worker) == [0, 1]  # 120 s: its share of 240 s between two
    assert claim(other) == [2]  # its share of the two left, not both
    assert claim(worker) == [3]
    server.sql("UPDATE jobs SET state = 'succeeded' WHERE transcription_id = $1", tid)
    submit_planned(submitter, worker, 8, seconds=5)
    assert len(claim(other)) == 8  # 40 s of short jobs: one batch, under half the budget
    other.close()


def test_a_short_sources_chunk_job_transcribes_its_one_chunk_itself(server, submitter, worker):
    """leased chunk job → succeeded with its plan and its one chunk's transcript: the
    transcribe job is done on arrival (never queued for a claim), credited to the chunk
    job's worker, and the transcription merged at once."""
    tid = submit(submitter, b"short audio").json()["id"]
    [job] = worker.claim()
    plan = chunk_plan(1)
    plan["transcript"] = chunk_transcript({"chunk": plan["chunks"][0]}, "said at once")
    two = {**chunk_plan(2), "transcript": plan["transcript"]}
    refused = worker.complete(job, two)
    assert refused.status_code == 422  # a transcript only for a plan's one chunk
    assert worker.complete(job, plan).status_code == 200
    view = submitter.get(f"/v1/transcriptions/{tid}").json()
    assert view["state"] == "succeeded", view
    assert view["progress"]["jobs_done"] == view["progress"]["jobs_total"] == 1
    text = submitter.get(f"/v1/transcriptions/{tid}/transcript?format=txt").text
    assert text.strip() == "said at once"
    chunk_job, transcribe = job_rows(server, tid)
    assert transcribe["state"] == "succeeded" and transcribe["attempts"] == 1
    assert transcribe["worker_id"] == chunk_job["worker_id"] == uuid.UUID(worker.id)
    assert transcribe["leased_at"] == chunk_job["leased_at"]
    [stats] = server.sql("SELECT jobs_done, audio_seconds FROM workers WHERE id = $1", worker.id)
    assert stats == {"jobs_done": 1, "audio_seconds": 10.0}
    assert worker.claim() == []


def split(worker, job, cuts: list[float], language: str | None = None) -> httpx.Response:
    body = {"lease_id": job["lease_id"], "cuts": cuts, "language": language}
    return worker.http.post(f"/v1/jobs/{job['id']}/split", json=body)


def span_plan(span: dict | None, first_index: int, chunks: int, end: float) -> dict:
    """A plan of `chunks` 10 s chunks from the span's start (0 for the first span)."""
    start = span["start"] if span else 0.0
    return {
        "kind": "chunk",
        "duration_seconds": end,
        "chunks": [
            {"index": first_index + i, "start": start + 10 * i, "end": start + 10 * i + 10}
            for i in range(chunks)
        ],
    }


def test_a_long_source_is_planned_in_spans_by_several_chunk_jobs_at_once(
    server, keys, submitter, worker
):
    """leased first chunk job: split → a queued chunk job per further span; each span's
    plan fans out on its own; the transcription is planned (and merged) once every
    span's plan is in, its duration where the last span ended."""
    tid = submit(submitter, b"long audio").json()["id"]
    [first] = worker.claim()
    assert first["plan_span_seconds"] == 300 and first["span"] is None
    response = split(worker, first, [300.5, 600.25], language="de")
    assert response.status_code == 200, response.text
    spans = response.json()["spans"]
    assert spans == [
        {"index": 1, "start": 300.5, "end": 600.25},
        {"index": 2, "start": 600.25, "end": None},
    ]
    # A retried first job gets the first attempt's spans, whatever cuts it found.
    assert split(worker, first, [301.0, 601.0]).json()["spans"] == spans
    others = [ProtocolWorker(server, keys["worker"], f"planner-{i}") for i in range(2)]
    planners = [other.claim()[0] for other in others]  # both spans at once
    assert sorted(p["span"]["index"] for p in planners) == [1, 2]
    assert all(p["kind"] == "chunk" and p["plan_span_seconds"] is None for p in planners)
    for other, planner in zip(others, planners, strict=True):
        span = planner["span"]
        plan = span_plan(span, span["index"] * 100_000, 2, span["end"] or 800.0)
        assert other.complete(planner, plan).status_code == 200
    view = submitter.get(f"/v1/transcriptions/{tid}").json()
    assert view["duration_seconds"] is None  # the first span is still being planned
    jobs = worker.claim(max_jobs=10)
    assert {j["options"]["language"] for j in jobs} == {"de"}  # from the split
    for job in jobs:
        assert worker.complete(job, chunk_transcript(job)).status_code == 200
    assert submitter.get(f"/v1/transcriptions/{tid}").json()["state"] == "running"
    assert worker.complete(first, span_plan(None, 0, 1, 300.5)).status_code == 200
    view = submitter.get(f"/v1/transcriptions/{tid}").json()
    assert view["duration_seconds"] == 800.0 and view["progress"]["jobs_total"] == 5
    [last] = worker.claim()
    assert last["chunk"]["index"] == 0
    assert worker.complete(last, chunk_transcript(last)).status_code == 200
    transcript = submitter.get(f"/v1/transcriptions/{tid}/transcript").json()
    starts = [0.5, 301.0, 311.0, 600.75, 610.75]  # in time order, across spans
    assert [s["start"] for s in transcript["segments"]] == starts
    for other in others:
        other.close()


def test_only_a_sources_first_chunk_job_splits_it_and_only_forward(server, submitter, worker):
    submit(submitter, b"long audio")
    [first] = worker.claim()
    for cuts in ([0.0, 10.0], [300.0, 200.0], [300.0, 300.0], [1e9]):
        response = split(worker, first, cuts)
        assert response.status_code == 422 and response.json()["code"] == "invalid_cuts", cuts
    stale = split(worker, {**first, "lease_id": str(uuid.uuid4())}, [300.0])
    assert stale.status_code == 409 and stale.json()["code"] == "lease_lost"
    assert split(worker, first, [300.0]).status_code == 200
    [span] = worker.claim()
    assert span["span"] == {"index": 1, "start": 300.0, "end": None}
    assert split(worker, span, [400.0]).json()["code"] == "not_splittable"


@pytest.mark.parametrize("per_chunk", [False, True])
def test_the_plans_speech_and_language_reach_every_transcribe_job(
    server, submitter, worker, per_chunk
):
    tid = submit(submitter, b"audio", detect_language_per_chunk=per_chunk).json()["id"]
    [job] = worker.claim()
    plan = chunk_plan(2)
    plan["language"] = "de"
    for chunk in plan["chunks"]:
        chunk["speech"] = [
            [chunk["start"] + 1, chunk["start"] + 4],
            [chunk["start"] + 5, chunk["end"]],
        ]
    assert worker.complete(job, plan).status_code == 200
    jobs = worker.claim(max_jobs=10)
    assert [j["chunk"]["speech"] for j in jobs] == [c["speech"] for c in plan["chunks"]]
    # Detected once by the chunk job, used by every chunk, unless each detects its own.
    assert {j["options"]["language"] for j in jobs} == ({None} if per_chunk else {"de"})
    assert submitter.get(f"/v1/transcriptions/{tid}").json()["options"]["language"] is None


def test_an_empty_plan_succeeds_at_once_with_an_empty_transcript(server, submitter, worker):
    tid = submit(submitter, b"x").json()["id"]
    [job] = worker.claim()
    worker.complete(job, {"kind": "chunk", "duration_seconds": 0.0, "chunks": []})
    assert submitter.get(f"/v1/transcriptions/{tid}").json()["state"] == "succeeded"
    assert submitter.get(f"/v1/transcriptions/{tid}/transcript?format=txt").text == ""


def test_fan_in_happens_exactly_once_when_the_last_jobs_complete_together(
    server, keys, submitter, worker
):
    workers = [ProtocolWorker(server, keys["worker"], name=f"racer-{i}") for i in range(6)]
    for _ in range(15):
        tid = submit_planned(submitter, worker, 6)
        held = [(w, w.claim()[0]) for w in workers]
        barrier = threading.Barrier(len(held))

        def finish(pair, barrier=barrier):
            w, job = pair
            barrier.wait()
            return w.complete(job, chunk_transcript(job)).status_code

        with ThreadPoolExecutor(len(held)) as pool:
            assert list(pool.map(finish, held)) == [200] * 6
        row = server.sql("SELECT * FROM transcriptions WHERE id = $1", tid)[0]
        assert row["state"] == "succeeded"
        assert row["jobs_done"] == row["jobs_total"] == 6
        assert len(row["transcript"]["segments"]) == 6
    for w in workers:
        w.close()


def test_a_transcription_counted_done_but_not_merged_is_merged_by_the_sweep(
    server, submitter, worker
):
    """A completion counts the last job done, then merges in a transaction of its own:
    a server that stops in between leaves a running transcription with every job done,
    which the maintenance loop merges."""
    tid = submit_planned(submitter, worker, 2)
    jobs = worker.claim(max_jobs=2)
    assert worker.complete(jobs[0], chunk_transcript(jobs[0])).status_code == 200
    # What the last completion's statement leaves when the server dies right after it.
    last = chunk_transcript(jobs[1])
    server.sql(
        "UPDATE jobs SET state = 'succeeded', result = $2, finished_at = now() WHERE id = $1",
        uuid.UUID(jobs[1]["id"]),
        last,
    )
    server.sql("UPDATE transcriptions SET jobs_done = jobs_done + 1 WHERE id = $1", uuid.UUID(tid))

    def merged():
        view = submitter.get(f"/v1/transcriptions/{tid}").json()
        return view if view["state"] != "running" else None

    assert wait_for(merged, 10, "the sweep to merge it")["state"] == "succeeded"
    transcript = submitter.get(f"/v1/transcriptions/{tid}/transcript?format=json").json()
    assert [s["text"] for s in transcript["segments"]] == ["chunk 0", "chunk 1"]


def test_a_batch_records_each_job_on_its_own_lease_then_claims(server, submitter, worker):
    """One request for an engine batch: a lost lease or a wrong result is that job's
    error and changes nothing; the rest are recorded, and the next claim comes back."""
    tid = submit_planned(submitter, worker, 5)
    done, failing, stale, wrong = worker.claim(max_jobs=4)
    completions = [
        {"job_id": done["id"], "lease_id": done["lease_id"], "result": chunk_transcript(done)},
        {"job_id": stale["id"], "lease_id": str(uuid.uuid4()), "result": chunk_transcript(stale)},
        {"job_id": wrong["id"], "lease_id": wrong["lease_id"], "result": chunk_plan(1)},
    ]
    failures = [{"job_id": failing["id"], "lease_id": failing["lease_id"], "error": "disk full"}]
    claim = {"worker_id": worker.id, "max_jobs": 5}
    response = worker.http.post(
        "/v1/jobs/batch", json={"completions": completions, "failures": failures, "claim": claim}
    )
    assert response.status_code == 200, response.text
    outcomes = {o["job_id"]: o for o in response.json()["outcomes"]}
    assert outcomes[done["id"]]["state"] == "succeeded"
    assert outcomes[failing["id"]]["state"] == "queued" and outcomes[failing["id"]]["run_after"]
    assert outcomes[stale["id"]]["state"] is None
    assert outcomes[stale["id"]]["error"]["code"] == "lease_lost"
    assert outcomes[wrong["id"]]["error"]["code"] == "wrong_result_kind"
    # The one job left claimable (the failed one waits out its backoff).
    assert [j["chunk"]["index"] for j in response.json()["jobs"]] == [4]
    states = [r["state"] for r in job_rows(server, tid)[1:]]
    assert states == ["succeeded", "queued", "leased", "leased", "leased"]


# queued/leased -> canceled
def test_cancel_stops_queued_work_and_leased_workers_learn_at_heartbeat(server, submitter, worker):
    tid = submit_planned(submitter, worker, 3)
    [held] = worker.claim()
    response = submitter.post(f"/v1/transcriptions/{tid}/cancel")
    assert response.status_code == 200 and response.json()["state"] == "canceled"
    assert {r["state"] for r in job_rows(server, tid)[1:]} == {"canceled"}
    assert worker.claim(max_jobs=5) == []
    for late in (worker.heartbeat(held), worker.complete(held, chunk_transcript(held))):
        assert late.status_code == 409 and late.json()["code"] == "job_canceled"
    again = submitter.post(f"/v1/transcriptions/{tid}/cancel")
    assert again.status_code == 409 and again.json()["code"] == "already_finished"


# dead/canceled -> queued (retry); finished chunks keep their results
def test_retry_requeues_only_what_did_not_finish(server, submitter, worker):
    tid = submit_planned(submitter, worker, 3)
    jobs = worker.claim(max_jobs=3)
    worker.complete(jobs[0], chunk_transcript(jobs[0]))
    worker.fail(jobs[1], "disk full", permanent=True)
    assert submitter.get(f"/v1/transcriptions/{tid}").json()["state"] == "failed"

    response = submitter.post(f"/v1/transcriptions/{tid}/retry")
    assert response.status_code == 200 and response.json()["state"] == "running"
    again = worker.claim(max_jobs=5)
    assert sorted(j["chunk"]["index"] for j in again) == [1, 2]
    for job in again:
        worker.complete(job, chunk_transcript(job))
    view = submitter.get(f"/v1/transcriptions/{tid}").json()
    assert view["state"] == "succeeded" and view["error"] is None
    assert view["progress"]["jobs_done"] == 3

    not_failed = submitter.post(f"/v1/transcriptions/{tid}/retry")
    assert not_failed.status_code == 409 and not_failed.json()["code"] == "not_retryable"


def test_long_poll_wakes_when_work_arrives(server, submitter, worker):
    started = time.monotonic()
    timer = threading.Timer(1.0, lambda: submit(submitter, b"x"))
    timer.start()
    jobs = worker.claim(wait=20)
    waited = time.monotonic() - started
    assert len(jobs) == 1
    assert 0.9 <= waited < 5


def test_long_poll_returns_empty_after_its_wait(server, worker):
    started = time.monotonic()
    assert worker.claim(wait=1.0) == []
    assert 1.0 <= time.monotonic() - started < 3


def test_cancel_and_failure_racing_completions_never_deadlock(server, keys, submitter, worker):
    """Every transaction locks the transcription before its jobs: a cancel, a job going
    dead and the last completions at the same moment all succeed or are fenced."""
    workers = [ProtocolWorker(server, keys["worker"], name=f"race-{i}") for i in range(6)]
    for round_ in range(10):
        tid = submit_planned(submitter, worker, 6)
        held = [(w, w.claim()[0]) for w in workers]
        barrier = threading.Barrier(len(held) + 1)

        def finish(pair, barrier=barrier, round_=round_):
            w, job = pair
            barrier.wait()
            if job["chunk"]["index"] == round_ % 6:
                return w.fail(job, "broken chunk", permanent=True).status_code
            return w.complete(job, chunk_transcript(job)).status_code

        def cancel(barrier=barrier, tid=tid):
            barrier.wait()
            return submitter.post(f"/v1/transcriptions/{tid}/cancel").status_code

        with ThreadPoolExecutor(len(held) + 1) as pool:
            canceled = pool.submit(cancel)
            statuses = [*pool.map(finish, held), canceled.result()]
        assert set(statuses) <= {200, 409}, statuses
        states = {r["state"] for r in job_rows(server, tid)}
        assert "leased" not in states and "queued" not in states
        view = submitter.get(f"/v1/transcriptions/{tid}").json()
        assert view["state"] in ("canceled", "failed")
    for w in workers:
        w.close()


def test_a_long_poll_whose_worker_hung_up_claims_nothing(server, keys, submitter, worker):
    with pytest.raises(httpx.ReadTimeout):  # the worker gives up on its long poll
        worker.http.post(
            "/v1/jobs/claim", json={"worker_id": worker.id, "wait_seconds": 20}, timeout=1
        )
    time.sleep(0.5)
    tid = submit(submitter, b"x").json()["id"]
    other = ProtocolWorker(server, keys["worker"], name="other")
    [job] = other.claim(wait=5)  # not swallowed by the abandoned poll
    assert job["transcription_id"] == tid
