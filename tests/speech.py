"""Test media made on the spot, offline: speech from known text, and every format.

Speech comes from ``espeak-ng`` (a system package, see ./dev); conversions go
through the same ffmpeg binary the worker uses. Files live in a session
temporary directory (never in the repository) and are made once per session.

In a test module::

    @pytest.fixture(scope="session")
    def media(tmp_path_factory):
        return shared_media(tmp_path_factory)

    def test_x(media):
        wav = media.paragraphs()           # all PARAGRAPHS, 1 s apart
        mp3 = media.convert(wav, "mp3")    # VBR MP3 of the same audio
"""

from __future__ import annotations

import contextlib
import hashlib
import http.server
import os
import re
import shutil
import subprocess
import threading
from collections.abc import Iterator
from pathlib import Path

import ffmpeg
import jiwer
import numpy as np
import pytest
from whisper_normalizer.english import EnglishTextNormalizer

from worker.audio import SAMPLE_RATE, ffmpeg_binary, stream_audio

# Known text for word-error-rate tests: plain words that read aloud unambiguously.
PARAGRAPHS: tuple[str, ...] = (
    "The old lighthouse stood at the end of a narrow road. Every evening the keeper "
    "climbed the stairs and lit the lamp. Ships far out at sea could see the light "
    "and knew that the rocks were near. In the morning he walked back down to the "
    "village to buy bread and read the news.",
    "Our team meets every Monday to plan the work for the week. We look at what was "
    "finished, what is late, and what needs help. Each person speaks for a few "
    "minutes. Then we write down the tasks and decide who will take each one before "
    "we go back to our desks.",
    "Rain fell on the city for three days without a break. The rivers rose, the "
    "streets turned into small streams, and many schools closed their doors. When "
    "the sun finally came out, children ran into the parks and people opened their "
    "windows to let in the fresh air.",
    "To bake simple bread you need flour, water, salt and yeast. Mix them in a large "
    "bowl and knead the dough until it feels smooth. Let it rest in a warm place for "
    "one hour. Shape the loaf, bake it in a hot oven, and wait until it cools before "
    "you cut the first slice.",
)

# name -> (file suffix, output options); "video" formats also get a picture track.
FORMATS: dict[str, tuple[str, dict[str, object]]] = {
    "wav": (".wav", {"acodec": "pcm_s16le"}),
    "flac": (".flac", {"acodec": "flac"}),
    "opus": (".opus", {"acodec": "libopus", "audio_bitrate": "32k"}),
    "m4a": (".m4a", {"acodec": "aac", "audio_bitrate": "96k"}),
    # AAC without perceptual noise substitution: its decoder output is then
    # deterministic after a seek too (PNS fills bands with random noise).
    "m4a-nopns": (".m4a", {"acodec": "aac", "audio_bitrate": "96k", "aac_pns": 0}),
    "mp3": (".mp3", {"acodec": "libmp3lame", "q:a": 4}),  # VBR
    "stereo44k": (".wav", {"acodec": "pcm_s16le", "ac": 2, "ar": 44100}),
    "stereo48k": (".flac", {"acodec": "flac", "ac": 2, "ar": 48000}),
    "mp4": (".mp4", {"acodec": "aac", "vcodec": "mpeg4", "shortest": None}),
    "mkv": (".mkv", {"acodec": "libopus", "vcodec": "mpeg4", "shortest": None}),
}
VIDEO_FORMATS = frozenset({"mp4", "mkv"})


