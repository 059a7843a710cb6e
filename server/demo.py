"""`scribefarm demo`: a local farm transcribes speech made from a known text."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

SAMPLE_TEXT = (
    "Welcome to scribefarm. Long recordings are cut into chunks at the pauses, and "
    "many workers transcribe the chunks at the same time. When the last chunk is "
    "done, the pieces are stitched back together into one transcript, with every "
    "timestamp on the original timeline. If a worker dies in the middle of a job, "
    "its lease runs out and another worker finishes the work, so nothing is lost."
)


def synthesize_sample(directory: Path) -> Path:
    """Speech from SAMPLE_TEXT with espeak-ng, offline."""
    espeak = shutil.which("espeak-ng")
    if espeak is None:
        raise RuntimeError(
            "espeak-ng is not installed, so there is no sample to transcribe: "
            "install it (apt-get install espeak-ng) or pass an audio file: scribefarm demo FILE"
        )
    directory.mkdir(parents=True, exist_ok=True)
    path = directory / "sample.wav"
    subprocess.run([espeak, "-s", "150", "-w", str(path), SAMPLE_TEXT], check=True)
    return path
