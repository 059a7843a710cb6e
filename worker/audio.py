"""Media access through ffmpeg: streamed decoding and sample-accurate ranges.

Everything is decoded to 16 kHz mono float32, the rate Whisper works at. The
*timeline* of a source is the sample count of that decoded stream: sample ``i``
is at ``i / 16000`` seconds, and the duration is ``samples / 16000``. Container
metadata (which is often rounded or wrong, e.g. for VBR MP3) is never used.

Why ``read_range`` works the way it does (measured with ffmpeg 9, see
tests/integration/test_audio.py): plain input-side ``-ss`` is *not* sample
accurate for several formats. For AAC in MP4/M4A it lands one priming frame
(1024 samples) off, for MP3 the encoder delay shifts it, and in Matroska block
timestamps only have millisecond precision. What is exact:

* For containers whose timestamps count samples exactly (WAV, FLAC, Ogg, MP3,
  MP4/M4A/MOV, ADTS AAC), read the first decoded frame's timestamp ``p0``
  (a probe), seek one second *before* an integer-second point ``s`` with
  ``-copyts -noaccurate_seek`` and cut at source pts ``p0 + s * rate`` with
  ``atrim``. The cut is on a whole second, so it lies on both the source's and
  the 16 kHz sample grids: the resampler then produces the very samples a full
  decode produces, after a second of warm-up that is thrown away.
* For everything else (Matroska/WebM, AVI, FLV, MPEG-TS, ...), decode from the
  start and cut with ``atrim`` after resampling: exact, at the cost of decoding
  the part before the range.

Decoders with random state (AAC's perceptual noise substitution) legitimately
produce slightly different noise after a seek; the timeline is still exact.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import threading
from collections import deque
from collections.abc import Iterator
from dataclasses import dataclass
from functools import lru_cache

import ffmpeg
import numpy as np

SAMPLE_RATE = 16_000
BYTES_PER_SAMPLE = 4  # float32

# ffmpeg demuxer names (from "Input #0, <names>, from") whose audio timestamps
# are exact sample counts, so the seek path above is exact for them.
SEEKABLE_FORMATS = frozenset({"wav", "w64", "flac", "ogg", "mp3", "mov", "mp4", "m4a", "aac"})
# The only demuxers ffmpeg may pick: audio and video containers that read one file and
# open nothing else. Not hls, dash, concat, image2, tee, sdp/rtsp, ... (they name URLs).
SAFE_DEMUXERS = (
    "wav,w64,flac,ogg,mp3,mov,aac,matroska,avi,flv,mpegts,asf,aiff,caf,amr,ac3,eac3,dts,"
    "wv,ape,tta,au,mpeg,mxf,rm,voc,truehd,mlp,loas,gsm,g722,dsf,mpc,mpc8,shorten,xwma"
)
# Seconds decoded before the cut point when seeking: decoder and resampler warm-up.
SEEK_PREROLL_SECONDS = 1
_NETWORK_TIMEOUT_US = 30_000_000


class MediaError(Exception):
    """A source could not be read; ``reason`` says why and what to do.

    ``permanent`` is True when retrying cannot help (not a media file, no audio,
    corrupt, zero length) and False for transient trouble such as network errors.
    """

    def __init__(self, reason: str, *, permanent: bool) -> None:
        super().__init__(reason)
        self.reason = reason
        self.permanent = permanent


@lru_cache(maxsize=1)
def ffmpeg_binary() -> str:
    """The system ffmpeg when on PATH, else the one shipped in the imageio-ffmpeg wheel."""
    found = shutil.which("ffmpeg")
    if found:
        return found
    import imageio_ffmpeg

    return imageio_ffmpeg.get_ffmpeg_exe()


def is_url(source: str) -> bool:
    return source.startswith(("http://", "https://"))


def seconds_to_samples(seconds: float) -> int:
    return round(seconds * SAMPLE_RATE)


def stream_audio(
    source: str, start: float = 0.0, end: float | None = None, *, block_seconds: float = 30.0
) -> Iterator[np.ndarray]:
    """Decode [start, end) seconds of the source (the whole of it by default) as
    consecutive 16 kHz mono float32 blocks, exactly as a full decode has them.

    Only one block is in memory at a time, so a 10-hour source costs no more
    than a short one. Raises MediaError (possibly after some blocks) when
    ffmpeg fails, and when a whole source has no audio samples at all.
    """
    block_bytes = max(1, round(block_seconds * SAMPLE_RATE)) * BYTES_PER_SAMPLE
    total = 0
    with _FfmpegPipe(source, _range(source, start, end)) as pipe:
        for block in pipe.blocks(block_bytes):
            total += block.size
            yield block
    if total == 0 and start == 0:
        raise _zero_length()


def read_range(source: str, start: float, end: float) -> np.ndarray:
    """The samples of [start, end) seconds of the source, exactly as a full decode has them.

    Returns fewer samples when the source ends before ``end``.
    """
    if seconds_to_samples(end) == seconds_to_samples(start) and 0 <= start <= end:
        return np.zeros(0, dtype=np.float32)
    with _FfmpegPipe(source, _range(source, start, end)) as pipe:
        blocks = list(pipe.blocks(1 << 22))
    return np.concatenate(blocks) if blocks else np.zeros(0, dtype=np.float32)


def _range(source: str, start: float, end: float | None) -> ffmpeg.nodes.FilterableStream:
    """The decode of [start, end) (``end`` None: to the end), resampled and cut exactly."""
    if start < 0 or (end is not None and end < start):
        raise ValueError(f"invalid range [{start}, {end})")
    _check_local_file(source)
    first = seconds_to_samples(start)
    seek = max(0, first // SAMPLE_RATE - SEEK_PREROLL_SECONDS)
    stream = None
    if seek > 0:
        probe = probe_source(source)
        if probe.container & SEEKABLE_FORMATS:
            stream = _seeking_input(source, probe, seek)
    if stream is None:
        seek = 0
        stream = _audio_input(source)
    stream = stream.filter("aresample", SAMPLE_RATE)
    skip = first - seek * SAMPLE_RATE
    if end is not None:
        return stream.filter(
            "atrim", start_sample=skip, end_sample=skip + seconds_to_samples(end) - first
        )
    return stream.filter("atrim", start_sample=skip) if skip else stream


@dataclass(frozen=True)
class Probe:
    """What the decode plan needs to know about a source, from one ffmpeg run."""

    container: frozenset[str]  # demuxer names, e.g. {"mov", "mp4", "m4a", ...}
    sample_rate: int  # of the first audio stream, as decoded
    first_pts: int  # pts of its first decoded frame, in 1/sample_rate units
    declared_seconds: float | None = None  # the container's own Duration, if it has one


_INPUT_RE = re.compile(r"Input #0, ([^ ]+), from")
_DURATION_RE = re.compile(r"Duration: (\d+):(\d\d):(\d\d(?:\.\d+)?)")
_FRAME_RE = re.compile(r"n:0 pts:(-?\d+) .*? rate:(\d+)")


def probe_source(source: str) -> Probe:
    """Decode only the first audio frame, with ``-copyts``, to learn the timestamp origin."""
    _check_local_file(source)
    stream = ffmpeg.input(source, copyts=None, **_input_options(source))["a:0"]
    cmd = ffmpeg.output(stream.filter("ashowinfo"), "-", format="null", **{"frames:a": 1})
    cmd = cmd.global_args("-nostdin", "-hide_banner", "-loglevel", "info")
    proc = subprocess.run(
        cmd.compile(cmd=ffmpeg_binary()), capture_output=True, text=True, errors="replace"
    )
    if proc.returncode != 0:
        raise _classify(source, proc.stderr)
    names, frame = _INPUT_RE.search(proc.stderr), _FRAME_RE.search(proc.stderr)
    if not names:
        raise _classify(source, proc.stderr)
    if not frame:
        raise _cut_short(source, proc.stderr) or _zero_length()
    duration = _DURATION_RE.search(proc.stderr)
    declared = None
    if duration:
        hours, minutes, seconds = duration.groups()
        declared = int(hours) * 3600 + int(minutes) * 60 + float(seconds)
    return Probe(frozenset(names[1].split(",")), int(frame[2]), int(frame[1]), declared)


def _seeking_input(source: str, probe: Probe, seek: int) -> ffmpeg.nodes.FilterableStream:
    # -ss is relative to the (pts) origin; land a preroll second early, then cut
    # at exactly `seek` seconds on the original timeline, in source samples.
    origin = probe.first_pts / probe.sample_rate
    stream = ffmpeg.input(
        source,
        ss=f"{seek - SEEK_PREROLL_SECONDS + origin:.6f}",
        copyts=None,
        noaccurate_seek=None,
        **_input_options(source),
    )["a:0"]
    return stream.filter("atrim", start_pts=probe.first_pts + seek * probe.sample_rate)


def _audio_input(source: str) -> ffmpeg.nodes.FilterableStream:
    return ffmpeg.input(source, **_input_options(source))["a:0"]


def _input_options(source: str) -> dict[str, object]:
    """What ffmpeg may open for this source: only the source itself (issue 13).

    The demuxers are single-file containers: playlists and scripts (hls, dash, concat,
    ...) name further URLs, which ffmpeg would fetch with no guard between (an HLS
    playlist whose segment is 169.254.169.254). The protocols are the source's own,
    inherited by anything nested. Over HTTP, ffmpeg follows no redirect: the guard
    (shared/urlguard.py) followed and checked them already, so one appearing later (a
    host answering the probe with media, then with a redirect) is refused."""
    options: dict[str, object] = {"format_whitelist": SAFE_DEMUXERS}
    if not is_url(source):
        return {**options, "protocol_whitelist": "file"}
    # ffmpeg reads URLs itself (range requests when seeking); survive short drops.
    return {
        **options,
        "protocol_whitelist": "http,https,tcp,tls",
        "max_redirects": 0,
        "rw_timeout": _NETWORK_TIMEOUT_US,
        "reconnect": 1,
        "reconnect_on_network_error": 1,
        "reconnect_delay_max": 4,
    }


def _zero_length() -> MediaError:
    return MediaError(
        "the audio track contains no samples (zero length); upload a recording with sound",
        permanent=True,
    )


def _check_local_file(source: str) -> None:
    if is_url(source):
        return
    if not os.path.exists(source):
        raise MediaError(f"the file {source} does not exist", permanent=True)
    if os.path.isfile(source) and os.path.getsize(source) == 0:
        raise MediaError("the file is empty (0 bytes); upload the recording again", permanent=True)


class _FfmpegPipe:
    """One ffmpeg process writing raw 16 kHz mono float32 to a pipe.

    stderr is drained by a thread (keeping its tail for error messages) so that
    a chatty ffmpeg can never block on a full pipe.
    """

    def __init__(self, source: str, stream: ffmpeg.nodes.FilterableStream) -> None:
        self.source = source
        out = ffmpeg.output(stream, "pipe:", format="f32le", ac=1, ar=SAMPLE_RATE)
        # Over HTTP, warnings too: a failed request after the first is only a warning.
        level = "warning" if is_url(source) else "error"
        out = out.global_args("-nostdin", "-hide_banner", "-loglevel", level)
        self.proc = subprocess.Popen(
            out.compile(cmd=ffmpeg_binary()), stdout=subprocess.PIPE, stderr=subprocess.PIPE
        )
        self._stderr: deque[bytes] = deque(maxlen=64)
        self._http_error: str | None = None  # kept apart: the tail may lose it
        self._drain = threading.Thread(target=self._read_stderr, daemon=True)
        self._drain.start()

    def _read_stderr(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self._stderr.append(line)
            if self._http_error is None and _HTTP_ERROR.search(line.decode(errors="replace")):
                self._http_error = line.decode(errors="replace")

    def blocks(self, block_bytes: int) -> Iterator[np.ndarray]:
        """Yield float32 blocks of ``block_bytes`` (the last may be shorter)."""
        assert self.proc.stdout is not None
        block_bytes -= block_bytes % BYTES_PER_SAMPLE
        while True:
            data = self.proc.stdout.read(block_bytes)
            usable = len(data) - len(data) % BYTES_PER_SAMPLE
            if usable:
                yield np.frombuffer(data[:usable], dtype=np.float32).copy()
            if len(data) < block_bytes:
                break
        self.proc.wait()
        self._drain.join()
        if self.proc.returncode != 0:
            raise _classify(self.source, b"".join(self._stderr).decode(errors="replace"))
        if failed := _cut_short(self.source, self._http_error or ""):
            raise failed

    def __enter__(self) -> _FfmpegPipe:
        return self

    def __exit__(self, *exc: object) -> None:
        # Reached early when the consumer stops reading: don't decode the rest.
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for pipe in (self.proc.stdout, self.proc.stderr):
            if pipe is not None:
                pipe.close()


# ffmpeg message fragment -> what a person should be told.
_PERMANENT_REASONS = (
    ("matches no streams", "the file has no audio track; upload a recording that contains sound"),
    (
        # A header claiming an impossible rate (over ~134 MHz with ffmpeg 9): the
        # resampler refuses the ratio, the same way on every try.
        "Failed to initialize resampler",
        "the audio's sample rate cannot be converted to 16 kHz (the file claims an "
        "impossible rate, so its header is probably corrupt); convert the recording to "
        "a common rate such as 48 kHz and upload it again",
    ),
    (
        "moov atom not found",
        "the file is incomplete (the MP4 index is missing, often a truncated upload or "
        "an unfinished recording); upload the complete file",
    ),
    (
        # SAFE_DEMUXERS refused it: a playlist, a manifest or a script naming other URLs.
        "Format not on whitelist",
        "the source has no audio track this farm reads: it is an image, a playlist or "
        "another format that is not one audio or video file (HLS, DASH and concat scripts "
        "name other URLs, which are not fetched); submit the audio or video file itself",
    ),
    (
        "Invalid data found when processing input",
        "the file is not audio or video ffmpeg can read, or it is corrupt; upload an "
        "audio or video file such as MP3, WAV, M4A or MP4",
    ),
    ("No such file or directory", "the file does not exist"),
    ("Permission denied", "the file cannot be read (permission denied)"),
)
_NETWORK_HINTS = (
    "Connection",
    "timed out",
    "Server returned",
    "resolve",
    "I/O error",
    "Network",
    "HTTP error",
    "Input/output error",
    "End of file",
    "TLS",
)


# How ffmpeg's http protocol logs a request answered with an error status.
_HTTP_ERROR = re.compile(r"HTTP error \d{3}[^\r\n]*")


def _cut_short(source: str, stderr: str) -> MediaError | None:
    """ffmpeg ends an input quietly, with status 0, when a request after the first one
    (a seek's range request, a reconnect) is answered with an HTTP error: what it
    decoded is then cut short or empty, and only a warning says so. Seen with S3
    answering 503 SlowDown (tests/chaos): without this check such a read was a
    silently truncated chunk, or a "zero length" file failed for good."""
    if not is_url(source) or not (match := _HTTP_ERROR.search(stderr)):
        return None
    return MediaError(
        f"could not fetch the source over the network ({match[0].strip()}); it will be retried",
        permanent=False,
    )


def _classify(source: str, stderr: str) -> MediaError:
    """Turn ffmpeg's stderr into a MediaError a person can act on."""
    if cut_short := _cut_short(source, stderr):
        # A request failed: what ffmpeg then says about the content ("moov atom not
        # found" when the seek to an MP4's index got a 503) is not about the file.
        return cut_short
    detail = _last_error_line(stderr)
    network = is_url(source) and any(hint in stderr for hint in _NETWORK_HINTS)
    if network and "Invalid data found" not in stderr and "matches no streams" not in stderr:
        return MediaError(
            f"could not fetch the source over the network ({detail}); it will be retried",
            permanent=False,
        )
    for fragment, reason in _PERMANENT_REASONS:
        if fragment in stderr:
            return MediaError(reason, permanent=True)
    if is_url(source):
        return MediaError(f"reading the source failed ({detail})", permanent=False)
    return MediaError(
        f"the file could not be decoded; it may be corrupt (ffmpeg: {detail})", permanent=True
    )


def _last_error_line(stderr: str) -> str:
    """The line that names the cause: ffmpeg ends with generic summaries."""
    lines = [re.sub(r"^\[[^\]]+\] ", "", line.strip()) for line in stderr.splitlines()]
    lines = [line for line in lines if line]
    for line in lines:
        if any(fragment in line for fragment, _ in _PERMANENT_REASONS):
            return line[:300]
    for line in lines:
        if any(word in line for word in ("rror", "failed", "not found", "Connection")):
            return line[:300]
    return lines[-1][:300] if lines else "no error message"


__all__ = [
    "SAMPLE_RATE",
    "MediaError",
    "Probe",
    "ffmpeg_binary",
    "is_url",
    "probe_source",
    "read_range",
    "seconds_to_samples",
    "stream_audio",
]