class MediaFactory:
    """Makes (and remembers) test media in one directory."""

    def __init__(self, directory: Path) -> None:
        self.directory = directory
        directory.mkdir(parents=True, exist_ok=True)

    def _path(self, key: str, suffix: str) -> Path:
        digest = hashlib.sha256(key.encode()).hexdigest()[:16]
        return self.directory / f"{digest}{suffix}"

    def speech(self, text: str, *, voice: str = "en-us", words_per_minute: int = 160) -> Path:
        """WAV (22.05 kHz mono) of ``text`` read by espeak-ng."""
        out = self._path(f"speech|{voice}|{words_per_minute}|{text}", ".wav")
        if not out.exists():
            espeak = shutil.which("espeak-ng")
            if espeak is None:
                pytest.fail("espeak-ng is missing: install it (./dev installs it)")
            tmp = out.with_suffix(".tmp.wav")
            cmd = [espeak, "-v", voice, "-s", str(words_per_minute), "-w", str(tmp), text]
            subprocess.run(cmd, check=True, capture_output=True)
            tmp.replace(out)
        return out

    def paragraphs(self, indices: tuple[int, ...] | None = None, gap_seconds: float = 1.0) -> Path:
        """Several PARAGRAPHS read one after another with ``gap_seconds`` of silence between."""
        chosen = tuple(range(len(PARAGRAPHS))) if indices is None else indices
        parts = [self.speech(PARAGRAPHS[i]) for i in chosen]
        return self.concat(parts, gap_seconds=gap_seconds)

    def concat(self, parts: list[Path], *, gap_seconds: float = 0.0) -> Path:
        """One 16 kHz mono WAV of ``parts`` joined with silences."""
        key = f"concat|{gap_seconds}|" + "|".join(str(p) for p in parts)
        out = self._path(key, ".wav")
        if out.exists():
            return out
        gap = np.zeros(round(gap_seconds * SAMPLE_RATE), dtype=np.float32)
        pieces: list[np.ndarray] = []
        for i, part in enumerate(parts):
            if i:
                pieces.append(gap)
            pieces.append(decode(part))
        self.write_wav(np.concatenate(pieces), out)
        return out

    def write_wav(self, samples: np.ndarray, out: Path | None = None) -> Path:
        """16 kHz mono 16-bit WAV of float samples in [-1, 1]."""
        if out is None:
            out = self._path(f"samples|{hashlib.sha256(samples.tobytes()).hexdigest()}", ".wav")
        pcm = (np.clip(samples, -1, 1) * 32767).astype("<i2").tobytes()
        tmp = out.with_suffix(".tmp.wav")
        (
            ffmpeg.input("pipe:", format="s16le", ac=1, ar=SAMPLE_RATE)
            .output(str(tmp), acodec="pcm_s16le")
            .global_args("-nostdin", "-hide_banner", "-loglevel", "error", "-y")
            .run(cmd=ffmpeg_binary(), input=pcm, capture_stdout=True, capture_stderr=True)
        )
        tmp.replace(out)
        return out

    def convert(self, source: Path, fmt: str) -> Path:
        """The same audio in another format (see FORMATS)."""
        suffix, options = FORMATS[fmt]
        out = self._path(f"convert|{fmt}|{source}", suffix)
        if out.exists():
            return out
        audio = ffmpeg.input(str(source)).audio
        streams = [audio]
        if fmt in VIDEO_FORMATS:
            streams.insert(0, ffmpeg.input("color=c=steelblue:s=160x120:r=10", format="lavfi"))
        self._run(ffmpeg.output(*streams, str(out), **options), out)
        return out

    def generated(self, name: str, lavfi: str, suffix: str = ".wav", **options: object) -> Path:
        """A file from an ffmpeg lavfi source graph, e.g. hours of tone and silence."""
        out = self._path(f"lavfi|{name}|{lavfi}|{sorted(options.items())}", suffix)
        if not out.exists():
            self._run(ffmpeg.input(lavfi, format="lavfi").output(str(out), **options), out)
        return out

    def video_without_audio(self) -> Path:
        out = self._path("video-without-audio", ".mp4")
        if not out.exists():
            src = ffmpeg.input("color=c=red:s=160x120:r=10:d=2", format="lavfi")
            self._run(src.output(str(out), vcodec="mpeg4"), out)
        return out

    def _run(self, stream: ffmpeg.nodes.OutputStream, out: Path) -> None:
        tmp = out.with_name(f"tmp-{out.name}")
        # Rename the output inside the compiled command, keeping the format by suffix.
        args = stream.global_args("-nostdin", "-hide_banner", "-loglevel", "error", "-y")
        cmd = [str(tmp) if a == str(out) else a for a in args.compile(cmd=ffmpeg_binary())]
        subprocess.run(cmd, check=True, capture_output=True)
        tmp.replace(out)


