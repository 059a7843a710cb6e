"""Known speakers: a short reference clip per name (OpenAI's known_speaker_references[],
data URLs) turned into the voice embedding the merge names matching voices by.

The clip is decoded by the workers' own ffmpeg path (worker/audio.py: single-file
demuxers only, no protocol but the local file), so a clip cannot make the server fetch
anything. Only the first MAX_REFERENCE_SECONDS are read.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import re
import tempfile
from pathlib import Path

import numpy as np
from pydantic import TypeAdapter, ValidationError

from server.errors import describe_validation
from server.uploads import REFERENCES_FIELD, Upload
from shared.protocol import MAX_KNOWN_SPEAKERS, SpeakerName, TranscriptionOptions

# The form fields, as OpenAI names them (the clips' one is uploads.py's, which caps its
# size); either endpoint's multipart upload takes them.
NAMES_FIELD = "known_speaker_names[]"
MAX_REFERENCE_SECONDS = 30.0
MIN_REFERENCE_SECONDS = 1.0
NAMES = TypeAdapter(list[SpeakerName])
DATA_URL = re.compile(r"^data:([\w.+-]+/[\w.+-]+)?(;[\w.+-]+=[\w.+-]+)*;base64,", re.ASCII)


class ReferenceRefused(ValueError):
    """A reference clip that cannot name anyone; the message says why."""


async def with_known_speakers(
    options: TranscriptionOptions, upload: Upload
) -> TranscriptionOptions:
    """The options with the upload's known speakers, each name with the voice of its
    reference clip (TranscriptionOptions.known_speakers)."""
    names = upload.repeated.get(NAMES_FIELD, [])
    clips = [clip_bytes(url) for url in upload.repeated.get(REFERENCES_FIELD, [])]
    if not names and not clips:
        return options
    if len(names) != len(clips):
        raise ReferenceRefused(f"send one {REFERENCES_FIELD} for each {NAMES_FIELD}")
    if not options.diarize:
        raise ReferenceRefused("known speakers need diarization (diarize=true, or diarized_json)")
    check_names(names)  # before any clip is decoded
    voices = await asyncio.gather(*(asyncio.to_thread(reference_embedding, c) for c in clips))
    known = [
        {"name": name.strip(), "embedding": voice}
        for name, voice in zip(names, voices, strict=True)
    ]
    try:
        return TranscriptionOptions.model_validate(
            {**options.model_dump(exclude_unset=True), "known_speakers": known}
        )
    except ValidationError as exc:
        raise ReferenceRefused(describe_validation(exc.errors())) from exc


def check_names(names: list[str]) -> None:
    if len(names) > MAX_KNOWN_SPEAKERS:
        raise ReferenceRefused(f"at most {MAX_KNOWN_SPEAKERS} known speakers")
    try:
        NAMES.validate_python([name.strip() for name in names])
    except ValidationError as exc:
        raise ReferenceRefused(f"{NAMES_FIELD}: {describe_validation(exc.errors())}") from exc
    if len({name.strip() for name in names}) != len(names):
        raise ReferenceRefused("known speakers need different names")


def clip_bytes(data_url: str) -> bytes:
    """The audio in a `data:audio/...;base64,...` URL."""
    match = DATA_URL.match(data_url)
    if match is None:
        raise ReferenceRefused("a reference is a base64 data URL (data:audio/wav;base64,...)")
    try:
        return base64.b64decode(data_url[match.end() :], validate=True)
    except binascii.Error as exc:
        raise ReferenceRefused("a reference's base64 is malformed") from exc


def reference_embedding(clip: bytes) -> str:
    """The clip's voice, as a packed embedding (blocking: call it in a thread)."""
    try:
        from worker.audio import SAMPLE_RATE, MediaError, stream_audio
        from worker.voices import VoiceEncoderMissing, embed_clip, pack
    except ImportError as exc:  # a server-only install: no ffmpeg, no voice encoder
        raise ReferenceRefused(
            "this server cannot read reference clips: it needs the worker's packages "
            "(pip install 'scribefarm[worker]', and the voice encoder)"
        ) from exc
    with tempfile.TemporaryDirectory() as directory:
        path = Path(directory) / "reference"
        path.write_bytes(clip)
        try:
            blocks = list(stream_audio(str(path), 0.0, MAX_REFERENCE_SECONDS))
        except MediaError as exc:
            raise ReferenceRefused(f"a reference clip cannot be read: {exc.reason}") from exc
    audio = np.concatenate(blocks) if blocks else np.zeros(0, np.float32)
    if len(audio) < MIN_REFERENCE_SECONDS * SAMPLE_RATE:
        raise ReferenceRefused(f"a reference clip is under {MIN_REFERENCE_SECONDS:g} s of audio")
    try:
        return pack(embed_clip(audio))
    except VoiceEncoderMissing as exc:
        raise ReferenceRefused(str(exc)) from exc
