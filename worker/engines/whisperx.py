"""The whisperx engine: whisperx's batched pipeline, batching windows across chunks.

How whisperx transcribes (whisperx/asr.py, 3.8.6): its pyannote VAD (weights shipped
inside the wheel, ``whisperx/assets/pytorch_model.bin``) scores speech, ``merge_chunks``
cuts and merges it into windows of at most 30 s, and the windows are decoded in batches
*without* timestamps (``WhisperModel.generate_segment_batched``): one segment per window,
spanning the window. Word times, and a split of windows into sentences, come from a
separate wav2vec2 forced alignment (``whisperx.align``).

``FasterWhisperPipeline.transcribe`` only batches the windows of one audio. Here the
windows of every chunk in a ``transcribe_batch`` call (grouped by language) share the
model calls, as in the faster-whisper engine, so a worker's batch of short chunks
fills the batch (the point of whisperx on a GPU). The plan's speech spans (found by
faster-whisper's Silero VAD) are not used: each chunk is decoded in the windows
whisperx's own VAD finds in it, as whisperx would.

Nothing is downloaded at run time except a Whisper model named rather than given as a
path (production): the VAD is the wheel's, and alignment runs only when its model and
NLTK's ``punkt_tab`` sentence splitter (which whisperx would otherwise fetch) are on disk.
Alignment models per language: ``SCRIBEFARM_ALIGN_MODELS="en=/models/w2v2-en,de=..."``
(a local Hugging Face wav2vec2 CTC directory, or a torchaudio bundle / hub name that is
already cached); unset, whisperx's default for the language is used when cached.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import os
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

# pyannote.audio reports usage to its vendor unless told not to: a worker must not
# phone home with its customers' audio durations. Setting the variable opts back in.
os.environ.setdefault("PYANNOTE_METRICS_ENABLED", "false")

import ctranslate2  # noqa: E402
import numpy as np  # noqa: E402
import torch  # noqa: E402

with warnings.catch_warnings():
    # pyannote warns at import that torchcodec cannot decode files (no FFmpeg shared
    # libraries); it is only ever handed in-memory waveforms here, which need no decoder.
    warnings.filterwarnings("ignore", message=r"\s*torchcodec is not installed correctly")
    import whisperx  # noqa: E402
    from faster_whisper.tokenizer import Tokenizer  # noqa: E402
    from whisperx.asr import FasterWhisperPipeline  # noqa: E402
    from whisperx.audio import N_SAMPLES, log_mel_spectrogram  # noqa: E402
    from whisperx.vads import Pyannote  # noqa: E402

from shared.protocol import Segment, Word  # noqa: E402
from worker.audio import SAMPLE_RATE  # noqa: E402
from worker.engines import (  # noqa: E402
    EngineInput,
    EngineOutput,
    WhisperLanguage,
    model_name,
    resolve_model,
)

log = logging.getLogger(__name__)

WINDOW_SECONDS = 30  # Whisper's context: VAD speech is merged into windows up to this
# whisperx's defaults (load_model's default_vad_options), kept here because the windows
# are cut here, outside FasterWhisperPipeline.transcribe.
VAD_ONSET, VAD_OFFSET = 0.500, 0.363


def detect_device() -> str:
    """CUDA when both CTranslate2 (Whisper) and torch (VAD, alignment) see a GPU."""
    if ctranslate2.get_cuda_device_count() > 0 and torch.cuda.is_available():
        return "cuda"
    return "cpu"


@lru_cache(maxsize=4)
def _load_pipeline(
    path: str, device: str, compute_type: str, threads: int
) -> FasterWhisperPipeline:
    # Seconds and hundreds of MB (Whisper plus the VAD): once per process and configuration.
    return whisperx.load_model(
        path,
        device,
        compute_type=compute_type,
        threads=threads,
        vad_method="pyannote",  # the wheel's weights; "silero" would fetch from torch hub
        vad_options={"vad_onset": VAD_ONSET, "vad_offset": VAD_OFFSET},
    )


def align_models_from_env() -> dict[str, str]:
    """``SCRIBEFARM_ALIGN_MODELS="en=/path,de=name"`` as {language: model}."""
    pairs = (p.split("=", 1) for p in os.environ.get("SCRIBEFARM_ALIGN_MODELS", "").split(","))
    return {lang.strip(): model.strip() for lang, model in (p for p in pairs if len(p) == 2)}


@dataclass(eq=False)  # identity: windows point back at their chunk
class _Chunk:
    item: EngineInput
    audio: np.ndarray
    windows: list[tuple[float, float]] = field(default_factory=list)  # seconds, chunk-local
    language: str | None = None
    language_probability: float | None = None
    decoded: list[dict[str, Any]] = field(default_factory=list)  # whisperx segments, in order


class WhisperXEngine(WhisperLanguage):
    name = "whisperx"

    def __init__(
        self,
        model: str | None = None,
        *,
        device: str = "auto",
        compute_type: str | None = None,
        cpu_threads: int = 0,
        batch_size: int = 8,
        align_models: Mapping[str, str] | None = None,
    ) -> None:
        self.device = detect_device() if device == "auto" else device
        compute_type = compute_type or ("float16" if self.device == "cuda" else "int8")
        self.models = [model_name(model)]
        self.batch_size = batch_size
        if cpu_threads > 0:
            torch.set_num_threads(cpu_threads)  # the VAD and alignment run in torch
        self.pipeline = _load_pipeline(resolve_model(model), self.device, compute_type, cpu_threads)
        self.model = self.pipeline.model
        self.align_models = align_models_from_env() if align_models is None else dict(align_models)
        self._aligners: dict[str, tuple[Any, dict] | None] = {}
        self._tokenizers: dict[str, Tokenizer] = {}

    def transcribe_batch(self, items: Sequence[EngineInput]) -> list[EngineOutput]:
        chunks = [self._prepare(item) for item in items]
        groups: dict[tuple[str, str | None, str | None], list[tuple[_Chunk, int]]] = {}
        for chunk in chunks:
            decoding = (chunk.language or "en", chunk.item.prompt, chunk.item.hotwords)
            for index in range(len(chunk.windows)):
                groups.setdefault(decoding, []).append((chunk, index))
        for (language, *_), windows in groups.items():  # in chunk order within a group
            for start in range(0, len(windows), self.batch_size):
                self._decode(windows[start : start + self.batch_size], language)
        return [self._finish(chunk) for chunk in chunks]

    # --- steps ------------------------------------------------------------------

    def _prepare(self, item: EngineInput) -> _Chunk:
        chunk = _Chunk(item, np.ascontiguousarray(item.audio, dtype=np.float32))
        if chunk.audio.size:
            waveform = torch.from_numpy(chunk.audio).unsqueeze(0)
            scores = self.pipeline.vad_model({"waveform": waveform, "sample_rate": SAMPLE_RATE})
            merged = Pyannote.merge_chunks(
                scores, WINDOW_SECONDS, onset=VAD_ONSET, offset=VAD_OFFSET
            )
            chunk.windows = [(float(m["start"]), float(m["end"])) for m in merged]
        chunk.language, chunk.language_probability = self._language(chunk)
        return chunk

    def _samples(self, chunk: _Chunk, index: int) -> np.ndarray:
        start, end = (max(0, int(t * SAMPLE_RATE)) for t in chunk.windows[index])
        return chunk.audio[start:end][:N_SAMPLES]

    def _features(self, windows: list[np.ndarray]) -> np.ndarray:
        # What FasterWhisperPipeline.preprocess computes: a 30 s log-mel per window.
        n_mels = self.model.feat_kwargs.get("feature_size") or 80
        return np.stack(
            [
                log_mel_spectrogram(w, n_mels=n_mels, padding=N_SAMPLES - w.shape[0]).numpy()
                for w in windows
            ]
        )

    def _language(self, chunk: _Chunk) -> tuple[str | None, float | None]:
        if not self.model.model.is_multilingual:
            return "en", 1.0
        if chunk.item.language is not None:
            return chunk.item.language, 1.0
        if not chunk.windows:
            return None, None
        # As whisperx's detect_language, but on the first window of speech, not the
        # first 30 s of audio (which may be silence in a chunk).
        encoded = self.model.encode(self._features([self._samples(chunk, 0)]))
        token, probability = self.model.model.detect_language(encoded)[0][0]
        return token[2:-2], float(probability)

    def _tokenizer(self, language: str) -> Tokenizer:
        if language not in self._tokenizers:
            self._tokenizers[language] = Tokenizer(
                self.model.hf_tokenizer,
                self.model.model.is_multilingual,
                task="transcribe",
                language=language,
            )
        return self._tokenizers[language]

    def _decode(self, batch: list[tuple[_Chunk, int]], language: str) -> None:
        """One batched encoder + generate call over windows of possibly many chunks."""
        features = self._features([self._samples(chunk, i) for chunk, i in batch])
        item = batch[0][0].item  # the batch shares its prompt and hotwords
        options = dataclasses.replace(
            self.pipeline.options, initial_prompt=item.prompt, hotwords=item.hotwords
        )
        out = self.model.generate_segment_batched(features, self._tokenizer(language), options)
        for (chunk, i), text, logprob in zip(batch, out["text"], out["avg_logprob"], strict=True):
            start, end = chunk.windows[i]
            chunk.decoded.append(
                {"start": start, "end": end, "text": text, "avg_logprob": float(logprob)}
            )

    def _finish(self, chunk: _Chunk) -> EngineOutput:
        item = chunk.item
        decoded = [s for s in chunk.decoded if s["text"].strip()]
        aligner = None
        if item.word_timestamps and decoded and chunk.language:
            aligner = self._aligner(chunk.language)
        if aligner is not None:
            model, metadata = aligner
            decoded = whisperx.align(decoded, model, metadata, chunk.audio, self.device)["segments"]
        end = item.offset + chunk.audio.size / SAMPLE_RATE
        segments = [_to_protocol(s, item.offset, end, aligner is not None) for s in decoded]
        return EngineOutput(
            [s for s in segments if s.text], chunk.language, chunk.language_probability
        )

    # --- alignment (optional, local only) ------------------------------------------

    def _aligner(self, language: str) -> tuple[Any, dict] | None:
        """The alignment model for ``language``, loaded once, or None (and one log line)."""
        if language not in self._aligners:
            aligner, reason = None, self._why_no_aligner(language)
            if reason is None:
                model = self.align_models.get(language) or _default_align_model(language)
                aligner = whisperx.load_align_model(
                    language, self.device, model_name=model, model_cache_only=True
                )
                log.info("word timestamps for %r from alignment model %s", language, model)
            else:
                log.warning(
                    "word timestamps asked for in %r, but %s: segments come without words "
                    "(set SCRIBEFARM_ALIGN_MODELS, e.g. en=/models/wav2vec2-en)",
                    language,
                    reason,
                )
            self._aligners[language] = aligner
        return self._aligners[language]

    def _why_no_aligner(self, language: str) -> str | None:
        import nltk
        from whisperx.utils import PUNKT_LANGUAGES

        try:  # whisperx.align splits sentences with it, and downloads it when missing
            nltk.data.find(f"tokenizers/punkt_tab/{PUNKT_LANGUAGES.get(language, 'english')}/")
        except LookupError:
            return "NLTK's punkt_tab data is not installed"
        model = self.align_models.get(language) or _default_align_model(language)
        if model is None:
            return "no alignment model is known for that language"
        if not _is_local(model):
            return f"alignment model {model} is not on this machine"
        return None


def _default_align_model(language: str) -> str | None:
    from whisperx.alignment import DEFAULT_ALIGN_MODELS_HF, DEFAULT_ALIGN_MODELS_TORCH

    return DEFAULT_ALIGN_MODELS_TORCH.get(language) or DEFAULT_ALIGN_MODELS_HF.get(language)


def _is_local(model: str) -> bool:
    """Would loading ``model`` need no download? (A directory, or already in a cache.)"""
    if os.path.isdir(model):
        return True
    import torchaudio

    if model in torchaudio.pipelines.__all__:
        # torchaudio bundles go through torch.hub.load_state_dict_from_url, which keeps
        # the weights under <hub dir>/checkpoints/<file name> (and fetches them if absent).
        bundle = getattr(torchaudio.pipelines, model)
        name = os.path.basename(bundle._path)
        return os.path.isfile(os.path.join(torch.hub.get_dir(), "checkpoints", name))
    from huggingface_hub import try_to_load_from_cache

    return isinstance(try_to_load_from_cache(model, "config.json"), str)


def _to_protocol(seg: dict[str, Any], offset: float, end: float, aligned: bool) -> Segment:
    """A whisperx segment (chunk-local seconds) on the source timeline."""

    def at(t: float) -> float:
        # Rounded, then clamped: never past the chunk's end (a VAD window can overhang it).
        return min(max(round(offset + t, 3), offset), end)

    words = None
    if aligned:
        words, last = [], _finite(seg.get("start"), 0.0)
        for w in seg.get("words", []):
            # Words with no alignable character (digits, symbols) may lack times:
            # they take their neighbour's, so words stay ordered.
            start = _finite(w.get("start"), last)
            stop = max(_finite(w.get("end"), start), start)
            words.append(
                Word(
                    start=at(start),
                    end=at(stop),
                    word=w["word"].strip(),
                    probability=w.get("score"),
                )
            )
            last = stop
    start = _finite(seg.get("start"), words[0].start - offset if words else 0.0)
    stop = _finite(seg.get("end"), words[-1].end - offset if words else start)
    if words:  # the sentence's span covers its words
        start = min(start, words[0].start - offset)
        stop = max(stop, words[-1].end - offset)
    return Segment(
        start=at(start),
        end=at(max(stop, start)),
        text=seg["text"].strip(),
        words=words,
        avg_logprob=None if seg.get("avg_logprob") is None else float(seg["avg_logprob"]),
        no_speech_prob=None,  # whisperx's batched decoding does not compute it
    )


def _finite(value: Any, default: float) -> float:
    return float(value) if value is not None and math.isfinite(float(value)) else default
