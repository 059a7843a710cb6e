"""`scribefarm submit FILE|URL [--wait] [--format F] [-o out]`, the real CLI against a
real server; the test plays the worker's part, so it knows the transcript."""

from __future__ import annotations

import subprocess

import pytest
import srt

from tests.farm import SCRIBEFARM, ProtocolWorker, chunk_plan, chunk_transcript, wait_for

pytestmark = pytest.mark.timeout(120)


def scribefarm(server, key: str, *args: str) -> subprocess.Popen:
    env = {**server.env, "SCRIBEFARM_SERVER": server.url, "SCRIBEFARM_KEY": key}
    return subprocess.Popen(
        [SCRIBEFARM, "submit", *args], env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE
    )


@pytest.fixture(scope="module")
def farm(make_server):
    server = make_server(url_allowlist="127.0.0.1")
    return server, {role: server.create_key(role) for role in ("submit", "worker")}


def test_submit_waits_with_progress_and_saves_the_transcript(farm, tmp_path):
    server, keys = farm
    audio = tmp_path / "talk.wav"
    audio.write_bytes(b"not really audio: the test is the worker")
    out = tmp_path / "talk.srt"
    cli = scribefarm(server, keys["submit"], str(audio), "--format", "srt", "-o", str(out))

    worker = ProtocolWorker(server, keys["worker"])
    jobs = wait_for(lambda: worker.claim(), 30, "the CLI's upload to queue its chunk job")
    assert worker.complete(jobs[0], chunk_plan(2)).status_code == 200
    for job in worker.claim(max_jobs=2):
        worker.complete(job, chunk_transcript(job, f"part {job['chunk']['index']}"))
    worker.close()

    stdout, stderr = cli.communicate(timeout=60)
    assert cli.returncode == 0, stderr.decode()
    subtitles = list(srt.parse(out.read_text()))
    # Each 9 s segment is two cues (at most 7 s each): split between its words.
    assert " ".join(s.content for s in subtitles) == "part 0 part 1"
    assert "chunks" in stderr.decode()  # the progress bar, on stderr
    assert stdout == b""


def test_submit_without_wait_prints_the_id(farm, tmp_path):
    server, keys = farm
    audio = tmp_path / "a.wav"
    audio.write_bytes(b"bytes")
    cli = scribefarm(server, keys["submit"], str(audio))
    stdout, _ = cli.communicate(timeout=60)
    tid = stdout.decode().strip()
    with server.client(keys["submit"]) as client:
        assert client.get(f"/v1/transcriptions/{tid}").json()["filename"] == "a.wav"


def test_submit_asks_for_speakers(farm, tmp_path):
    server, keys = farm
    audio = tmp_path / "talk.wav"
    audio.write_bytes(b"bytes")
    cli = scribefarm(server, keys["submit"], str(audio), "--speakers", "3")
    stdout, stderr = cli.communicate(timeout=60)
    assert cli.returncode == 0, stderr.decode()
    with server.client(keys["submit"]) as client:
        options = client.get(f"/v1/transcriptions/{stdout.decode().strip()}").json()["options"]
    assert (options["diarize"], options["num_speakers"]) == (True, 3)


def test_submit_a_url(farm):
    server, keys = farm
    cli = scribefarm(server, keys["submit"], f"{server.url}/healthz")
    stdout, stderr = cli.communicate(timeout=60)
    assert cli.returncode == 0, stderr.decode()
    with server.client(keys["submit"]) as client:
        view = client.get(f"/v1/transcriptions/{stdout.decode().strip()}").json()
    assert view["state"] == "queued" and view["filename"] == "healthz"


def test_submit_explains_what_went_wrong(farm, tmp_path):
    server, keys = farm
    cli = scribefarm(server, keys["submit"], str(tmp_path / "missing.wav"))
    _, stderr = cli.communicate(timeout=60)
    assert cli.returncode != 0 and "is not a file" in stderr.decode()

    cli = scribefarm(server, keys["submit"], "http://169.254.169.254/latest")
    _, stderr = cli.communicate(timeout=60)
    assert cli.returncode != 0 and "link-local" in stderr.decode()
