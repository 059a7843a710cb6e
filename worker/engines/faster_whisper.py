"""The faster-whisper (CTranslate2) engine, batching windows across chunks and jobs.

How faster-whisper's ``BatchedInferencePipeline`` batches (faster_whisper/
transcribe.py, 1.2.1): it runs the Silero VAD over one audio, merges the speech
into *windows* of at most 30 s (``collect_chunks``), computes a log-mel feature
matrix per window and sends ``batch_size`` windows at a time through
``generate_segment_batched`` (one encoder call, one ``generate`` call). Segment
times are then mapped from the VAD-collapsed timeline back to the audio's.

One pipeline call only ever batches windows of *one* audio. Here every chunk of
a ``transcribe_batch`` call gets its own VAD windows, and the windows of all
chunks (with the same language and word-timestamp setting) share the batched
model calls; each window remembers its chunk so the segments go back to it and
through that chunk's own timestamp map. Word timing post-processing is run per
chunk (``add_word_timestamps`` carries state from window to window, which must
not leak between chunks), on alignments computed for the whole batch at once.

Determinism: decoding uses temperature 0 only (the batched pipeline has no
temperature fallback) and beam search, and no previous-text conditioning, so the
same audio and options give the same segments, alone or batched with others.
A chunk without speech never reaches the model: the VAD finds no windows.
"""

from __future__ import annotations

import itertools
from collections.abc import Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from math import ceil

import ctranslate2
import numpy as np
from faster_whisper import BatchedInferencePipeline, WhisperModel
from faster_whisper.audio import pad_or_trim
from faster_whisper.tokenizer import Tokenizer
from faster_whisper.transcribe import (
    Segment as FwSegment,
)
from faster_whisper.transcribe import (
    TranscriptionOptions,
    get_suppressed_tokens,
    restore_speech_timestamps,
)
from faster_whisper.transcribe import (
    Word as FwWord,
)
from faster_whisper.vad import VadOptions, collect_chunks, get_speech_timestamps

from server.protocol import Segment, Word
from worker.audio import SAMPLE_RATE
from worker.engines import EngineInput, EngineOutput, model_name, resolve_model

WINDOW_SECONDS = 30  # Whisper's context: VAD windows are merged up to this length
_PREPEND = "\"'“¿([{-"
_APPEND = "\"'.。,，!！?？:：”)]}、"


def detect_device() -> tuple[str, str]:
    """(device, compute type): CUDA float16 when CTranslate2 sees a GPU, else CPU int8."""
    if ctranslate2.get_cuda_device_count() > 0:
        return "cuda", "float16"
    return "cpu", "int8"


@lru_cache(maxsize=4)
def _load_model(path: str, device: str, compute_type: str, cpu_threads: int) -> WhisperModel:
    # Loading takes seconds and hundreds of MB: once per process and configuration.
    return WhisperModel(path, device=device, compute_type=compute_type, cpu_threads=cpu_threads)


@dataclass(eq=False)  # identity: chunks are grouped by object
class _Chunk:
    """One input, prepared: its speech map, windows and language."""

    item: EngineInput
    speech: list[dict] = field(default_factory=list)  # VAD spans, in samples
    features: list[np.ndarray] = field(default_factory=list)  # one per window
    metas: list[dict] = field(default_factory=list)  # window offset/duration (collapsed)
    language: str | None = None
    language_probability: float | None = None
    rows: list[list[dict]] = field(default_factory=list)  # decoded windows, in order
    last_speech: float = 0.0  # word-timing state carried from window to window


class _Alignments:
    """Stands in for WhisperModel in ``add_word_timestamps``: precomputed alignments."""

    def __init__(self, alignments: list[list[dict]], frames_per_second: int) -> None:
        self.alignments, self.frames_per_second = alignments, frames_per_second

    def find_alignment(self, *_: object) -> list[list[dict]]:
        return self.alignments


