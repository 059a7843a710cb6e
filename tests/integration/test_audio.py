"""Media access through the real ffmpeg: exact ranges in every format, bounded memory,
readable errors for bad input, and URLs."""

from __future__ import annotations

import shutil
import socket
import struct
import subprocess
import sys
import time
from pathlib import Path

import numpy as np
import pytest

from tests.speech import (
    FORMATS,
    MediaFactory,
    decode,
    serve_directory,
)
from worker.audio import MediaError, ffmpeg_binary, read_range, stream_audio
from worker.chunking import plan_source

SR = 16_000
# AAC's perceptual noise substitution makes its decoder output depend on where
# decoding started; the timeline is still exact ("m4a-nopns" proves it).
NOISY_AFTER_SEEK = {"m4a", "mp4"}
RANGES = [(0.0, 7.5), (0.7, 5.0), (2.5, 10.0), (17.3371, 24.9), (41.0, 48.5), (60.02, 99.0)]


@pytest.fixture(scope="module")
def speech_wav(media: MediaFactory) -> Path:
    return media.paragraphs()


def best_lag(got: np.ndarray, ref: np.ndarray, span: int = 4) -> int:
    """The shift (in samples) at which ``got`` matches ``ref`` best."""
    n = min(got.size, ref.size) - 2 * span
    scores = {
        lag: float(np.dot(got[span : span + n], ref[span + lag : span + lag + n]))
        for lag in range(-span, span + 1)
    }
    return max(scores, key=scores.__getitem__)


@pytest.mark.parametrize("fmt", sorted(FORMATS))
def test_read_range_equals_slicing_the_full_decode(media, speech_wav, fmt):
    source = str(media.convert(speech_wav, fmt))
    full = decode(source)
    assert abs(full.size - decode(speech_wav).size) < 0.1 * SR  # same audio, any format
    for start, end in RANGES:
        got = read_range(source, start, end)
        ref = full[round(start * SR) : round(end * SR)]
        assert got.size == ref.size, (start, end)
        assert best_lag(got, ref) == 0, (start, end)
        error = got - ref
        if fmt in NOISY_AFTER_SEEK:
            snr = 10 * np.log10(np.sum(ref**2) / max(np.sum(error**2), 1e-20))
            assert snr > 25, (start, end, snr)
        else:
            assert np.max(np.abs(error)) <= 1e-6, (start, end)


def test_read_range_edge_cases(media, speech_wav):
    source = str(media.convert(speech_wav, "mp3"))
    full = decode(source)
    assert read_range(source, 3.0, 3.0).size == 0
    beyond = read_range(source, full.size / SR + 5, full.size / SR + 10)
    assert beyond.size == 0
    one = read_range(source, 10.0, 10.0 + 1 / SR)
    assert one.size == 1 and one[0] == full[10 * SR]
    with pytest.raises(ValueError):
        read_range(source, 5.0, 4.0)


def test_streamed_blocks_are_bounded_and_complete(speech_wav):
    blocks = list(stream_audio(str(speech_wav), block_seconds=2.0))
    assert all(b.size == 2 * SR for b in blocks[:-1])
    assert 0 < blocks[-1].size <= 2 * SR
    assert all(b.dtype == np.float32 for b in blocks)
    assert np.array_equal(np.concatenate(blocks), decode(speech_wav))


_PEAK_RSS = """
import resource, sys, time
from worker.chunking import plan_source
started = time.monotonic()
plan = plan_source(sys.argv[1], 30, 60)
print(plan.model_dump_json())
# VmHWM, not ru_maxrss: Linux carries the forking parent's peak over into ru_maxrss,
# so after pytest has loaded a model the child would seem to use as much.
print(next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM")) // 1024)
print(resource.getrusage(resource.RUSAGE_CHILDREN).ru_maxrss // 1024)
print(time.monotonic() - started)
"""


def test_an_hour_is_planned_in_bounded_memory(media):
    # 1 h of speech (the paragraphs over and over). Decoded at once it would take 230 MB
    # (3600 s x 16 kHz x 4 bytes) by itself; streamed, the process stays near its import
    # footprint (faster-whisper's modules and the VAD model: about 100 MB).
    hour = media.directory / "hour-of-speech.flac"
    if not hour.exists():
        loop = ["-stream_loop", "-1", "-i", str(media.paragraphs()), "-t", "3600"]
        subprocess.run(
            [ffmpeg_binary(), "-nostdin", "-loglevel", "error", "-y", *loop, str(hour)],
            check=True,
        )
    out = subprocess.run(
        [sys.executable, "-c", _PEAK_RSS, str(hour)],
        capture_output=True,
        text=True,
        check=True,
        cwd=Path(__file__).resolve().parents[2],
    ).stdout.splitlines()
    from shared.protocol import ChunkPlan

    plan = ChunkPlan.model_validate_json(out[0])
    python_mb, ffmpeg_mb, seconds = int(out[1]), int(out[2]), float(out[3])
    assert plan.duration_seconds == 3600.0
    assert python_mb < 200, f"planner peak RSS {python_mb} MB"
    assert ffmpeg_mb < 150, f"ffmpeg peak RSS {ffmpeg_mb} MB"
    assert len(plan.chunks) > 60
    for chunk in plan.chunks:
        assert chunk.end - chunk.start <= 60
        assert (
            chunk.speech and chunk.speech[0][0] == chunk.start and chunk.speech[-1][1] == chunk.end
        )
    print(f"planned 1 h in {seconds:.1f} s ({3600 / seconds:.0f}x realtime), peak {python_mb} MB")


def _png_named_mp3(media: MediaFactory, tmp: Path) -> Path:
    png = media.generated("png", "color=c=red:s=32x32", ".png", frames=1)
    return Path(shutil.copy(png, tmp / "song.mp3"))


