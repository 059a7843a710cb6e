"""The faster-whisper (CTranslate2) engine: the batched pipeline's decoding, batched
across chunks and jobs.

How faster-whisper's ``BatchedInferencePipeline`` transcribes (faster_whisper/
transcribe.py, 1.2.1): Silero VAD finds the speech of the whole audio, consecutive
speech is merged into *windows* of at most 30 s (``collect_chunks``), and
``batch_size`` windows at a time go through one encoder and one ``generate`` call,
*without* timestamp tokens, at temperature 0, with no previous-text conditioning.

This engine decodes exactly those windows. The chunk job ran the pipeline's VAD over
the whole source (worker/vad.py) and cut chunks between windows, so each chunk's speech
spans arrive with it and pack into the same windows the single pass would decode
(a chunk without spans finds its own). The windows of every chunk of a
``transcribe_batch`` call (with the same language and prompt) share the batched model
calls; each window remembers its chunk so the text goes back to it.

Decoding without timestamp tokens gives one text per window (decoding with them cost
2.5 WER points on real speech). Times come from the words instead: cross-attention
alignment (computed for the whole batch at once, then post-processed per chunk, since
``add_word_timestamps`` carries state from window to window) times every word, the
speech map puts them back on the source's timeline, and worker/phrases.py groups them
into readable segments. Words are returned only when the transcription asked for them.

Determinism: the same audio, spans and options give the same segments, alone or
batched with others. A chunk without speech never reaches the model.
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
from faster_whisper.transcribe import Segment as FwSegment
from faster_whisper.transcribe import (
    TranscriptionOptions,
    get_suppressed_tokens,
    restore_speech_timestamps,
)
from faster_whisper.transcribe import Word as FwWord

from shared.protocol import Segment, Word
from worker.audio import SAMPLE_RATE
from worker.engines import (
    EngineInput,
    EngineOutput,
    WhisperLanguage,
    model_name,
    resolve_model,
)
from worker.phrases import TimedWord, group_words, phrase_text
from worker.vad import detect_speech, pack_windows

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
    speech: list[dict] = field(default_factory=list)  # speech spans, in samples
    features: list[np.ndarray] = field(default_factory=list)  # one per window
    metas: list[dict] = field(default_factory=list)  # window offset/duration (collapsed)
    language: str | None = None
    language_probability: float | None = None
    rows: list[list[dict]] = field(default_factory=list)  # decoded windows, in order
    last_speech: float = 0.0  # word-timing state carried from window to window

    def decoding(self) -> tuple[str, str, str]:
        """What must be equal for windows to share a model call (language, prompt,
        hotwords)."""
        return self.language or "en", self.item.prompt or "", self.item.hotwords or ""


class _Alignments:
    """Stands in for WhisperModel in ``add_word_timestamps``: precomputed alignments."""

    def __init__(self, alignments: list[list[dict]], frames_per_second: int) -> None:
        self.alignments, self.frames_per_second = alignments, frames_per_second

    def find_alignment(self, *_: object) -> list[list[dict]]:
        return self.alignments


class FasterWhisperEngine(WhisperLanguage):
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
    ) -> None:
        auto_device, auto_type = detect_device()
        self.device = auto_device if device == "auto" else device
        compute_type = compute_type or (auto_type if self.device == auto_device else "default")
        self.models = [model_name(model)]
        self.batch_size, self.beam_size = batch_size, beam_size
        self.model = _load_model(resolve_model(model), self.device, compute_type, cpu_threads)
        self._pipeline = BatchedInferencePipeline(self.model)

    def transcribe_batch(self, items: Sequence[EngineInput]) -> list[EngineOutput]:
        chunks = [self._prepare(item) for item in items]
        windows = [(c, w) for c in chunks for w in range(len(c.features))]

        def key(window: tuple[_Chunk, int]) -> tuple[str, str, str]:
            return window[0].decoding()

        for _, group in itertools.groupby(sorted(windows, key=key), key=key):
            group_list = list(group)  # sorted() is stable: windows stay in chunk order
            for i in range(0, len(group_list), self.batch_size):
                self._decode(group_list[i : i + self.batch_size])
        return [self._finish(chunk) for chunk in chunks]

    def _prepare(self, item: EngineInput) -> _Chunk:
        chunk = _Chunk(item)
        audio = np.asarray(item.audio, dtype=np.float32)
        spans = detect_speech(audio) if item.speech is None else item.speech
        chunk.speech = [{"start": s, "end": e} for s, e in spans]
        extract = self.model.feature_extractor
        offset = 0
        for window in pack_windows(spans):
            samples = np.concatenate([audio[s:e] for s, e in window])
            chunk.features.append(extract(samples)[..., :-1])
            chunk.metas.append(
                {"offset": offset / SAMPLE_RATE, "duration": samples.size / SAMPLE_RATE}
            )
            offset += samples.size
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

    def _options(self, tokenizer: Tokenizer, chunk: _Chunk) -> TranscriptionOptions:
        # BatchedInferencePipeline.transcribe's defaults; word timestamps always (they
        # time the segments).
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
            initial_prompt=chunk.item.prompt,
            prefix=None,
            suppress_blank=True,
            suppress_tokens=get_suppressed_tokens(tokenizer, [-1]),
            without_timestamps=True,
            max_initial_timestamp=0.0,
            word_timestamps=True,
            prepend_punctuations=_PREPEND,
            append_punctuations=_APPEND,
            multilingual=False,
            max_new_tokens=None,
            clip_timestamps=[],
            hallucination_silence_threshold=None,
            hotwords=chunk.item.hotwords,
        )

    def _decode(self, batch: list[tuple[_Chunk, int]]) -> None:
        """One batched encoder + generate call over windows of possibly many chunks."""
        model = self.model
        language = batch[0][0].decoding()[0]
        tokenizer = Tokenizer(
            model.hf_tokenizer, model.model.is_multilingual, task="transcribe", language=language
        )
        options = self._options(tokenizer, batch[0][0])
        features = np.stack([pad_or_trim(chunk.features[w]) for chunk, w in batch])
        encoder_output, outputs = self._pipeline.generate_segment_batched(
            features, tokenizer, options
        )
        rows, sizes = [], []
        for (chunk, w), output in zip(batch, outputs, strict=True):
            meta = chunk.metas[w]
            sizes.append(int(ceil(meta["duration"]) * model.frames_per_second))
            rows.append(self._split(tokenizer, output, meta, sizes[-1]))
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
        """Map window times back to the chunk, then onto the source timeline, in phrases."""
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
                words=[FwWord(**w) for w in sub.get("words", [])],
                temperature=0.0,
            )
            for row in chunk.rows
            for sub in row
        ]
        restored = restore_speech_timestamps(decoded, chunk.speech, SAMPLE_RATE)
        timeline = _Timeline(item.offset, item.offset + len(item.audio) / SAMPLE_RATE)
        segments = [
            segment
            for window in restored
            if window.text.strip()
            for segment in timeline.phrases(window, item.word_timestamps)
        ]
        return EngineOutput(segments, chunk.language, chunk.language_probability)


@dataclass(frozen=True)
class _Timeline:
    """A chunk's place on the source: its times are clamped inside it."""

    offset: float
    end: float

    def at(self, t: float) -> float:
        return round(min(max(self.offset + float(t), self.offset), self.end), 3)

    def phrases(self, window: FwSegment, with_words: bool) -> list[Segment]:
        """A decoded window as readable segments timed by their words (the window's own
        speech-span times when it has none)."""
        scores = {"avg_logprob": float(window.avg_logprob)}
        scores["no_speech_prob"] = float(window.no_speech_prob)
        if not window.words:
            start, end = self.at(window.start), self.at(window.end)
            return [Segment(start=start, end=end, text=window.text.strip(), **scores)]
        timed = [
            TimedWord(w.word, self.at(w.start), self.at(w.end), float(w.probability))
            for w in window.words
        ]
        segments = []
        for phrase in group_words(timed):
            words = [
                Word(start=w.start, end=w.end, word=w.text.strip(), probability=w.probability)
                for w in phrase
            ]
            segments.append(
                Segment(
                    start=phrase[0].start,
                    end=phrase[-1].end,
                    text=phrase_text(phrase),
                    words=words if with_words else None,
                    **scores,
                )
            )
        return segments