class FasterWhisperEngine:
    name = "faster-whisper"

    def __init__(
        self,
        model: str | None = None,
        *,
        device: str = "auto",
        compute_type: str | None = None,
        cpu_threads: int = 0,
        batch_size: int = 8,
        beam_size: int = 5,
        segment_timestamps: bool = True,
    ) -> None:
        auto_device, auto_type = detect_device()
        self.device = auto_device if device == "auto" else device
        compute_type = compute_type or (auto_type if self.device == auto_device else "default")
        self.models = [model_name(model)]
        self.batch_size, self.beam_size = batch_size, beam_size
        self.segment_timestamps = segment_timestamps
        self.model = _load_model(resolve_model(model), self.device, compute_type, cpu_threads)
        self._pipeline = BatchedInferencePipeline(self.model)
        self._vad = VadOptions(max_speech_duration_s=WINDOW_SECONDS, min_silence_duration_ms=160)

    def transcribe_batch(self, items: Sequence[EngineInput]) -> list[EngineOutput]:
        chunks = [self._prepare(item) for item in items]
        windows = [(c, w) for c in chunks for w in range(len(c.features))]

        def key(window: tuple[_Chunk, int]) -> tuple[str, bool]:
            return window[0].language or "en", window[0].item.word_timestamps

        for (language, words), group in itertools.groupby(sorted(windows, key=key), key=key):
            group_list = list(group)  # sorted() is stable: windows stay in chunk order
            for i in range(0, len(group_list), self.batch_size):
                self._decode(group_list[i : i + self.batch_size], language, words)
        return [self._finish(chunk) for chunk in chunks]

    def _prepare(self, item: EngineInput) -> _Chunk:
        chunk = _Chunk(item)
        audio = np.asarray(item.audio, dtype=np.float32)
        chunk.speech = get_speech_timestamps(audio, self._vad) if audio.size else []
        if chunk.speech:
            windows, chunk.metas = collect_chunks(audio, chunk.speech, max_duration=WINDOW_SECONDS)
            extract = self.model.feature_extractor
            chunk.features = [extract(window)[..., :-1] for window in windows]
        chunk.language, chunk.language_probability = self._language(item.language, chunk)
        return chunk

    def _language(self, requested: str | None, chunk: _Chunk) -> tuple[str | None, float | None]:
        if not self.model.model.is_multilingual:
            return "en", 1.0
        if requested is not None:
            return requested, 1.0
        if not chunk.features:
            return None, None
        # As the pipeline does: the first 30 s of speech decide.
        language, probability, _ = self.model.detect_language(
            features=np.concatenate(chunk.features, axis=1)
        )
        return language, float(probability)

    def _options(self, tokenizer: Tokenizer, word_timestamps: bool) -> TranscriptionOptions:
        # The values BatchedInferencePipeline.transcribe uses, with temperature 0 only.
        return TranscriptionOptions(
            beam_size=self.beam_size,
            best_of=5,
            patience=1,
            length_penalty=1,
            repetition_penalty=1,
            no_repeat_ngram_size=0,
            log_prob_threshold=-1.0,
            no_speech_threshold=0.6,
            compression_ratio_threshold=2.4,
            condition_on_previous_text=False,
            prompt_reset_on_temperature=0.5,
            temperatures=[0.0],
            initial_prompt=None,
            prefix=None,
            suppress_blank=True,
            suppress_tokens=get_suppressed_tokens(tokenizer, [-1]),
            without_timestamps=not self.segment_timestamps,
            max_initial_timestamp=0.0,
            word_timestamps=word_timestamps,
            prepend_punctuations=_PREPEND,
            append_punctuations=_APPEND,
            multilingual=False,
            max_new_tokens=None,
            clip_timestamps=[],
            hallucination_silence_threshold=None,
            hotwords=None,
        )

    def _decode(self, batch: list[tuple[_Chunk, int]], language: str, words: bool) -> None:
        """One batched encoder + generate call over windows of possibly many chunks."""
        model = self.model
        tokenizer = Tokenizer(
            model.hf_tokenizer, model.model.is_multilingual, task="transcribe", language=language
        )
        options = self._options(tokenizer, words)
        features = np.stack([pad_or_trim(chunk.features[w]) for chunk, w in batch])
        encoder_output, outputs = self._pipeline.generate_segment_batched(
            features, tokenizer, options
        )
        rows, sizes = [], []
        for (chunk, w), output in zip(batch, outputs, strict=True):
            meta = chunk.metas[w]
            sizes.append(int(ceil(meta["duration"]) * model.frames_per_second))
            rows.append(self._split(tokenizer, output, meta, sizes[-1]))
        if words:
            text_tokens = [
                [t for sub in row for t in sub["tokens"] if t < tokenizer.eot] for row in rows
            ]
            alignments = model.find_alignment(tokenizer, text_tokens, encoder_output, sizes)
            self._add_words(batch, rows, sizes, alignments, tokenizer)
        for (chunk, _), row in zip(batch, rows, strict=True):
            chunk.rows.append(row)

    def _split(self, tokenizer: Tokenizer, output: dict, meta: dict, size: int) -> list[dict]:
        subsegments, _, _ = self.model._split_segments_by_timestamps(
            tokenizer=tokenizer,
            tokens=output["tokens"],
            time_offset=meta["offset"],
            segment_size=size,
            segment_duration=meta["duration"],
            seek=0,
        )
        seek = int(meta["offset"] * self.model.frames_per_second)
        return [
            {
                "text": tokenizer.decode(sub["tokens"]),
                "tokens": sub["tokens"],
                "start": sub["start"],
                "end": sub["end"],
                "seek": seek,
                "avg_logprob": output["avg_logprob"],
                "no_speech_prob": output["no_speech_prob"],
            }
            for sub in subsegments
        ]

    def _add_words(
        self,
        batch: list[tuple[_Chunk, int]],
        rows: list[list[dict]],
        sizes: list[int],
        alignments: list[list[dict]],
        tokenizer: Tokenizer,
    ) -> None:
        # Per chunk, over its consecutive windows in this batch, carrying its own state.
        indices = range(len(batch))
        for chunk, group in itertools.groupby(indices, key=lambda i: batch[i][0]):
            picked = list(group)
            stand_in = _Alignments([alignments[i] for i in picked], self.model.frames_per_second)
            last = WhisperModel.add_word_timestamps(
                stand_in,  # type: ignore[arg-type]
                [rows[i] for i in picked],
                tokenizer,
                None,
                [sizes[i] for i in picked],
                _PREPEND,
                _APPEND,
                chunk.last_speech,
            )
            chunk.last_speech = chunk.last_speech if last is None else last

    def _finish(self, chunk: _Chunk) -> EngineOutput:
        """Map window times back to the chunk, then onto the source timeline."""
        item = chunk.item
        decoded = [
            FwSegment(
                id=0,
                seek=sub["seek"],
                start=round(sub["start"], 3),
                end=round(sub["end"], 3),
                text=sub["text"],
                tokens=sub["tokens"],
                avg_logprob=sub["avg_logprob"],
                compression_ratio=0.0,
                no_speech_prob=sub["no_speech_prob"],
                words=[FwWord(**w) for w in sub.get("words", [])] if item.word_timestamps else None,
                temperature=0.0,
            )
            for row in chunk.rows
            for sub in row
        ]
        restored = restore_speech_timestamps(decoded, chunk.speech, SAMPLE_RATE)
        end = item.offset + len(item.audio) / SAMPLE_RATE
        segments = [_to_protocol(seg, item.offset, end) for seg in restored if seg.text.strip()]
        return EngineOutput(segments, chunk.language, chunk.language_probability)


def _to_protocol(seg: FwSegment, offset: float, end: float) -> Segment:
    def at(t: float) -> float:
        return round(min(max(offset + float(t), offset), end), 3)

    words = None
    if seg.words is not None:
        words = [
            Word(
                start=at(w.start),
                end=at(w.end),
                word=w.word.strip(),
                probability=float(w.probability),
            )
            for w in seg.words
        ]
    return Segment(
        start=at(seg.start),
        end=at(seg.end),
        text=seg.text.strip(),
        words=words,
        avg_logprob=float(seg.avg_logprob),
        no_speech_prob=float(seg.no_speech_prob),
    )
