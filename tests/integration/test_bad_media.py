"""The bad media corpus, end to end: files a real user uploads by mistake (or on purpose)
go through a real server to real worker processes (real ffmpeg, the real tiny.en model).

Every file is made here (MediaFactory, ffmpeg, numpy, plain bytes): nothing is committed.
Each must end in a clear state: ``succeeded`` with the words that are really there, or
``failed`` with a reason a person can act on. Meanwhile the board stays healthy: a good
file submitted alongside succeeds, no job is left behind, and a permanent error is never
retried.
"""

from __future__ import annotations

import struct
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from tests.farm import Server, submit, two_workers
from tests.speech import PARAGRAPHS, MediaFactory, decode, normalise_text, word_error_rate
from worker.audio import ffmpeg_binary

SR = 16_000
TEN_HOURS = 36_000.0
# Ten hours of silence are recognised as nothing to transcribe while being planned (a
# few seconds of decoding), not cut into 600 chunks that each go through the engine.
SILENCE_BUDGET_SECONDS = 60.0
# The loudest 20 ms of the "too quiet" recording: far under normal speech (-20 dBFS),
# yet Whisper hears it, so the planner's silence shortcut must not swallow it.
QUIET_DBFS = -60.0


def ffmpeg(*args: str) -> None:
    cmd = [ffmpeg_binary(), "-nostdin", "-hide_banner", "-loglevel", "error", "-y", *args]
    subprocess.run(cmd, check=True, capture_output=True)


