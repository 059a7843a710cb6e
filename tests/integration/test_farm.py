"""The whole farm: a real server, real worker processes, real ffmpeg and the real model,
on speech synthesized from a known text."""

from __future__ import annotations

import signal
import time

import jiwer
import pytest
from faster_whisper import BatchedInferencePipeline, WhisperModel

from tests.farm import WorkerProcess, submit, wait_for, wait_until_finished
from tests.speech import PARAGRAPHS, decode, normalise_text
from worker.engines import resolve_model

LEASE = 4.0
ORDER = tuple(range(len(PARAGRAPHS))) * 3
GAP = 1.0  # seconds of silence between paragraphs
REFERENCE = normalise_text(" ".join(PARAGRAPHS[i] for i in ORDER))


@pytest.fixture(scope="module")
def speech(media):
    """About three and a half minutes, every paragraph three times: the default chunk
    length cuts it into several chunks, so stitching is exercised."""
    return media.paragraphs(ORDER, gap_seconds=GAP)


@pytest.fixture(scope="module")
def farm(make_server):
    server = make_server(lease_seconds=LEASE, retry_base_seconds=0.5)
    keys = {role: server.create_key(role) for role in ("submit", "worker")}
    workers = [
        WorkerProcess(
            server, keys["worker"], f"w{i}", ("--threads", "1", "--batch-size", "4")
        ).start()
        for i in range(3)
    ]
    yield server, keys, workers
    for w in workers:
        w.stop()


@pytest.fixture(scope="module")
def run_direct():
    """A file through faster-whisper's pipeline directly, as a user would without a farm:
    its defaults, and word timestamps for the onsets."""
    model = WhisperModel(resolve_model("tiny.en"), device="cpu", compute_type="int8", cpu_threads=2)
    pipeline = BatchedInferencePipeline(model)

    def transcribe(path):
        segments, _ = pipeline.transcribe(str(path), batch_size=8, word_timestamps=True)
        return list(segments)

    return transcribe


def transcribe(server, key, path, **options):
    with server.client(key) as client:
        response = submit(client, path.read_bytes(), path.name, **options)
        assert response.status_code == 201, response.text
        view = wait_until_finished(client, response.json()["id"])
        assert view["state"] == "succeeded", view
        transcript = client.get(f"/v1/transcriptions/{view['id']}/transcript").json()
    return view, transcript


def word_error_rate(text: str) -> float:
    return jiwer.wer(REFERENCE, normalise_text(text))


def paragraph_onsets(media) -> list[tuple[float, str]]:
    """Where each paragraph of the `speech` file starts, and its first word."""
    onsets, at = [], 0.0
    for index in ORDER:
        onsets.append((at, normalise_text(PARAGRAPHS[index]).split()[0]))
        at += len(decode(media.speech(PARAGRAPHS[index]))) / 16000 + GAP
    return onsets


def onset_times(words, onsets, word_text) -> list[float | None]:
    """The start of each paragraph's first word as recognised, or None if missed."""
    found = []
    for at, first in onsets:
        near = [w for w in words if word_text(w) == first and abs(start_of(w) - at) < 1.5]
        found.append(start_of(near[0]) if near else None)
    return found


def start_of(word) -> float:
    return word["start"] if isinstance(word, dict) else word.start


@pytest.mark.parametrize("fmt", ["wav", "mp3", "m4a", "opus", "mp4"])
def test_farm_matches_direct_faster_whisper(farm, media, speech, run_direct, fmt):
    server, keys, _ = farm
    path = media.convert(speech, fmt)
    view, transcript = transcribe(server, keys["submit"], path, word_timestamps=True)
    assert view["progress"]["jobs_total"] >= 3  # it really was cut into chunks

    direct = run_direct(path)  # the same file: lossy formats change what the model hears
    direct_wer = word_error_rate(" ".join(s.text for s in direct))
    farm_wer = word_error_rate(transcript["text"])
    assert farm_wer <= direct_wer + 0.01, (farm_wer, direct_wer)

    starts = [s["start"] for s in transcript["segments"]]
    assert starts == sorted(starts)
    assert all(
        a["end"] <= b["start"]
        for a, b in zip(transcript["segments"], transcript["segments"][1:], strict=False)
    )
    assert abs(transcript["duration_seconds"] - len(decode(speech)) / 16000) < 0.05

    # Timeline: each paragraph's first word starts where the direct run puts it.
    onsets = paragraph_onsets(media)
    farm_words = [w for s in transcript["segments"] for w in s["words"]]
    direct_words = [w for s in direct for w in s.words]
    farm_at = onset_times(farm_words, onsets, lambda w: normalise_text(w["word"]))
    direct_at = onset_times(direct_words, onsets, lambda w: normalise_text(w.word))
    found = [
        (at, f, d) for (at, _), f, d in zip(onsets, farm_at, direct_at, strict=True) if f and d
    ]
    assert len(found) >= len(onsets) * 2 // 3, (farm_at, direct_at)
    # Whisper's own word times jitter; the farm may be at most 0.2 s further from the
    # true onset than the direct run is.
    for at, f, d in found:
        assert abs(f - at) <= abs(d - at) + 0.2, (at, f, d)


