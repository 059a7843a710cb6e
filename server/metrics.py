"""Prometheus metrics: what GET /metrics serves.

Two kinds. The board's state (queue depth and queued audio by job kind and state,
leases, live workers, × realtime per model, each worker's engine-busy share, webhook
failures) is shared by every server
process, so it is read from the database at each scrape, in one statement (METRICS in
server/board/reads.py), and exposed as gauges. What one process sees happen (job
durations at completion, the autoscaler's decisions) lives in this process's registry.
"""

from __future__ import annotations

from collections.abc import Iterable
from typing import Any

from prometheus_client import REGISTRY, CollectorRegistry, Gauge, Histogram, generate_latest
from prometheus_client.core import GaugeMetricFamily
from prometheus_client.registry import Collector

# × realtime per model over this window: long enough to span several batches.
SPEED_WINDOW_SECONDS = 600.0

JOB_SECONDS = Histogram(
    "scribefarm_job_duration_seconds",
    "From claim to completion, for the jobs completed through this server process.",
    ["kind"],
    buckets=(0.5, 1, 2, 5, 10, 20, 30, 60, 120, 300, 600, 1800),
)
AUTOSCALER_DESIRED = Gauge(
    "scribefarm_autoscaler_desired_workers", "Workers the autoscaler wants, at its last tick."
)
AUTOSCALER_RUNNING = Gauge(
    "scribefarm_autoscaler_running_workers",
    "Workers the autoscaler's provider has running or starting, at its last tick.",
)


def engine_busy(model_seconds: float | None, window: float, age: float) -> float:
    """The share of the last `window` seconds (or of a worker's `age`, if shorter) its
    model ran."""
    return min((model_seconds or 0) / max(min(window, age), 1.0), 1.0)


def observe_job(kind: str, seconds: float | None) -> None:
    if seconds is not None:
        JOB_SECONDS.labels(kind).observe(seconds)


def gauge(
    name: str, documentation: str, samples: Iterable[tuple[list[str], float]], labels=()
) -> GaugeMetricFamily:
    family = GaugeMetricFamily(name, documentation, labels=list(labels))
    for values, value in samples:
        family.add_metric(values, value)
    return family


def board_families(row: Any) -> list[GaugeMetricFamily]:
    """One scrape's METRICS row (server/board/reads.py) as metric families."""
    groups = [([g["kind"], g["state"]], g) for g in row["jobs"]]
    window = SPEED_WINDOW_SECONDS
    return [
        gauge(
            "scribefarm_jobs",
            "Jobs by kind and state: queued, retrying (waiting for a retry or for a lost "
            "lease to be taken over), leased (a worker holds a live lease), dead.",
            [(labels, g["jobs"]) for labels, g in groups],
            ["kind", "state"],
        ),
        gauge(
            "scribefarm_jobs_audio_seconds",
            "Audio seconds of those jobs (transcribe jobs; chunk jobs count 0 until chunked).",
            [(labels, g["audio_seconds"] or 0) for labels, g in groups],
            ["kind", "state"],
        ),
        gauge(
            "scribefarm_leases",
            "Leases held: live, or expired (to be taken over).",
            [(["live"], row["live_leases"]), (["expired"], row["expired_leases"])],
            ["state"],
        ),
        gauge(
            "scribefarm_workers_active",
            "Workers heard from within SCRIBEFARM_WORKER_GONE_SECONDS.",
            [([], row["workers"])],
        ),
        gauge(
            "scribefarm_model_realtime_factor",
            f"Audio seconds transcribed per second of model time, per model, over the last "
            f"{SPEED_WINDOW_SECONDS:.0f} s.",
            [([m["model"]], m["realtime"]) for m in row["speed"]],
            ["model"],
        ),
        gauge(
            "scribefarm_worker_engine_busy_ratio",
            f"The share of the last {SPEED_WINDOW_SECONDS:.0f} s (or of its life, if "
            "shorter) each live worker's model ran: near 1, the engine never waits for "
            "claims, reads or completions.",
            [
                ([w["name"]], engine_busy(w["model_seconds"], window, w["age_seconds"]))
                for w in row["engine"]
            ],
            ["worker"],
        ),
        gauge(
            "scribefarm_webhook_deliveries",
            "Webhook deliveries that failed for good, or are being retried after a failure.",
            [(["failed"], row["webhooks_failed"]), (["retrying"], row["webhooks_retrying"])],
            ["state"],
        ),
    ]


class BoardSnapshot(Collector):
    def __init__(self, row: Any) -> None:
        self.row = row

    def collect(self) -> Iterable[GaugeMetricFamily]:
        return board_families(self.row)


def exposition(row: Any) -> bytes:
    """The text format: this process's metrics, then the board's."""
    board = CollectorRegistry(auto_describe=False)
    board.register(BoardSnapshot(row))
    return generate_latest(REGISTRY) + generate_latest(board)
