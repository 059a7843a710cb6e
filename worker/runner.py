"""The pull loop: register, then claim → read → run the engine → complete, heartbeating
meanwhile. While the engine runs a batch, the next one is claimed and read; a batch's
completions go with the next claim, in one request.

A worker is stateless: everything it holds is a lease, and a lease it cannot finish
(it died, or lost the network) expires and another worker takes the job over.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import hashlib
import json
import logging
import math
import os
import signal
import socket
import time
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from uuid import UUID

import numpy as np

from shared import urlguard
from shared.protocol import (
    SPAN_STRIDE,
    BatchItemOutcome,
    CachedChunk,
    ChunkPlan,
    ChunkSpan,
    ChunkTranscript,
    ClaimedJob,
    Voice,
    WorkerCapabilities,
)
from worker.audio import MediaError, Probe, probe_source, read_range, seconds_to_samples
from worker.chunking import plan_source, quiet_cuts, span_starts
from worker.client import BoardClient, BoardError, LeaseLost
from worker.egress import Egress
from worker.engines import Engine, EngineInput, load_engine
from worker.voices import VoiceEncoderMissing, embed_speech, pack

log = logging.getLogger("scribefarm.worker")


def cache_key(item: EngineInput, engine: Engine) -> str:
    """Same audio, speech map, model and decoding options: the same transcript."""
    digest = hashlib.sha256()
    options = [engine.name, ",".join(engine.models), item.language, item.word_timestamps]
    options += [item.prompt, item.hotwords, item.speech and [list(s) for s in item.speech]]
    digest.update(json.dumps(options).encode())
    digest.update(item.audio.astype("<f4").tobytes())
    return digest.hexdigest()


def reuse(job: ClaimedJob, cached: CachedChunk, key: str) -> ChunkTranscript:
    return ChunkTranscript(
        segments=[s.shifted(job.chunk.start) for s in cached.segments],
        language=cached.language,
        language_probability=cached.language_probability,
        audio_seconds=job.chunk.end - job.chunk.start,
        processing_seconds=0.0,
        cache_key=key,
        cached=True,
    )


def with_voices(
    transcribed: list[tuple[ClaimedJob, EngineInput, ChunkTranscript]],
) -> list[tuple[ClaimedJob, EngineInput, ChunkTranscript]]:
    """Each chunk whose transcription tells speakers apart, with the voices of its speech
    (where the plan found speech; else where the words are): all of them in one batch."""
    diarized = [i for i, (job, _, _) in enumerate(transcribed) if job.options.diarize]
    if not diarized:
        return transcribed
    chunks = []
    for i in diarized:
        job, item, result = transcribed[i]
        speech = job.chunk.speech or [(s.start, s.end) for s in result.segments]
        chunks.append((item.audio, item.offset, speech))
    heard = list(transcribed)
    for i, windows in zip(diarized, embed_speech(chunks), strict=True):
        job, item, result = heard[i]
        voices = [Voice(start=s, end=e, embedding=pack(vector)) for s, e, vector in windows]
        heard[i] = (job, item, result.model_copy(update={"voices": voices}))
    return heard


Finished = list[tuple[ClaimedJob, ChunkPlan | ChunkTranscript]]
Input = tuple[ClaimedJob, EngineInput, str]  # a transcribe job, its audio, its cache key


def log_dropped(outcomes: list[BatchItemOutcome]) -> None:
    for outcome in outcomes:
        if outcome.error is not None:
            log.info("dropping the result of job %s: %s", outcome.job_id, outcome.error.message)


@dataclass
class WorkerConfig:
    server: str
    key: str
    engine: str = "faster-whisper"
    model: str | None = None
    device: str = "auto"
    threads: int = 0
    batch_size: int = 8
    name: str = field(default_factory=lambda: f"{socket.gethostname()}-{os.getpid()}")
    claim_audio_seconds: float = 120.0
    # Long polls: each costs the board one request; 50 s stays under the common 60 s
    # idle timeout of proxies and load balancers.
    claim_wait_seconds: float = 50.0
    exit_when_idle: float | None = None
    max_jobs: int | None = None
    grace_seconds: float = 30.0
    # Private addresses users' URL sources may point at (see shared/urlguard.py).
    url_allowlist: tuple[str, ...] = ()


class Worker:
    def __init__(self, config: WorkerConfig, engine: Engine | None = None):
        self.config = config
        self.engine = engine
        self.client = BoardClient(config.server, config.key)
        self.held: dict[str, ClaimedJob] = {}
        # Transcribe results not sent yet: they go with the next claim (or at exit).
        self.finished: Finished = []
        # Short sources' plans, by chunk job: completed with the transcript of their chunk.
        self.short_plans: dict[str, ChunkPlan] = {}
        self.lost: set[str] = set()
        self.jobs_done = 0
        self.stopping = False
        self._claim: asyncio.Task | None = None

    async def run(self) -> int:
        if self.engine is None:
            self.engine = await asyncio.to_thread(
                load_engine,
                self.config.engine,
                self.config.model,
                device=self.config.device,
                cpu_threads=self.config.threads,
                batch_size=self.config.batch_size,
            )
        registration = await self.client.register(self.capabilities())
        log.info("registered as %s (%s)", registration.worker_id, self.config.name)
        self._install_signal_handlers()
        heartbeats = asyncio.create_task(self._heartbeat_loop(registration.heartbeat_seconds))
        try:
            await self._pull_loop()
        finally:
            heartbeats.cancel()
            await self.client.close()
            if "egress" in self.__dict__:  # made (cached_property) only if needed
                self.egress.close()
        log.info("stopped after %d job(s)", self.jobs_done)
        return 0

    def capabilities(self) -> WorkerCapabilities:
        assert self.engine is not None
        return WorkerCapabilities(
            name=self.config.name,
            engine=self.engine.name,
            models=list(self.engine.models),
            device=self.engine.device,
            batch_size=self.config.batch_size,
        )

    # --- the loop -------------------------------------------------------------

    async def _pull_loop(self) -> None:
        last_busy = time.monotonic()
        ready: list[Input] | None = None  # the next batch: claimed, planned and read
        while not self.stopping and not self._reached_max_jobs():
            if ready is None:
                wait = self.config.claim_wait_seconds
                if self.config.exit_when_idle is not None:
                    idle_left = self.config.exit_when_idle - (time.monotonic() - last_busy)
                    if idle_left <= 0:
                        log.info("idle for %.0f s: exiting", self.config.exit_when_idle)
                        break
                    wait = min(wait, idle_left)
                jobs = await self._claim_jobs(wait)
                if not jobs:
                    continue
                ready = await self.prepare(jobs)
            # While the engine runs this batch, the next one is claimed and read.
            running = asyncio.create_task(self._run_engine(ready))
            ready = await self._prefetch()
            await running
            last_busy = time.monotonic()
        await self._send(self._take_finished())
        await self._release_held()  # a batch read ahead but not run: back to the queue now

    async def _prefetch(self) -> list[Input] | None:
        """The next batch, claimed without waiting (this worker has work) and made ready.
        Not with --max-jobs: jobs held ahead would count past it."""
        if self.stopping or self.config.max_jobs is not None:
            return None
        jobs = await self._claim_jobs(0)
        return await self.prepare(jobs) if jobs else None

    def _reached_max_jobs(self) -> bool:
        return self.config.max_jobs is not None and self.jobs_done >= self.config.max_jobs

    async def _claim_jobs(self, wait: float) -> list[ClaimedJob]:
        """Sends what the last batch finished and claims the next jobs, in one request."""
        capacity = self.config.batch_size
        if self.config.max_jobs is not None:
            capacity = min(capacity, self.config.max_jobs - self.jobs_done)
        finished = self._take_finished()
        claim = (capacity, wait, self.config.claim_audio_seconds)
        self._claim = asyncio.create_task(self.client.complete(finished, claim=claim))
        try:
            batch = await self._claim
        except asyncio.CancelledError:
            if self.stopping:  # again, without the claim: a repeated completion is harmless
                await self._send(finished)
                return []
            raise
        finally:
            self._claim = None
        log_dropped(batch.outcomes)
        self.held.update({str(job.id): job for job in batch.jobs})
        return batch.jobs

    async def prepare(self, jobs: list[ClaimedJob]) -> list[Input]:
        """Chunk jobs first (they unblock whole files), then the rest read for one batch
        through the engine, with the short sources the chunk jobs decoded; chunks found
        in the cache are done."""
        inputs = []
        for job in jobs:
            if job.kind == "chunk":
                inputs += await self._chunk(job)
        batch = [job for job in jobs if job.kind == "transcribe"]
        inputs += await self._read(batch) if batch else []
        return await self._uncached(inputs)

    async def _chunk(self, job: ClaimedJob) -> list[Input]:
        """Plans the job's source; a short one (one chunk) it keeps, to transcribe in
        this batch, and completes the job with its transcript: one job, one decode."""
        kept: list[np.ndarray] = []
        try:
            plan = await self._plan(job, await self._source(job), kept)
        except LeaseLost as exc:  # reported while planning: the job is someone else's now
            self.held.pop(str(job.id), None)
            self.lost.discard(str(job.id))
            log.info("stopped planning job %s: %s", job.id, exc)
            return []
        except MediaError as exc:
            await self._fail(job, exc.reason, exc.permanent)
            return []
        except Exception as exc:  # a bug or a resource problem: another try may succeed
            log.exception("chunking job %s failed", job.id)
            await self._fail(job, f"chunking failed: {exc}", permanent=False)
            return []
        if kept and len(plan.chunks) == 1:
            return [self._short_source(job, plan, np.concatenate(kept))]
        await self._finish([(job, plan)])
        return []

    def _short_source(self, job: ClaimedJob, plan: ChunkPlan, audio: np.ndarray) -> Input:
        """The engine input of a short source's one chunk, from the audio planned: the
        chunk job stands in for its transcribe job, and completes with the plan."""
        chunk = plan.chunks[0]
        options = job.options.model_copy(update={"language": plan.language or job.options.language})
        standing_in = job.model_copy(update={"chunk": chunk, "options": options})
        self.short_plans[str(job.id)] = plan
        first, last = seconds_to_samples(chunk.start), seconds_to_samples(chunk.end)
        item = self._engine_input(standing_in, audio[first:last], chunk)
        return standing_in, item, cache_key(item, self.engine)

    async def _plan(self, job: ClaimedJob, source: str, kept: list[np.ndarray]) -> ChunkPlan:
        """The plan of the job's span; or a long source's first job splits the source
        into spans, queues the others' chunk jobs and plans the first; or the whole
        source's. Chunks are queued as they settle, unless the language must be detected
        first (from the first speech, for every chunk of every span)."""
        detect = self._detects_language_once(job)
        deadline = time.monotonic() + (job.max_job_seconds or math.inf)
        if job.span is not None:
            span = job.span
            return await self._plan_range(
                job, source, deadline, span.start, span.end, span.index * SPAN_STRIDE, True
            )
        starts, probe = [], None
        if job.plan_span_seconds:  # probed once: planning the first span needs it too
            probe = await asyncio.to_thread(probe_source, source)
            limit = job.max_audio_seconds or math.inf
            starts = span_starts(probe.declared_seconds, job.plan_span_seconds, limit)
        plan_range = functools.partial(self._plan_range, job, source, deadline, probe=probe)
        cuts = await asyncio.to_thread(quiet_cuts, source, starts[:1]) if starts else []
        if not cuts:
            return await self._plan_whole(job, source, plan_range, detect, kept)
        # The first span is planned while the other cuts are found and split off.
        first = asyncio.create_task(plan_range(0.0, cuts[0], 0, not detect))
        try:
            cuts += await asyncio.to_thread(quiet_cuts, source, starts[1:])
            language = None
            if detect:
                if not (await first).chunks:  # no speech to detect the language from
                    return await self._plan_whole(job, source, plan_range, detect, [])
                language = await asyncio.to_thread(self._first_language, job, source, await first)
            spans = await self.client.split(job, cuts, language)
        except BaseException:
            first.cancel()
            raise
        plan = await first
        if spans[0].start != cuts[0]:  # an earlier attempt split it elsewhere
            plan = await plan_range(0.0, spans[0].start, 0, not detect)
        return plan.model_copy(update={"language": language})

    async def _plan_whole(
        self,
        job: ClaimedJob,
        source: str,
        plan_range: Callable[..., Awaitable[ChunkPlan]],
        detect: bool,
        kept: list[np.ndarray],
    ) -> ChunkPlan:
        plan = await plan_range(0.0, None, 0, not detect, kept)
        if detect and plan.chunks:
            plan.language = await asyncio.to_thread(self._first_language, job, source, plan)
        return plan

    async def _plan_range(
        self,
        job: ClaimedJob,
        source: str,
        deadline: float,
        start: float,
        end: float | None,
        first_index: int,
        settle: bool,
        keep: list[np.ndarray] | None = None,
        probe: Probe | None = None,
    ) -> ChunkPlan:
        return await asyncio.to_thread(
            plan_source,
            source,
            job.chunk_target_seconds,
            job.chunk_max_seconds,
            start=start,
            end=end,
            first_index=first_index,
            max_audio_seconds=job.max_audio_seconds or math.inf,
            deadline=deadline,
            on_settled=self._settler(job) if settle else None,
            keep=keep,
            probe=probe,
        )

    def _settler(self, job: ClaimedJob) -> Callable[[list[ChunkSpan]], None]:
        """What the planner (in its thread) calls with settled chunks: they are sent to
        the board at once. A lost lease stops the planning; any other trouble only
        stops the early reports (the completion carries every chunk anyway)."""
        loop = asyncio.get_running_loop()
        reporting = True

        def settle(chunks: list[ChunkSpan]) -> None:
            nonlocal reporting
            if not reporting:
                return
            try:
                asyncio.run_coroutine_threadsafe(self.client.settle(job, chunks), loop).result()
            except LeaseLost:
                raise
            except Exception as exc:
                reporting = False
                log.warning(
                    "job %s: settled chunks not reported (%s); sent with the plan", job.id, exc
                )

        return settle

    def _detects_language_once(self, job: ClaimedJob) -> bool:
        options = job.options
        once = options.language is None and not options.detect_language_per_chunk
        return once and self.engine.multilingual

    def _first_language(self, job: ClaimedJob, source: str, plan: ChunkPlan) -> str | None:
        """The language of the first speech, for every chunk."""
        first = plan.chunks[0]
        audio = read_range(source, first.start, first.end)
        detected = self.engine.detect_language(self._engine_input(job, audio, first))
        return None if detected is None else detected[0]

    async def _read(self, jobs: list[ClaimedJob]) -> list[Input]:
        """The batch's ranges, read at once (an ffmpeg process each): on a fast engine,
        reading them one after another would take longer than running them."""
        sources = []
        for job in jobs:  # one at a time: the egress proxy checks each user URL
            try:
                sources.append((job, await self._source(job)))
            except MediaError as exc:
                await self._fail(job, exc.reason, exc.permanent)
        audio = await asyncio.gather(*(self._read_range(job, source) for job, source in sources))
        inputs: list[Input] = []
        for (job, _), samples in zip(sources, audio, strict=True):
            if samples is not None:
                item = self._engine_input(job, samples, job.chunk)
                inputs.append((job, item, cache_key(item, self.engine)))
        return inputs

    async def _uncached(self, inputs: list[Input]) -> list[Input]:
        """The inputs the cache does not know; those it knows are done (their voices
        heard here: the cache keeps words, not who spoke them)."""
        cached = await self._cached([key for _, _, key in inputs], [j.id for j, _, _ in inputs])
        hits = [
            (job, item, reuse(job, cached[key], key)) for job, item, key in inputs if key in cached
        ]
        if any(job.options.diarize for job, _, _ in hits):  # else no thread for nothing
            try:
                hits = await asyncio.to_thread(with_voices, hits)
            except VoiceEncoderMissing as exc:
                await self._fail_all([job for job, _, _ in hits], str(exc))
                hits = []
        self._defer([(job, result) for job, _, result in hits])
        return [entry for entry in inputs if entry[2] not in cached]

    async def _read_range(self, job: ClaimedJob, source: str) -> np.ndarray | None:
        assert job.chunk is not None
        try:
            return await asyncio.to_thread(read_range, source, job.chunk.start, job.chunk.end)
        except MediaError as exc:
            await self._fail(job, exc.reason, exc.permanent)
            return None

    @functools.cached_property
    def egress(self) -> Egress:
        """Made on the first user URL: most workers read only the farm's own storage."""
        return Egress(urlguard.Allowlist.parse(self.config.url_allowlist))

    async def _source(self, job: ClaimedJob) -> str:
        """The URL to read: the farm's storage as given, a user's URL through the egress
        proxy, once it and its redirects are checked."""
        if not job.source_is_external:
            return job.source_url
        try:
            return await asyncio.to_thread(self.egress.open, job.source_url)
        except urlguard.UrlRefused as exc:
            raise MediaError(f"the source URL is refused: {exc}", permanent=True) from exc
        except urlguard.UrlUnreachable as exc:
            raise MediaError(f"the source URL is unreachable: {exc}", permanent=False) from exc

    async def _cached(self, keys: list[str], job_ids: list[UUID]) -> dict[str, CachedChunk]:
        if not keys:
            return {}
        try:
            return await self.client.cached_chunks(keys, job_ids)
        except BoardError as exc:  # the cache only saves time: go on without it
            log.warning("chunk cache unavailable: %s", exc)
            return {}

    async def _run_engine(self, inputs: list[Input]) -> None:
        if not inputs:
            return
        started = time.perf_counter()
        try:
            finished = await asyncio.to_thread(self._transcribe, inputs)
        except VoiceEncoderMissing as exc:  # this worker's install: others may have it
            await self._fail_all([job for job, _, _ in inputs], str(exc))
            return
        except Exception as exc:  # the engine's own failure: worth another try elsewhere
            log.exception("engine failed on a batch of %d", len(inputs))
            await self._fail_all([job for job, _, _ in inputs], f"{self.engine.name} failed: {exc}")
            return
        elapsed = time.perf_counter() - started
        total = sum(len(item.audio) for _, item, _ in inputs) or 1
        self._defer(
            [
                (
                    job,
                    result.model_copy(
                        update={"processing_seconds": elapsed * len(item.audio) / total}
                    ),
                )
                for (job, item, result) in finished
            ]
        )

    def _transcribe(
        self, inputs: list[Input]
    ) -> list[tuple[ClaimedJob, EngineInput, ChunkTranscript]]:
        """The batch through the engine, and the voices of those that tell speakers apart."""
        outputs = self.engine.transcribe_batch([item for _, item, _ in inputs])
        transcribed = [
            (
                job,
                item,
                ChunkTranscript(
                    segments=output.segments,
                    language=output.language,
                    language_probability=output.language_probability,
                    audio_seconds=job.chunk.end - job.chunk.start,
                    processing_seconds=0.0,
                    cache_key=key,
                ),
            )
            for (job, item, key), output in zip(inputs, outputs, strict=True)
        ]
        return with_voices(transcribed)

    @staticmethod
    def _engine_input(job: ClaimedJob, audio: np.ndarray, chunk: ChunkSpan) -> EngineInput:
        first = seconds_to_samples(chunk.start)
        speech = None
        if chunk.speech is not None:  # on the chunk's own samples
            speech = [
                (seconds_to_samples(s) - first, seconds_to_samples(e) - first)
                for s, e in chunk.speech
            ]
        options = job.options
        return EngineInput(
            audio=audio,
            offset=chunk.start,
            language=options.language,
            # Telling speakers apart splits segments where their words change speaker.
            word_timestamps=options.word_timestamps or options.diarize,
            speech=speech,
            prompt=options.prompt,
            hotwords=options.hotwords,
        )

    # --- leases ---------------------------------------------------------------

    async def _finish(self, finished: list[tuple[ClaimedJob, ChunkPlan]]) -> None:
        """Completes jobs now: a chunk job's plan (the file's last chunks wait for it)."""
        self.jobs_done += len(finished)
        self.finished += finished
        await self._send(self._take_finished())

    def _defer(self, finished: list[tuple[ClaimedJob, ChunkTranscript]]) -> None:
        """A batch's transcripts go with the next claim: one round trip per batch. A
        short source's chunk job completes with its plan, carrying the transcript."""
        self.jobs_done += len(finished)
        for job, transcript in finished:
            plan = self.short_plans.pop(str(job.id), None)
            if plan is not None:
                transcript = plan.model_copy(update={"transcript": transcript})
            self.finished.append((job, transcript))

    def _take_finished(self) -> Finished:
        """What is to be sent, no longer held (heartbeats stop); lost leases' work dropped."""
        finished = [(job, result) for job, result in self.finished if not self._lost(job)]
        self.finished = []
        for job, _ in finished:
            self._forget(job)
        return finished

    async def _send(self, finished: Finished):
        if finished:
            log_dropped((await self.client.complete(finished)).outcomes)

    async def _fail_all(self, jobs: list[ClaimedJob], reason: str) -> None:
        """A retry elsewhere may succeed."""
        for job in jobs:
            await self._fail(job, reason, permanent=False)

    async def _fail(self, job: ClaimedJob, reason: str, permanent: bool) -> None:
        log.warning(
            "job %s failed (%s): %s", job.id, "permanent" if permanent else "will retry", reason
        )
        if self._lost(job):
            return
        try:
            await self.client.fail(job, reason, permanent)
        except LeaseLost as exc:
            log.info("dropping the failure of job %s: %s", job.id, exc)
        finally:
            self._forget(job)

    def _lost(self, job: ClaimedJob) -> bool:
        """A job whose heartbeat found its lease gone: its work is dropped unsent."""
        if str(job.id) not in self.lost:
            return False
        log.info("dropping the work of job %s: its lease was lost", job.id)
        self._forget(job)
        return True

    def _forget(self, job: ClaimedJob) -> None:
        self.held.pop(str(job.id), None)
        self.lost.discard(str(job.id))
        self.short_plans.pop(str(job.id), None)

    async def _heartbeat_loop(self, every_seconds: float) -> None:
        while True:
            await asyncio.sleep(every_seconds)
            for key, job in list(self.held.items()):
                try:
                    await self.client.heartbeat(job)
                except LeaseLost as exc:
                    if key not in self.held:
                        # Finished while this heartbeat was on its way: the 409 only
                        # says the job succeeded. Nothing is lost, nothing to remember.
                        continue
                    log.warning("lost the lease on job %s: %s", key, exc)
                    self.lost.add(key)
                except Exception as exc:  # keep beating for the other jobs
                    log.warning("heartbeat for job %s failed: %s", key, exc)

    # --- shutdown -------------------------------------------------------------

    def _install_signal_handlers(self) -> None:
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGTERM, signal.SIGINT):
            loop.add_signal_handler(sig, self.stop)

    def stop(self) -> None:
        """Stop claiming; finish what is held within the grace period, else give it back."""
        if self.stopping:
            return
        self.stopping = True
        log.info("stopping: finishing %d held job(s)", len(self.held))
        if self._claim is not None:
            self._claim.cancel()
        asyncio.get_running_loop().create_task(self._release_after_grace())

    async def _release_after_grace(self) -> None:
        await asyncio.sleep(self.config.grace_seconds)
        released = await self._release_held()
        log.info("grace period over: released %d job(s), exiting", released)
        logging.shutdown()
        os._exit(0)  # the engine's thread cannot be interrupted; the leases are back

    async def _release_held(self) -> int:
        """Gives back every job held (the attempt does not count), for others to take."""
        held = list(self.held.values())
        for job in held:
            with contextlib.suppress(Exception):
                await self.client.release(job)
            self._forget(job)
        return len(held)