def wav_bytes(samples: np.ndarray, rate: int = SR) -> bytes:
    """A 16-bit mono PCM WAV written byte by byte (any rate the header can hold)."""
    data = (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
    fmt = struct.pack("<HHIIHH", 1, 1, rate, (rate * 2) % 2**32, 2, 16)
    riff = b"WAVE" + b"fmt " + struct.pack("<I", len(fmt)) + fmt
    riff += b"data" + struct.pack("<I", len(data)) + data
    return b"RIFF" + struct.pack("<I", len(riff)) + riff


# --- the corpus --------------------------------------------------------------------


def truncated_mp3(media: MediaFactory, tmp: Path) -> bytes:
    # MP3 is a stream of self-contained frames: a cut-off upload still plays up to the cut.
    data = media.convert(media.speech(PARAGRAPHS[0]), "mp3").read_bytes()
    return data[: len(data) // 2 + 7]  # and the cut lands inside a frame


def truncated_m4a(media: MediaFactory, tmp: Path) -> bytes:
    # ffmpeg writes the MP4 index (moov) at the end: a cut-off upload has none.
    data = media.convert(media.speech(PARAGRAPHS[0]), "m4a").read_bytes()
    return data[: len(data) // 2]


def wav_named_mp3(media: MediaFactory, tmp: Path) -> bytes:
    return media.speech(PARAGRAPHS[2]).read_bytes()


def png_named_mp3(media: MediaFactory, tmp: Path) -> bytes:
    return media.generated("png", "color=c=red:s=32x32", ".png", frames=1).read_bytes()


def too_quiet(media: MediaFactory, tmp: Path) -> bytes:
    # A recording made with the input gain all the way down.
    speech = decode(media.speech(PARAGRAPHS[2]))
    frames = speech[: speech.size // 320 * 320].reshape(-1, 320)
    loudest = 10 * np.log10(np.max(np.mean(np.square(frames), axis=1)))
    quiet = speech * 10 ** ((QUIET_DBFS - loudest) / 20)
    return media.write_wav(quiet, tmp / "quiet.wav").read_bytes()


def one_sample(media: MediaFactory, tmp: Path) -> bytes:
    return wav_bytes(np.array([0.3], dtype=np.float32))


def ten_hours_of_silence(media: MediaFactory, tmp: Path) -> bytes:
    # FLAC codes digital silence as constant subframes: 10 h are 72 kB, made in 2 s.
    # (Opus at 6 kb/s would be 13 MB and take minutes to encode; MP3's smallest frames
    # still make 36 MB.)
    return media.generated(
        "ten-hours-silence",
        "anullsrc=r=8000:cl=mono:n=65535",
        ".flac",
        t=TEN_HOURS,
        acodec="flac",
        frame_size=65535,
    ).read_bytes()


def speech_in_right_channel(media: MediaFactory, tmp: Path) -> bytes:
    # The second channel, so that keeping only the first would lose it.
    out = tmp / "right-only.wav"
    speech = media.speech(PARAGRAPHS[3])
    ffmpeg("-i", str(speech), "-af", "pan=stereo|c0=0*c0|c1=c0", "-c:a", "pcm_s16le", str(out))
    return out.read_bytes()


def sample_rate_384k(media: MediaFactory, tmp: Path) -> bytes:
    out = tmp / "hires.wav"
    speech = media.speech(PARAGRAPHS[0])
    ffmpeg("-i", str(speech), "-af", "aresample=384000", "-c:a", "pcm_s16le", str(out))
    return out.read_bytes()


def absurd_sample_rate(media: MediaFactory, tmp: Path) -> bytes:
    # A broken header: a second of noise that claims 2^31 - 1 samples a second.
    noise = np.random.default_rng(5).normal(0, 0.1, SR).astype(np.float32)
    return wav_bytes(noise, rate=2**31 - 1)


def video_without_audio(media: MediaFactory, tmp: Path) -> bytes:
    return media.video_without_audio().read_bytes()


@dataclass(frozen=True)
class Case:
    filename: str
    make: Callable[[MediaFactory, Path], bytes]
    state: str
    # failed: words the reason must contain; succeeded: words the transcript must contain.
    words: tuple[str, ...] = ()
    # succeeded: the paragraph the transcript must match (word error rate), if any.
    paragraph: int | None = None


CASES: dict[str, Case] = {
    "truncated mp3": Case(
        "interview.mp3", truncated_mp3, "succeeded", ("road", "evening", "keeper", "stairs")
    ),
    "truncated m4a": Case("interview.m4a", truncated_m4a, "failed", ("incomplete", "upload")),
    "wav named .mp3": Case("really-a-wav.mp3", wav_named_mp3, "succeeded", paragraph=2),
    "png named .mp3": Case("cover.mp3", png_named_mp3, "failed", ("no audio track",)),
    "too quiet": Case("gain-down.wav", too_quiet, "succeeded", paragraph=2),
    "one sample": Case("click.wav", one_sample, "succeeded"),
    "ten hours of silence": Case("night.flac", ten_hours_of_silence, "succeeded"),
    "speech in the right channel only": Case(
        "right-only.wav", speech_in_right_channel, "succeeded", paragraph=3
    ),
    "384 kHz": Case("hires.wav", sample_rate_384k, "succeeded", paragraph=0),
    "absurd sample rate": Case(
        "broken-header.wav", absurd_sample_rate, "failed", ("sample rate", "convert")
    ),
    "video without audio": Case("screen.mp4", video_without_audio, "failed", ("no audio track",)),
}
GOOD = PARAGRAPHS[1]


@dataclass
class Outcome:
    view: dict[str, Any]
    transcript: dict[str, Any] | None
    seconds: float  # from submission to its final state
    upload: bytes


# --- the farm, shared by the module ----------------------------------------------


@pytest.fixture(scope="module")
def farm(make_server: Callable[..., Server]):
    # A quick retry: were anything retried, the test would see it soon (attempts > 1).
    server = make_server(retry_base_seconds=0.5)
    keys = {role: server.create_key(role) for role in ("submit", "worker")}
    with two_workers(server, keys["worker"], "bad-media") as workers:
        yield server, keys, workers


@pytest.fixture(scope="module")
def outcomes(farm, media: MediaFactory, tmp_path_factory: pytest.TempPathFactory):
    """Every case submitted at once, then a good file after them; all followed to the end."""
    server, keys, _ = farm
    tmp = tmp_path_factory.mktemp("bad-media")
    uploads = {name: case.make(media, tmp) for name, case in CASES.items()}
    good = media.speech(GOOD)
    results: dict[str, Outcome] = {}
    with server.client(keys["submit"]) as client:
        submitted: dict[str, tuple[str, float]] = {}
        for name, case in CASES.items():
            response = submit(client, uploads[name], case.filename)
            assert response.status_code == 201, (name, response.text)
            submitted[name] = response.json()["id"], time.monotonic()
        response = submit(client, good.read_bytes(), "good.wav")
        assert response.status_code == 201, response.text
        submitted["good"] = response.json()["id"], time.monotonic()
        pending = dict(submitted)
        deadline = time.monotonic() + 300
        while pending and time.monotonic() < deadline:
            for name, (tid, at) in list(pending.items()):
                view = client.get(f"/v1/transcriptions/{tid}").json()
                if view["state"] in ("succeeded", "failed", "canceled"):
                    seconds = time.monotonic() - at
                    transcript = None
                    if view["state"] == "succeeded":
                        url = f"/v1/transcriptions/{tid}/transcript"
                        transcript = client.get(url).json()
                    upload = uploads.get(name, b"")
                    results[name] = Outcome(view, transcript, seconds, upload)
                    del pending[name]
            time.sleep(0.3)
    assert not pending, f"never finished: {sorted(pending)}"
    for name, outcome in results.items():
        chunk_job = server.sql(
            "SELECT extract(epoch FROM finished_at - leased_at) AS s FROM jobs "
            "WHERE transcription_id = $1 AND kind = 'chunk'",
            outcome.view["id"],
        )
        print(
            f"{name}: {outcome.view['state']} {outcome.seconds:.1f} s after submission "
            f"(planned in {chunk_job[0]['s']:.1f} s), "
            f"{outcome.view['progress']['jobs_total']} chunk(s), "
            f"duration {outcome.view['duration_seconds']}, error={outcome.view['error']!r}"
            + (f", text={outcome.transcript['text'][:60]!r}" if outcome.transcript else "")
        )
    return results


# --- the cases ----------------------------------------------------------------------


@pytest.mark.parametrize("name", list(CASES))
def test_each_file_ends_in_a_clear_state(outcomes, name):
    case, outcome = CASES[name], outcomes[name]
    view = outcome.view
    assert view["state"] == case.state, view
    if case.state == "failed":
        reason = view["error"]
        assert reason, view
        for word in case.words:
            assert word in reason, (word, reason)
        assert "Traceback" not in reason and len(reason) < 400, reason
        return
    assert view["error"] is None
    text = normalise_text(outcome.transcript["text"])
    for word in case.words:
        assert word in text.split(), (word, text)
    if case.paragraph is not None:
        assert word_error_rate(PARAGRAPHS[case.paragraph], text) < 0.2, text


def test_a_truncated_mp3_gives_what_is_there(outcomes, media):
    """The first half is transcribed (and timed as the first half); the rest is not made up."""
    outcome = outcomes["truncated mp3"]
    whole = len(decode(media.convert(media.speech(PARAGRAPHS[0]), "mp3"))) / SR
    assert 0.3 * whole < outcome.transcript["duration_seconds"] < 0.7 * whole
    text = normalise_text(outcome.transcript["text"]).split()
    assert "village" not in text and "news" not in text  # the lost last sentence


def test_one_sample_is_an_empty_transcript_of_one_sample(outcomes):
    transcript = outcomes["one sample"].transcript
    assert transcript["segments"] == [] and transcript["text"] == ""
    assert transcript["duration_seconds"] == pytest.approx(1 / SR)


def test_ten_hours_of_silence_finish_quickly_with_nothing_in_them(outcomes):
    outcome = outcomes["ten hours of silence"]
    assert len(outcome.upload) < 200_000  # the test really is cheap to make
    assert outcome.transcript["duration_seconds"] == pytest.approx(TEN_HOURS, abs=0.01)
    assert outcome.view["duration_seconds"] == pytest.approx(TEN_HOURS, abs=0.01)
    assert outcome.transcript["segments"] == [] and outcome.transcript["text"] == ""
    # Nothing audible, nothing to transcribe: no transcribe job at all.
    assert outcome.view["progress"]["jobs_total"] == 0
    assert outcome.seconds < SILENCE_BUDGET_SECONDS, outcome.seconds


# --- the board -----------------------------------------------------------------------


def test_zero_bytes_are_refused_at_upload(farm):
    server, keys, _ = farm
    with server.client(keys["submit"]) as client:
        response = submit(client, b"", "empty.mp3")
    assert response.status_code == 422, response.text
    body = response.json()
    assert body["code"] == "empty_file"
    assert "empty" in body["message"]
    assert not server.sql("SELECT 1 FROM transcriptions WHERE filename = 'empty.mp3'")


def test_a_good_file_alongside_succeeds(outcomes):
    outcome = outcomes["good"]
    assert outcome.view["state"] == "succeeded", outcome.view
    text = normalise_text(outcome.transcript["text"])
    assert word_error_rate(GOOD, text) < 0.2, text


def test_nothing_is_left_behind_or_retried(farm, outcomes):
    server, _, workers = farm
    # The module's own board: every job on it is one of these files'.
    jobs = server.sql(
        "SELECT t.filename, j.kind, j.seq, j.state, j.attempts, j.error FROM jobs j "
        "JOIN transcriptions t ON t.id = j.transcription_id"
    )
    assert {j["filename"] for j in jobs} == {o.view["filename"] for o in outcomes.values()}
    assert not [j for j in jobs if j["state"] in ("queued", "leased")]
    # Nothing failed for a reason another try could fix, so nothing ran twice.
    assert not [j for j in jobs if j["attempts"] != 1]
    failed = {o.view["filename"] for o in outcomes.values() if o.view["state"] == "failed"}
    dead = {j["filename"] for j in jobs if j["state"] == "dead"}
    assert dead == failed
    for worker in workers:
        assert worker.process.poll() is None, worker.log[-3000:]
        assert "Traceback" not in worker.log, worker.log[-3000:]
