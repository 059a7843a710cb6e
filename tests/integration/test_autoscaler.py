"""The autoscaler's local provider, for real: a server with SCRIBEFARM_AUTOSCALER=local
starts real `scribefarm worker` processes (ffmpeg, tiny.en) as a queue arrives, and the
pool returns to zero once it is done."""

from __future__ import annotations

import itertools

import psutil
import pytest

from tests.farm import Server, create_database, submit, wait_for
from tests.speech import PARAGRAPHS, decode

TWENTY_MINUTES = 1200.0
VOICES = ("en-us", "en-gb", "en-gb-scotland", "en-gb-x-rp", "en-029")
SPEEDS = (140, 155, 170, 185)
FINISHED = ("succeeded", "failed", "canceled")


@pytest.fixture(scope="module")
def twenty_minutes(media):
    """20 minutes of speech, none of it repeated (a repeat would be a chunk-cache hit, not
    work): every paragraph in several voices and speeds."""
    parts, seconds = [], 0.0
    for voice, speed, text in itertools.product(VOICES, SPEEDS, PARAGRAPHS):
        path = media.speech(text, voice=voice, words_per_minute=speed)
        parts.append(path)
        seconds += len(decode(path)) / 16000 + 1.0
        if seconds >= TWENTY_MINUTES:
            return media.concat(parts, gap_seconds=1.0)
    raise AssertionError(f"only {seconds:.0f} s of distinct speech")


def autoscaled_workers(server: Server) -> dict[int, str]:
    """The server's live worker processes: pid -> command line."""
    workers = {}
    for child in psutil.Process(server.process.pid).children():
        try:
            if child.status() != psutil.STATUS_ZOMBIE and "worker" in child.cmdline():
                workers[child.pid] = " ".join(child.cmdline())
        except psutil.NoSuchProcess:
            pass
    return workers


def running_gauge(server: Server) -> float:
    with server.client(None) as anonymous:
        text = anonymous.get("/metrics").text
    [line] = [x for x in text.splitlines() if x.startswith("scribefarm_autoscaler_running")]
    return float(line.split()[-1])


def test_local_provider_scales_to_three_drains_the_queue_and_returns_to_zero(
    postgres_url, tmp_path, twenty_minutes
):
    """20 minutes of audio, max_workers=3. Before any worker has been measured the
    policy assumes 10x realtime per worker; a target of 10 s then asks for
    ceil(1200 / (10 * 10)) = 12 workers, capped at 3 (and still 3 at a measured 40x on a
    faster machine). Workers exit after 5 idle seconds."""
    server = Server(
        create_database(postgres_url),
        tmp_path / "board",
        {
            "autoscaler": "local",
            "max_workers": 3,
            "autoscaler_target_seconds": 10,
            "autoscaler_assumed_speed": 10,
            "autoscaler_interval_seconds": 1,
            "autoscaler_idle_seconds": 5,
            "dedup": False,
        },
    )
    server.settings["autoscaler_worker_key"] = server.create_key("worker")
    server.settings["public_url"] = server.url
    submit_key = server.create_key("submit")
    server.start()
    try:
        assert autoscaled_workers(server) == {}
        with server.client(submit_key) as client:
            tid = submit(client, twenty_minutes.read_bytes(), "twenty-minutes.wav").json()["id"]
            peak, seen = watch_workers(server, client, tid)
            view = client.get(f"/v1/transcriptions/{tid}").json()
        assert view["state"] == "succeeded", view
        assert view["progress"]["audio_seconds_total"] >= TWENTY_MINUTES
        assert peak == 3
        assert len(seen) >= 3
        assert all("--exit-when-idle 5" in cmdline for cmdline in seen.values())
        # Nobody stops them: each exits by itself once idle, and the count returns to 0.
        wait_for(lambda: not autoscaled_workers(server), 60, "the workers to exit when idle")
        wait_for(lambda: running_gauge(server) == 0, 10, "the autoscaler to count 0")
        assert "did not exit" not in server.log_path.read_text()
        assert server.sql("SELECT count(*) AS n FROM jobs WHERE state <> 'succeeded'")[0]["n"] == 0
    finally:
        server.stop()


def watch_workers(server: Server, client, tid: str) -> tuple[int, dict[int, str]]:
    """Until the transcription finishes: the most worker processes at once, and each
    one's command line."""
    peak, seen = 0, {}

    def finished() -> bool:
        nonlocal peak
        workers = autoscaled_workers(server)
        peak = max(peak, len(workers))
        seen.update(workers)
        return client.get(f"/v1/transcriptions/{tid}").json()["state"] in FINISHED

    wait_for(finished, 300, f"transcription {tid} to finish")
    return peak, seen
