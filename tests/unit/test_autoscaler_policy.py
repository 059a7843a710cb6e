"""The autoscaler's policy: how many workers a queue needs (no I/O)."""

from server.autoscaler.policy import QueueState, desired_workers

TEN_MINUTES = 600.0


def desired(state: QueueState, max_workers: int = 10, assumed_speed: float = 10.0) -> int:
    return desired_workers(
        state, target_seconds=60.0, max_workers=max_workers, assumed_speed=assumed_speed
    )


def queued(audio_seconds: float, jobs: int = 10, **recent: float) -> QueueState:
    return QueueState(queued_jobs=jobs, queued_audio_seconds=audio_seconds, leased_jobs=0, **recent)


def test_nothing_queued_wants_no_worker_even_while_some_are_busy():
    busy = QueueState(queued_jobs=0, queued_audio_seconds=0.0, leased_jobs=4)
    assert desired(busy) == 0


def test_workers_finish_the_queued_audio_within_the_target_at_the_assumed_speed():
    # 10 minutes of audio at 10x realtime is 60 worker-seconds: one worker in 60 s.
    assert desired(queued(TEN_MINUTES)) == 1
    assert desired(queued(TEN_MINUTES + 1)) == 2
    assert desired(queued(3 * TEN_MINUTES)) == 3


def test_measured_speed_replaces_the_assumption():
    # Workers did 1200 s of audio in 600 s of their time: 2x realtime, not 10x.
    slow = queued(TEN_MINUTES, recent_audio_seconds=1200.0, recent_busy_seconds=600.0)
    assert slow.measured_speed == 2.0
    assert desired(slow) == 5


def test_a_queued_chunk_job_of_unknown_length_wants_one_worker():
    assert desired(queued(0.0, jobs=1)) == 1


def test_never_above_the_ceiling():
    assert desired(queued(100 * TEN_MINUTES), max_workers=3) == 3


def test_idle_means_nothing_queued_and_nothing_leased():
    assert QueueState(0, 0.0, 0).idle
    assert not QueueState(0, 0.0, 1).idle
    assert not QueueState(1, 0.0, 0).idle