def test_transcription_starts_while_the_file_is_still_being_planned(farm, speech):
    """Streaming fan-out: chunks are queued as they settle, so idle workers start on
    the first ones while the chunk job is still reading the rest of the file."""
    server, keys, _ = farm
    view, transcript = transcribe(server, keys["submit"], speech, target_chunk_seconds=20)
    jobs = server.sql(
        "SELECT kind, leased_at, finished_at FROM jobs WHERE transcription_id = $1", view["id"]
    )
    [planned_at] = [job["finished_at"] for job in jobs if job["kind"] == "chunk"]
    started = sorted(job["leased_at"] for job in jobs if job["kind"] == "transcribe")
    assert len(started) >= 6 and started[0] < planned_at, (started, planned_at)
    assert word_error_rate(transcript["text"]) < 0.15


def test_a_worker_killed_mid_job_loses_nothing(farm, media, speech):
    server, keys, workers = farm
    path = media.convert(speech, "flac")
    _, clean = transcribe(server, keys["submit"], path)
    server.sql("DELETE FROM chunk_cache")  # or the second run would not run the model

    with server.client(keys["submit"]) as client:
        tid = submit(client, path.read_bytes(), path.name).json()["id"]
        victim_row = wait_for(
            lambda: server.sql(
                "SELECT w.name FROM jobs j JOIN workers w ON w.id = j.worker_id "
                "WHERE j.transcription_id = $1 AND j.kind = 'transcribe' AND j.state = 'leased'",
                tid,
            ),
            120,
            "a transcribe job to be leased",
            every=0.05,
        )
        victim = next(w for w in workers if w.name == victim_row[0]["name"])
        victim.signal(signal.SIGKILL)
        view = wait_until_finished(client, tid)
        faulty = client.get(f"/v1/transcriptions/{tid}/transcript").json()
    assert view["state"] == "succeeded"
    retaken = server.sql(
        "SELECT count(*) AS n FROM jobs WHERE transcription_id = $1 AND attempts > 1", tid
    )
    assert retaken[0]["n"] >= 1  # the victim's jobs were taken over after its lease expired
    assert faulty["text"] == clean["text"]
    assert [s["start"] for s in faulty["segments"]] == [s["start"] for s in clean["segments"]]
    workers[workers.index(victim)] = WorkerProcess(
        server, keys["worker"], victim.name + "-again", victim.options
    ).start()


def test_sigterm_finishes_or_releases_and_exits_zero(make_server, media, speech):
    server = make_server(lease_seconds=LEASE)
    keys = {role: server.create_key(role) for role in ("submit", "worker")}
    leaver = WorkerProcess(server, keys["worker"], "leaver", ("--threads", "1")).start()
    path = media.convert(speech, "wav")
    with server.client(keys["submit"]) as client:
        tid = submit(client, path.read_bytes(), path.name).json()["id"]
        wait_for(
            lambda: server.sql(
                "SELECT 1 FROM jobs j JOIN workers w ON w.id = j.worker_id "
                "WHERE w.name = 'leaver' AND j.state = 'leased'"
            ),
            120,
            "the leaving worker to hold a job",
            every=0.05,
        )
        leaver.signal(signal.SIGTERM)
        assert leaver.wait(60) == 0
        assert not server.sql(
            "SELECT 1 FROM jobs j JOIN workers w ON w.id = j.worker_id "
            "WHERE w.name = 'leaver' AND j.state = 'leased'"
        )
        successor = WorkerProcess(server, keys["worker"], "successor").start()
        assert wait_until_finished(client, tid)["state"] == "succeeded"
        successor.stop()
    assert "stopping" in leaver.log