def _zero_bytes(media: MediaFactory, tmp: Path) -> Path:
    path = tmp / "empty.mp3"
    path.write_bytes(b"")
    return path


def _truncated_m4a(media: MediaFactory, tmp: Path) -> Path:
    # ffmpeg writes the MP4 index at the end: a cut-off upload has none.
    whole = media.convert(media.paragraphs((0,)), "m4a").read_bytes()
    path = tmp / "cut.m4a"
    path.write_bytes(whole[: len(whole) // 2])
    return path


def _truncated_wav_header(media: MediaFactory, tmp: Path) -> Path:
    path = tmp / "cut.wav"
    path.write_bytes(media.paragraphs((0,)).read_bytes()[:30])
    return path


def _video_without_audio(media: MediaFactory, tmp: Path) -> Path:
    return media.video_without_audio()


def _text_file(media: MediaFactory, tmp: Path) -> Path:
    path = tmp / "notes.wav"
    path.write_text("These are meeting notes, not a recording.\n" * 50)
    return path


def _zero_length_audio(media: MediaFactory, tmp: Path) -> Path:
    return media.generated("nothing", "anullsrc=r=16000:cl=mono", ".wav", t=0)


BAD_INPUTS = {
    "png named .mp3": (_png_named_mp3, "no audio track"),
    "zero bytes": (_zero_bytes, "empty"),
    "truncated m4a": (_truncated_m4a, "incomplete"),
    "truncated wav header": (_truncated_wav_header, "not audio or video"),
    "video without audio": (_video_without_audio, "no audio track"),
    "text file": (_text_file, "not audio or video"),
    "zero-length audio": (_zero_length_audio, "zero length"),
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_input_is_a_permanent_error_with_a_readable_reason(media, tmp_path, case):
    make, words = BAD_INPUTS[case]
    source = str(make(media, tmp_path))
    for attempt in (
        lambda: plan_source(source, 30, 60),
        lambda: read_range(source, 5.0, 10.0),
    ):
        with pytest.raises(MediaError) as caught:
            attempt()
        assert caught.value.permanent is True
        assert words in caught.value.reason
        assert "Traceback" not in caught.value.reason


def test_url_ranges_and_plans_match_the_local_file(media, speech_wav):
    sources = [media.convert(speech_wav, fmt) for fmt in ("mp3", "m4a-nopns", "mkv")]
    with serve_directory(media.directory) as base:
        for path in sources:
            url = f"{base}/{path.name}"
            for start, end in [(0.0, 3.0), (41.0, 48.5)]:
                assert np.array_equal(
                    read_range(url, start, end), read_range(str(path), start, end)
                )
            assert plan_source(url, 20, 40) == plan_source(str(path), 20, 40)


def test_network_failure_is_not_permanent():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]  # closed again: nothing listens there
    started = time.monotonic()
    for attempt in (
        lambda: list(stream_audio(f"http://127.0.0.1:{port}/talk.mp3")),
        lambda: read_range(f"http://127.0.0.1:{port}/talk.mp3", 5.0, 10.0),
    ):
        with pytest.raises(MediaError) as caught:
            attempt()
        assert caught.value.permanent is False
        assert "network" in caught.value.reason
    assert time.monotonic() - started < 60


def test_missing_object_over_http_is_not_permanent(media):
    # A signed URL can expire or the object store can hiccup: worth a retry.
    with serve_directory(media.directory) as base, pytest.raises(MediaError) as caught:
        read_range(f"{base}/no-such-file.mp3", 0.0, 1.0)
    assert caught.value.permanent is False


def mkv_declaring(media: MediaFactory, tmp: Path, hours: float) -> Path:
    """A few seconds of speech in Matroska whose header declares ``hours`` of it."""
    out = tmp / f"declares-{hours:g}h.mkv"
    speech = media.speech("A short recording that claims to be very long.")
    cmd = [ffmpeg_binary(), "-nostdin", "-loglevel", "error", "-y", "-i", str(speech)]
    subprocess.run([*cmd, "-c:a", "libopus", str(out)], check=True)
    data = bytearray(out.read_bytes())
    at = data.find(b"\x44\x89\x88")  # the Segment's Duration: an 8-byte float, in ms
    data[at + 3 : at + 11] = struct.pack(">d", hours * 3600 * 1000)
    out.write_bytes(bytes(data))
    return out


def test_a_source_declaring_100000_hours_fails_at_once_naming_the_limit(media, tmp_path):
    source = mkv_declaring(media, tmp_path, 100_000)
    started = time.monotonic()
    with pytest.raises(MediaError) as refused:
        plan_source(str(source), 60, 120, max_audio_seconds=24 * 3600)
    assert time.monotonic() - started < 10
    assert refused.value.permanent
    assert "SCRIBEFARM_MAX_AUDIO_SECONDS" in refused.value.reason
    assert "declares 100000.00 h" in refused.value.reason


def test_decoding_stops_past_the_limit_and_at_the_deadline(media, tmp_path):
    # Declares a second, goes on for longer: the stream itself is measured.
    source = str(mkv_declaring(media, tmp_path, 1 / 3600))
    with pytest.raises(MediaError) as refused:
        plan_source(source, 60, 120, max_audio_seconds=1.5)
    assert "SCRIBEFARM_MAX_AUDIO_SECONDS" in refused.value.reason
    assert "goes on past it" in refused.value.reason
    with pytest.raises(MediaError) as late:
        plan_source(source, 60, 120, deadline=time.monotonic() - 1)  # a live stream's fate
    assert late.value.permanent and "SCRIBEFARM_MAX_JOB_SECONDS" in late.value.reason
    assert plan_source(source, 60, 120, max_audio_seconds=60).chunks  # within both: planned
