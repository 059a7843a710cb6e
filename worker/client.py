"""The worker's side of the wire: the board's HTTP protocol, with retries.

Transient failures (connection errors, 5xx, 429) are retried with exponential backoff
and jitter; other 4xx are not. A 409 means the lease is gone: LeaseLost.
"""

from __future__ import annotations

import logging
from typing import Any
from uuid import UUID

import httpx
from tenacity import (
    AsyncRetrying,
    retry_if_exception,
    stop_after_delay,
    wait_exponential_jitter,
)

from shared.protocol import (
    PROTOCOL_HEADER,
    PROTOCOL_VERSION,
    BatchOutcome,
    CachedChunk,
    CacheHits,
    ChunkSpan,
    ClaimedJob,
    JobOutcome,
    PlanSpan,
    Registration,
    SplitResponse,
    WorkerCapabilities,
)

log = logging.getLogger(__name__)


class LeaseLost(Exception):
    """The job's lease is no longer ours (expired and taken over, or canceled)."""


class BoardError(Exception):
    """The board refused a request in a way a retry cannot fix."""

    def __init__(self, status: int, message: str):
        super().__init__(f"{status}: {message}")
        self.status = status


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, httpx.TransportError):
        return True
    if isinstance(exc, httpx.HTTPStatusError):
        status = exc.response.status_code
        return status >= 500 or status == 429
    return False


class BoardClient:
    def __init__(self, server_url: str, key: str, retry_seconds: float = 300.0):
        self.http = httpx.AsyncClient(
            base_url=server_url.rstrip("/"),
            headers={"Authorization": f"Bearer {key}", PROTOCOL_HEADER: PROTOCOL_VERSION},
            timeout=httpx.Timeout(30.0, read=90.0),
        )
        self.retry_seconds = retry_seconds
        self.worker_id: UUID | None = None

    async def close(self) -> None:
        await self.http.aclose()

    async def _post(self, path: str, body: dict[str, Any], read_timeout: float = 90.0) -> Any:
        async for attempt in AsyncRetrying(
            retry=retry_if_exception(is_transient),
            wait=wait_exponential_jitter(initial=0.5, max=30),
            stop=stop_after_delay(self.retry_seconds),
            reraise=True,
            before_sleep=lambda state: log.warning(
                "board unreachable (%s), retrying", state.outcome.exception()
            ),
        ):
            with attempt:
                response = await self.http.post(
                    path, json=body, timeout=httpx.Timeout(30.0, read=read_timeout)
                )
                if response.status_code == 409:
                    raise LeaseLost(response.json().get("message", "lease lost"))
                if response.status_code >= 500 or response.status_code == 429:
                    response.raise_for_status()
                if response.status_code >= 400:
                    raise BoardError(response.status_code, error_message(response))
                return response.json()

    async def register(self, caps: WorkerCapabilities) -> Registration:
        registration = Registration.model_validate(
            await self._post("/v1/workers", caps.model_dump())
        )
        self.worker_id = registration.worker_id
        return registration

    async def claim(
        self, max_jobs: int, wait_seconds: float, max_audio_seconds: float | None
    ) -> list[ClaimedJob]:
        return (await self.complete([], claim=(max_jobs, wait_seconds, max_audio_seconds))).jobs

    async def cached_chunks(self, keys: list[str], job_ids: list[UUID]) -> dict[str, CachedChunk]:
        """Hits for keys[i] among what the owner of job_ids[i] stored (the cache is per owner)."""
        body = {"keys": keys, "job_ids": [str(job) for job in job_ids]}
        data = await self._post("/v1/chunk-cache/lookup", body)
        return CacheHits.model_validate(data).results

    async def heartbeat(self, job: ClaimedJob) -> None:
        await self._post(f"/v1/jobs/{job.id}/heartbeat", {"lease_id": str(job.lease_id)})

    async def complete(
        self,
        finished: list[tuple[ClaimedJob, Any]],
        claim: tuple[int, float, float | None] | None = None,
    ) -> BatchOutcome:
        """Results of many jobs in one request, each fenced on its own lease (a lost one
        is its outcome's `error`), and with `claim` (max_jobs, wait_seconds,
        max_audio_seconds) the next jobs in the same round trip. A batch over the board's
        result limit (413) goes in halves, then the claim on its own."""
        body: dict[str, Any] = {"completions": [completion(job, r) for job, r in finished]}
        wait = 0.0
        if claim is not None:
            max_jobs, wait, max_audio_seconds = claim
            body["claim"] = {
                "worker_id": str(self.worker_id),
                "max_jobs": max_jobs,
                "wait_seconds": wait,
                "max_audio_seconds": max_audio_seconds,
            }
        try:
            data = await self._post("/v1/jobs/batch", body, read_timeout=wait + 30)
        except BoardError as exc:
            if exc.status != 413 or len(finished) < 2:
                raise
            half = len(finished) // 2
            first, rest = await self.complete(finished[:half]), await self.complete(finished[half:])
            jobs = await self.claim(*claim) if claim is not None else []
            return BatchOutcome(outcomes=first.outcomes + rest.outcomes, jobs=jobs)
        return BatchOutcome.model_validate(data)

    async def settle(self, job: ClaimedJob, chunks: list[ChunkSpan]) -> None:
        body = {"lease_id": str(job.lease_id), "chunks": [c.model_dump() for c in chunks]}
        await self._post(f"/v1/jobs/{job.id}/chunks", body)

    async def split(
        self, job: ClaimedJob, cuts: list[float], language: str | None
    ) -> list[PlanSpan]:
        body = {"lease_id": str(job.lease_id), "cuts": cuts, "language": language}
        data = await self._post(f"/v1/jobs/{job.id}/split", body)
        return SplitResponse.model_validate(data).spans

    async def fail(self, job: ClaimedJob, error: str, permanent: bool) -> JobOutcome:
        body = {"lease_id": str(job.lease_id), "error": error[:4000], "permanent": permanent}
        return JobOutcome.model_validate(await self._post(f"/v1/jobs/{job.id}/fail", body))

    async def release(self, job: ClaimedJob) -> None:
        await self._post(f"/v1/jobs/{job.id}/release", {"lease_id": str(job.lease_id)})


def completion(job: ClaimedJob, result: Any) -> dict[str, Any]:
    return {
        "job_id": str(job.id),
        "lease_id": str(job.lease_id),
        "result": result.model_dump(mode="json"),
    }


def error_message(response: httpx.Response) -> str:
    try:
        return response.json()["message"]
    except (ValueError, KeyError, TypeError):
        return response.text[:500]