def decode(path: Path | str) -> np.ndarray:
    """The whole source as the worker decodes it (16 kHz mono float32)."""
    return np.concatenate(list(stream_audio(str(path))))


_NORMALIZER = EnglishTextNormalizer()


def normalise_text(text: str) -> str:
    """Whisper's English normalizer, as the field scores transcripts: lower case, no
    punctuation, spellings and numbers made uniform ("two" and "2" are the same word)."""
    return " ".join(_NORMALIZER(text).split())


def word_error_rate(reference: str, hypothesis: str) -> float:
    """WER of a transcript against what was said, on normalised text. Tests bound it
    rather than look for single words: tiny.en hears "lighthouse" as "light has" on
    some runs."""
    reference, hypothesis = normalise_text(reference), normalise_text(hypothesis)
    if not reference:
        return 0.0 if not hypothesis else 1.0
    return jiwer.wer(reference, hypothesis)


def shared_media(tmp_path_factory: pytest.TempPathFactory) -> MediaFactory:
    """The session's MediaFactory: one directory under pytest's base temp, shared by
    every test module (files are named by content, so each is made once)."""
    return MediaFactory(tmp_path_factory.getbasetemp() / "media")


# --- serving files over HTTP, with Range requests (as object stores do) ----------


class _RangeHandler(http.server.SimpleHTTPRequestHandler):
    """Static files with single-range ``Range: bytes=a-b`` support, quietly."""

    def send_head(self):  # type: ignore[no-untyped-def]
        header = self.headers.get("Range")
        path = self.translate_path(self.path)
        match = re.fullmatch(r"bytes=(\d*)-(\d*)", header or "")
        if not match or not os.path.isfile(path):
            return super().send_head()
        size = os.path.getsize(path)
        first = int(match[1]) if match[1] else max(0, size - int(match[2] or 0))
        last = min(int(match[2]), size - 1) if match[1] and match[2] else size - 1
        if first >= size:
            self.send_error(416)
            return None
        handle = open(path, "rb")  # noqa: SIM115 - closed by copyfile's caller
        handle.seek(first)
        self.send_response(206)
        self.send_header("Content-Type", self.guess_type(path))
        self.send_header("Accept-Ranges", "bytes")
        self.send_header("Content-Range", f"bytes {first}-{last}/{size}")
        self.send_header("Content-Length", str(last - first + 1))
        self.end_headers()
        return _Limited(handle, last - first + 1)

    def end_headers(self) -> None:
        if not self.headers.get("Range"):
            self.send_header("Accept-Ranges", "bytes")
        super().end_headers()

    def log_message(self, format: str, *args: object) -> None:  # noqa: A002
        pass


class _Limited:
    """A file object that reads at most ``left`` bytes."""

    def __init__(self, handle, left: int) -> None:  # type: ignore[no-untyped-def]
        self.handle, self.left = handle, left

    def read(self, size: int = -1) -> bytes:
        size = self.left if size < 0 else min(size, self.left)
        data = self.handle.read(size)
        self.left -= len(data)
        return data

    def close(self) -> None:
        self.handle.close()


@contextlib.contextmanager
def serve_directory(directory: Path) -> Iterator[str]:
    """Serve ``directory`` on loopback; yields the base URL (no trailing slash)."""

    def handler(*args: object) -> _RangeHandler:
        return _RangeHandler(*args, directory=str(directory))  # type: ignore[arg-type]

    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)  # type: ignore[arg-type]
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()
