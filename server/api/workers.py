"""The worker protocol: register, claim (long poll), heartbeat, complete, fail, release.

Every write that names a lease is fenced: a lease that is no longer the job's current
one gets 409 and changes nothing.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable
from typing import Annotated, Any
from uuid import UUID

from fastapi import APIRouter, Depends, Header, Request

from server.auth import WAIT_RECHECK_SECONDS, Caller, allow, key_gone
from server.board.errors import BoardError
from server.errors import ApiError, error_responses
from server.state import ServerState, server_state
from shared.protocol import (
    PROTOCOL_HEADER,
    PROTOCOL_VERSION,
    BatchItemOutcome,
    BatchOutcome,
    BatchRequest,
    CacheHits,
    CacheLookup,
    ChunkSpan,
    ClaimedJob,
    ClaimRequest,
    ClaimResponse,
    CompleteRequest,
    ErrorBody,
    FailRequest,
    JobOutcome,
    LeaseRequest,
    LeaseResponse,
    PlanSpan,
    Registration,
    SettledChunks,
    SplitRequest,
    SplitResponse,
    TranscriptionOptions,
    WorkerCapabilities,
)


async def protocol_version(
    version: Annotated[str | None, Header(alias=PROTOCOL_HEADER)] = None,
) -> None:
    """Workers of another major version, or an older minor one, must upgrade first."""
    ours = tuple(int(p) for p in PROTOCOL_VERSION.split("."))
    try:
        theirs = tuple(int(p) for p in (version or "").split("."))
    except ValueError:
        theirs = ()
    if len(theirs) != 2 or theirs[0] != ours[0] or theirs[1] < ours[1]:
        raise ApiError(
            426,
            "upgrade_required",
            f"this board speaks worker protocol {PROTOCOL_VERSION}; the worker sent "
            f"{PROTOCOL_HEADER}: {version or '(none)'}. Upgrade the worker.",
        )


router = APIRouter(
    prefix="/v1",
    tags=["worker protocol"],
    dependencies=[Depends(protocol_version)],
    responses=error_responses(
        400, 401, 403, 422, 426, descriptions={400: "The body is not UTF-8 (`malformed_body`)."}
    ),
)
WorkerKey = Annotated[Caller, allow("worker")]
LEASE_ERRORS = error_responses(
    409,
    descriptions={
        409: "The lease is no longer current, the job was canceled, or it is gone "
        "(`lease_lost`, `job_canceled`, `job_gone`): drop its work."
    },
)


@router.post(
    "/workers",
    response_model=Registration,
    status_code=201,
    responses=error_responses(429, descriptions={429: "The board has SCRIBEFARM_MAX_WORKERS."}),
)
async def register(request: Request, caps: WorkerCapabilities, caller: WorkerKey) -> Registration:
    state = server_state(request)
    worker_id = await state.board.queue.register_worker(caller.key_id, caps.model_dump())
    lease = state.settings.lease_seconds
    return Registration(worker_id=worker_id, lease_seconds=lease, heartbeat_seconds=lease / 3)


@router.post(
    "/jobs/claim",
    response_model=ClaimResponse,
    responses=error_responses(
        404, descriptions={404: "The worker is not registered with this key: register again."}
    ),
)
async def claim(request: Request, body: ClaimRequest, caller: WorkerKey) -> ClaimResponse:
    """Claims up to `max_jobs` jobs this worker can run; waits up to `wait_seconds` for
    work to arrive when there is none."""
    return ClaimResponse(jobs=await claim_jobs(request, body, caller))


async def claim_jobs(request: Request, body: ClaimRequest, caller: Caller) -> list[ClaimedJob]:
    state = server_state(request)
    loop = asyncio.get_running_loop()
    # An idle worker must be heard from before it would look gone.
    deadline = loop.time() + min(body.wait_seconds, state.settings.worker_gone_seconds / 2)

    def claim_now():
        return state.board.queue.claim(
            body.worker_id,
            caller.key_id,
            body.max_jobs,
            body.max_audio_seconds,
            state.settings.lease_seconds,
        )

    rows = await claim_now()
    if not rows and body.wait_seconds > 0:
        # The body has been read, so receive() now returns only when the worker hangs
        # up: then nobody would get what we claimed, so stop waiting.
        hung_up = asyncio.ensure_future(request.receive())
        try:
            while not rows and (remaining := deadline - loop.time()) > 0:
                # In slices, so a revoked key's long poll ends within 5 s.
                slice_ = min(remaining, WAIT_RECHECK_SECONDS)
                rung = asyncio.ensure_future(state.doorbell.wait(slice_))
                await asyncio.wait({rung, hung_up}, return_when=asyncio.FIRST_COMPLETED)
                if hung_up.done():
                    rung.cancel()
                    return []
                if not await state.keys.active(state.board, caller.key_id):
                    raise key_gone()
                if rung.result():  # the database is asked again only when rung
                    rows = await claim_now()
        finally:
            hung_up.cancel()
    base = state.settings.public_url or str(request.base_url).rstrip("/")
    return [claimed_job(row, base, state) for row in rows]


def claimed_job(row: Any, base_url: str, state: ServerState) -> ClaimedJob:
    chunk = span = None
    if row["kind"] == "chunk" and row["seq"] < 0:  # one span of a long source
        span = PlanSpan(index=-row["seq"], start=row["start_seconds"], end=row["end_seconds"])
    if row["kind"] == "transcribe":
        chunk = ChunkSpan(
            index=row["seq"] - 1,
            start=row["start_seconds"],
            end=row["end_seconds"],
            speech=row["speech"],
        )
    options = TranscriptionOptions.model_validate(row["options"])
    if options.language is None and not options.detect_language_per_chunk:
        options.language = row["detected_language"]  # detected once, by the chunk job
    source_url = row["source_url"]
    if source_url is None:
        ttl = state.settings.signed_url_seconds
        source_url = state.storage.media_url(row["source_key"], ttl, base_url)
    return ClaimedJob(
        id=row["id"],
        kind=row["kind"],
        lease_id=row["lease_id"],
        lease_expires_at=row["lease_expires_at"],
        attempt=row["attempts"],
        transcription_id=row["transcription_id"],
        source_url=source_url,
        source_is_external=row["source_url"] is not None,
        options=options,
        model=row["model"] or options.model or state.settings.default_model,
        chunk=chunk,
        span=span,
        plan_span_seconds=(state.settings.plan_span_seconds or None) if row["seq"] == 0 else None,
        chunk_target_seconds=options.target_chunk_seconds or state.settings.default_chunk_seconds,
        chunk_max_seconds=state.settings.max_chunk_seconds,
        max_audio_seconds=state.settings.max_audio_seconds,
        max_job_seconds=state.settings.max_job_seconds,
    )


@router.post("/chunk-cache/lookup", response_model=CacheHits)
async def cache_lookup(request: Request, body: CacheLookup, caller: WorkerKey) -> CacheHits:
    """Earlier results for chunks with the same audio, model and options: the worker
    reuses them instead of running the model."""
    board = server_state(request).board
    return CacheHits(results=await board.cache.lookup(body.keys, body.job_ids, caller.key_id))


@router.post("/jobs/{job_id}/heartbeat", response_model=LeaseResponse, responses=LEASE_ERRORS)
async def heartbeat(
    request: Request, job_id: UUID, body: LeaseRequest, caller: WorkerKey
) -> LeaseResponse:
    state = server_state(request)
    expires = await state.board.queue.heartbeat(job_id, body.lease_id, state.settings.lease_seconds)
    return LeaseResponse(lease_expires_at=expires)


@router.post("/jobs/{job_id}/complete", response_model=JobOutcome, responses=LEASE_ERRORS)
async def complete(
    request: Request, job_id: UUID, body: CompleteRequest, caller: WorkerKey
) -> JobOutcome:
    """Records the result. A chunk job's plan fans out into transcribe jobs; the
    completion that counts the last transcribe job done has the transcript merged."""
    state = await server_state(request).board.queue.complete(job_id, body.lease_id, body.result)
    return JobOutcome(state=state)


@router.post(
    "/jobs/batch",
    response_model=BatchOutcome,
    responses=error_responses(
        404, descriptions={404: "`claim` names a worker not registered with this key."}
    ),
)
async def batch(request: Request, body: BatchRequest, caller: WorkerKey) -> BatchOutcome:
    """Completes and fails many jobs in one request (an engine batch), each fenced on its
    own lease: a lost lease is that item's `error`, not the request's. With `claim`, then
    claims the next jobs, as `POST /v1/jobs/claim` does: one round trip per batch."""
    queue = server_state(request).board.queue
    outcomes = []
    for done in body.completions:
        outcomes.append(
            await outcome_of(done.job_id, queue.complete(done.job_id, done.lease_id, done.result))
        )
    for failed in body.failures:
        failing = queue.fail(failed.job_id, failed.lease_id, failed.error, failed.permanent)
        outcomes.append(await outcome_of(failed.job_id, failing))
    jobs = await claim_jobs(request, body.claim, caller) if body.claim else []
    return BatchOutcome(outcomes=outcomes, jobs=jobs)


async def outcome_of(job_id: UUID, recording: Awaitable) -> BatchItemOutcome:
    try:
        result = await recording
    except BoardError as exc:
        return BatchItemOutcome(job_id=job_id, error=ErrorBody(code=exc.code, message=exc.message))
    state, run_after = result if isinstance(result, tuple) else (result, None)
    return BatchItemOutcome(job_id=job_id, state=state, run_after=run_after)


@router.post("/jobs/{job_id}/chunks", response_model=JobOutcome, responses=LEASE_ERRORS)
async def settle(
    request: Request, job_id: UUID, body: SettledChunks, caller: WorkerKey
) -> JobOutcome:
    """A chunk job, while it still reads its source, reports chunks no later audio can
    change: their transcribe jobs are queued at once, so other workers start on a long
    file while it is being planned. Its completion's plan holds them again; each chunk
    is queued once."""
    await server_state(request).board.queue.settle(job_id, body.lease_id, body.chunks)
    return JobOutcome(state="leased")


@router.post("/jobs/{job_id}/split", response_model=SplitResponse, responses=LEASE_ERRORS)
async def split(
    request: Request, job_id: UUID, body: SplitRequest, caller: WorkerKey
) -> SplitResponse:
    """A long source's first chunk job cuts it into spans at quiet points: a chunk job
    is queued for each further span, so several workers plan the source at once, each
    reading only its span. Asked again (a retried job), it returns the spans queued the
    first time: the first span ends where they start."""
    queue = server_state(request).board.queue
    spans = await queue.split(job_id, body.lease_id, body.cuts, body.language)
    return SplitResponse(spans=spans)


@router.post("/jobs/{job_id}/fail", response_model=JobOutcome, responses=LEASE_ERRORS)
async def fail(request: Request, job_id: UUID, body: FailRequest, caller: WorkerKey) -> JobOutcome:
    """Retried with exponential backoff until its attempts run out; `permanent` errors
    (a file that is not media) fail the transcription at once."""
    state, run_after = await server_state(request).board.queue.fail(
        job_id, body.lease_id, body.error, body.permanent
    )
    return JobOutcome(state=state, run_after=run_after)


@router.post("/jobs/{job_id}/release", response_model=JobOutcome, responses=LEASE_ERRORS)
async def release(
    request: Request, job_id: UUID, body: LeaseRequest, caller: WorkerKey
) -> JobOutcome:
    """Gives a job back untouched (a worker shutting down); the attempt does not count."""
    await server_state(request).board.queue.release(job_id, body.lease_id)
    return JobOutcome(state="queued")
