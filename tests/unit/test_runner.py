"""The worker's lease bookkeeping, with a stand-in board (no I/O)."""

from __future__ import annotations

import asyncio
import logging
from types import SimpleNamespace
from uuid import uuid4

from worker.client import LeaseLost
from worker.runner import Worker, WorkerConfig


def heartbeat_once(finished_meanwhile: bool) -> Worker:
    """One round of heartbeats for one held job, whose heartbeat the board answers 409
    (as it does once the job succeeded); the job's completion may land first."""

    async def scenario() -> Worker:
        worker = Worker(WorkerConfig(server="http://127.0.0.1:9", key="k"), engine=object())
        job = SimpleNamespace(id=uuid4())
        worker.held[str(job.id)] = job
        answered = asyncio.Event()

        async def heartbeat(_job: object) -> None:
            if finished_meanwhile:  # its completion was sent while this was on its way
                worker.held.pop(str(job.id))
            answered.set()
            raise LeaseLost(f"lease is no longer current for job {job.id} (the job is succeeded)")

        worker.client = SimpleNamespace(heartbeat=heartbeat)  # type: ignore[assignment]
        beats = asyncio.create_task(worker._heartbeat_loop(0.01))
        await asyncio.wait_for(answered.wait(), 10)
        await asyncio.sleep(0)  # let the loop handle the answer
        beats.cancel()
        return worker

    return asyncio.run(scenario())


def test_a_409_for_a_job_finished_meanwhile_is_not_a_lost_lease(caplog):
    with caplog.at_level(logging.INFO, logger="scribefarm.worker"):
        worker = heartbeat_once(finished_meanwhile=True)
    assert worker.lost == set()  # nothing to drop, and nothing remembered forever
    assert "lost the lease" not in caplog.text


def test_a_409_for_a_held_job_marks_it_lost(caplog):
    with caplog.at_level(logging.WARNING, logger="scribefarm.worker"):
        worker = heartbeat_once(finished_meanwhile=False)
    assert worker.lost == set(worker.held) and len(worker.lost) == 1
    assert "lost the lease" in caplog.text
