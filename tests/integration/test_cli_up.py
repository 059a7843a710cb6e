"""`scribefarm up`: the embedded board whose autoscaler (the local provider) starts
workers when something is submitted, and whose workers exit when idle."""

from __future__ import annotations

import os
import signal
import subprocess

import httpx
import psutil
import pytest

from tests.farm import SCRIBEFARM, free_port, wait_for
from tests.speech import PARAGRAPHS, word_error_rate

pytestmark = pytest.mark.timeout(180)
FINISHED = ("succeeded", "failed", "canceled")


def workers_of(up: subprocess.Popen) -> list[psutil.Process]:
    processes = []
    for process in psutil.Process(up.pid).children(recursive=True):
        try:
            if process.status() != psutil.STATUS_ZOMBIE and "worker" in process.cmdline():
                processes.append(process)
        except psutil.NoSuchProcess:
            pass
    return processes


def postgres_of(data_dir) -> list[psutil.Process]:
    """The embedded PostgreSQL serving `data_dir`, if it still runs."""
    found = []
    for process in psutil.process_iter(["name", "cmdline"]):
        if process.info["name"] == "postgres" and str(data_dir) in " ".join(
            process.info["cmdline"] or ()
        ):
            found.append(process)
    return found


def admin_key(log) -> str | None:
    lines = log.read_text().splitlines()
    return next((line for line in lines if line.startswith("sf_")), None)


def test_up_starts_workers_for_a_submission_and_they_exit_when_idle(tmp_path, media):
    port, log = free_port(), tmp_path / "up.log"
    env = {k: v for k, v in os.environ.items() if not k.startswith("SCRIBEFARM_")}
    env.update(SCRIBEFARM_DATA_DIR=str(tmp_path / "data"), SCRIBEFARM_AUTOSCALER_IDLE_SECONDS="3")
    with open(log, "wb") as out:
        up = subprocess.Popen(
            [SCRIBEFARM, "up", "--port", str(port), "--workers", "2"],
            env=env,
            stdout=out,
            stderr=subprocess.STDOUT,
        )
    try:
        key = wait_for(lambda: admin_key(log), 90, "`scribefarm up` to print its admin key")
        assert "up to 2 workers" in log.read_text()
        assert workers_of(up) == []  # nothing queued: no worker
        client = httpx.Client(
            base_url=f"http://127.0.0.1:{port}", headers={"Authorization": f"Bearer {key}"}
        )
        audio = media.paragraphs((0,)).read_bytes()
        tid = client.post("/v1/transcriptions", files={"file": ("a.wav", audio)}).json()["id"]
        wait_for(lambda: workers_of(up), 30, "a worker to start")

        def state() -> str | None:
            view = client.get(f"/v1/transcriptions/{tid}").json()
            return view["state"] if view["state"] in FINISHED else None

        assert wait_for(state, 90, "the transcription to finish") == "succeeded"
        text = client.get(f"/v1/transcriptions/{tid}/transcript").json()["text"]
        assert word_error_rate(PARAGRAPHS[0], text) < 0.2, text
        wait_for(lambda: not workers_of(up), 60, "the workers to exit when idle")
        assert up.poll() is None  # the board stays up
        # A service manager stops it with SIGTERM: as with Ctrl-C, nothing is left behind.
        up.send_signal(signal.SIGTERM)
        assert up.wait(60) == 0
        assert postgres_of(tmp_path / "data") == []
    finally:
        if up.poll() is None:
            up.send_signal(signal.SIGINT)
            up.wait(60)
