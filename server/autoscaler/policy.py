"""How many workers the queue needs: a pure function of what the board says.

    workers = ceil(queued audio seconds / (seconds of audio one worker transcribes per
              second × the target completion time))

at least one while anything is queued (a chunk job's audio is unknown until it is
chunked), never above the ceiling, and none when nothing is queued. The autoscaler only
ever starts workers: workers exit by themselves once idle (--exit-when-idle), so a
worker is never stopped in the middle of a job to scale down.
"""

from __future__ import annotations

import math
from dataclasses import dataclass


@dataclass(frozen=True)
class QueueState:
    queued_jobs: int  # waiting for a worker, of any kind
    queued_audio_seconds: float  # their audio (transcribe jobs)
    leased_jobs: int  # held by a worker now
    recent_audio_seconds: float = 0.0  # transcribed lately, summed over workers
    recent_busy_seconds: float = 0.0  # each worker's time spent on it, summed

    @property
    def measured_speed(self) -> float | None:
        """Audio seconds one worker transcribes per second of its time, end to end
        (download, decoding, model, reporting), or None before any was measured."""
        if self.recent_busy_seconds <= 0 or self.recent_audio_seconds <= 0:
            return None
        return self.recent_audio_seconds / self.recent_busy_seconds

    @property
    def idle(self) -> bool:
        return self.queued_jobs == 0 and self.leased_jobs == 0


def desired_workers(
    state: QueueState, *, target_seconds: float, max_workers: int, assumed_speed: float
) -> int:
    if state.queued_jobs == 0:
        return 0
    speed = state.measured_speed or assumed_speed
    needed = math.ceil(state.queued_audio_seconds / (speed * target_seconds))
    return min(max_workers, max(1, needed))