BAD_INPUTS = {
    "png.mp3": "png",
    "empty.wav": "empty",
    "truncated.m4a": "truncated",
    "notes.txt": "text",
    "silent-video.mp4": "video",
}


def bad_file(media, speech, kind: str) -> bytes:
    if kind == "png":
        return b"\x89PNG\r\n\x1a\n" + b"\0" * 2000
    if kind == "empty":
        return b"RIFF"  # a header and nothing else
    if kind == "truncated":  # an MP4 keeps its index at the end: without it, nothing plays
        data = media.convert(speech, "m4a").read_bytes()
        return data[: len(data) // 2]
    if kind == "text":
        return b"these are meeting notes, not audio\n" * 50
    return media.video_without_audio().read_bytes()


def test_bad_media_fails_with_a_reason_and_the_board_stays_healthy(farm, media, speech):
    server, keys, _ = farm
    good = media.paragraphs((0,))
    with server.client(keys["submit"]) as client:
        bad_ids = {
            name: submit(client, bad_file(media, speech, kind), name).json()["id"]
            for name, kind in BAD_INPUTS.items()
        }
        good_id = submit(client, good.read_bytes(), "good.wav").json()["id"]
        started = time.monotonic()
        for name, tid in bad_ids.items():
            view = wait_until_finished(client, tid, timeout=120)
            assert view["state"] == "failed", (name, view)
            assert view["error"], name
            attempts = server.sql("SELECT attempts FROM jobs WHERE transcription_id = $1", tid)
            assert attempts == [{"attempts": 1}], (name, "permanent errors are not retried")
        assert time.monotonic() - started < 60
        assert wait_until_finished(client, good_id)["state"] == "succeeded"
        reasons = {
            name: client.get(f"/v1/transcriptions/{tid}").json()["error"]
            for name, tid in bad_ids.items()
        }
    assert "no audio" in reasons["silent-video.mp4"].lower(), reasons


def test_a_resubmitted_file_reuses_cached_chunks_without_running_the_model(farm, media):
    server, keys, _ = farm
    path = media.paragraphs((1, 2), gap_seconds=GAP)
    first_view, first = transcribe(server, keys["submit"], path, target_chunk_seconds=10)
    busy = server.sql("SELECT sum(busy_seconds) AS s, sum(jobs_done) AS n FROM workers")[0]
    second_view, second = transcribe(server, keys["submit"], path, target_chunk_seconds=10)

    results = server.sql(
        "SELECT result FROM jobs WHERE transcription_id = $1 AND kind = 'transcribe'",
        second_view["id"],
    )
    assert len(results) == second_view["progress"]["jobs_total"] >= 2
    assert all(r["result"]["cached"] and r["result"]["processing_seconds"] == 0 for r in results)
    # No worker spent model time on it.
    assert server.sql("SELECT sum(busy_seconds) AS s, sum(jobs_done) AS n FROM workers")[0] == busy
    assert second["segments"] == first["segments"]


def test_exit_when_idle_and_max_jobs_end_the_worker_with_status_zero(make_server, media):
    server = make_server()
    keys = {role: server.create_key(role) for role in ("submit", "worker")}
    idle = WorkerProcess(server, keys["worker"], "idle", ("--exit-when-idle", "2")).start()
    assert idle.wait(60) == 0
    assert "idle for 2 s: exiting" in idle.log

    path = media.paragraphs((0,))
    with server.client(keys["submit"]) as client:
        tid = submit(client, path.read_bytes(), path.name).json()["id"]
        once = WorkerProcess(server, keys["worker"], "once", ("--max-jobs", "1")).start()
        assert once.wait(120) == 0
        # A short file is one job: its chunk job planned it and transcribed its one chunk.
        assert client.get(f"/v1/transcriptions/{tid}").json()["state"] == "succeeded"
    assert "stopped after 1 job(s)" in once.log
    rows = server.sql("SELECT kind, worker_id, attempts FROM jobs WHERE transcription_id = $1", tid)
    assert sorted(r["kind"] for r in rows) == ["chunk", "transcribe"]
    assert len({r["worker_id"] for r in rows}) == 1 and {r["attempts"] for r in rows} == {1}
