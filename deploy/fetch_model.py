"""Bakes a Whisper model into an image (the Dockerfile's `--build-arg MODEL=small.en`).

    python deploy/fetch_model.py NAME DIRECTORY

downloads the CTranslate2 model faster-whisper uses for NAME into DIRECTORY/NAME; the
image then sets SCRIBEFARM_MODEL to that directory, and the worker advertises NAME.
"""

from __future__ import annotations

import sys

from faster_whisper.utils import download_model


def main() -> None:
    name, directory = sys.argv[1:]
    print(download_model(name, output_dir=f"{directory}/{name}"))


if __name__ == "__main__":
    main()
