"""Where the speech is, found exactly as faster-whisper's batched pipeline finds it.

The farm must decode the same 30 s windows the single-machine pipeline decodes: a
window cut differently reads differently (measured: cutting a file into chunks that
each ran their own VAD cost 2.7 WER points on real speech). So the chunk job runs
the pipeline's voice activity detection over the whole source, once, and the plan
carries each chunk's speech spans to its transcribe job.

faster-whisper's ``get_speech_timestamps`` needs the whole audio in memory (2.3 GB
for 10 hours); here the same computation is streamed:

* ``SpeechProbabilities`` runs faster-whisper's Silero model on 512-sample frames in
  batches with the recurrent state carried between batches, as
  ``SileroVADModel.__call__`` does over the whole audio, so the probabilities are the
  same numbers (tests/integration/test_vad.py checks it on real audio). One shortcut: a
  whole batch (32 s) in which nothing is audible (digital silence, a muted input) is
  not run through the model: its frames count as silence and the state starts afresh
  after it, as at the start of a recording. Ten hours of silence are then planned in
  the seconds decoding takes, not the minutes the model would.
* ``speech_spans`` turns probabilities into padded speech spans with the same rules
  (hysteresis, minimum silence, maximum speech length, padding).
* ``pack_windows`` merges consecutive spans into windows of at most 30 s of speech,
  as the pipeline's ``collect_chunks`` does, and additionally never lets a window
  stretch over more than ``max_extent`` seconds of the timeline (a window whose speech
  is spread over minutes of silence would make a chunk that long).
"""

from __future__ import annotations

import functools
from collections.abc import Sequence
from pathlib import Path

import numpy as np
import onnxruntime
from faster_whisper.utils import get_assets_path
from faster_whisper.vad import VadOptions

from worker.audio import SAMPLE_RATE

FRAME = 512  # samples per probability
_CONTEXT = 64  # samples of the previous frame the model sees with each frame
# Frames per model call, the state carried from call to call. The pipeline calls it with
# 10,000 (320 s, ~200 MB of activations); the probabilities come out bit for bit the same
# with fewer (checked against the pipeline in tests/integration/test_vad.py).
_BATCH_FRAMES = 1_000
# No sample louder than this (-80 dBFS) in a whole batch: nothing for Whisper to hear.
# (Speech peaking at -60 dBFS is still transcribed: tests/integration/test_bad_media.py.)
INAUDIBLE = 10 ** (-80 / 20)
WINDOW_SECONDS = 30.0  # Whisper's context

# The pipeline's defaults: BatchedInferencePipeline.transcribe with vad_filter=True.
PIPELINE_VAD = VadOptions(max_speech_duration_s=WINDOW_SECONDS, min_silence_duration_ms=160)

Span = tuple[int, int]  # [start, end) in samples


@functools.cache
def vad_session() -> onnxruntime.InferenceSession:
    """faster-whisper's Silero model in a session of our own, with onnxruntime's memory
    arena on. faster-whisper turns it off, and then every batch's tensors go through
    malloc, whose heap grew a planner to 1.1 GB in one run of four (1 h of speech; 150 MB
    with the arena). Batches here have one shape, so the arena stays the size of one."""
    [model] = Path(get_assets_path()).glob("silero_vad*.onnx")
    options = onnxruntime.SessionOptions()
    options.inter_op_num_threads = 1  # as faster-whisper runs it: one core per job
    options.intra_op_num_threads = 1
    options.log_severity_level = 4
    return onnxruntime.InferenceSession(
        str(model), providers=["CPUExecutionProvider"], sess_options=options
    )


class SpeechProbabilities:
    """Speech probability per 512-sample frame of audio fed in blocks of any size."""

    def __init__(self) -> None:
        self.samples = 0
        self._pending: list[np.ndarray] = []
        self._pending_samples = 0
        self._probs: list[np.ndarray] = []
        self._restart()

    def _restart(self) -> None:
        """The model's state at the start of a recording."""
        self._context = np.zeros(_CONTEXT, dtype=np.float32)
        self._state = (np.zeros((1, 1, 128), np.float32), np.zeros((1, 1, 128), np.float32))

    def feed(self, block: np.ndarray) -> None:
        self.samples += block.size
        self._pending.append(block.astype(np.float32, copy=False))
        self._pending_samples += block.size
        batch = _BATCH_FRAMES * FRAME
        # A full batch only while more audio follows: the last frame is treated apart.
        if self._pending_samples > batch:
            pending = self._take()
            while pending.size > batch:
                self._run(pending[:batch].reshape(-1, FRAME))
                pending = pending[batch:]
            self._pending, self._pending_samples = [pending], pending.size

    def so_far(self) -> np.ndarray:
        """The probabilities of the frames run so far (whole batches), as they will stay."""
        return np.concatenate(self._probs) if self._probs else np.zeros(0, np.float32)

    def finish(self) -> np.ndarray:
        """All probabilities. The audio is padded to whole frames (a whole extra frame
        when it already fits) and its last 64 samples zeroed, as the pipeline does."""
        pending = self._take()
        frames = np.pad(pending, (0, FRAME - pending.size % FRAME)).reshape(-1, FRAME)
        frames[-1, -_CONTEXT:] = 0
        self._run(frames)
        return self.so_far()

    def _take(self) -> np.ndarray:
        pending = np.concatenate(self._pending) if self._pending else np.zeros(0, np.float32)
        self._pending, self._pending_samples = [], 0
        return pending

    def _run(self, frames: np.ndarray) -> None:
        if frames.shape[0] == _BATCH_FRAMES and np.abs(frames).max() < INAUDIBLE:
            self._restart()
            self._probs.append(np.zeros(frames.shape[0], np.float32))
            return
        contexts = np.concatenate((self._context[None, :], frames[:-1, -_CONTEXT:]))
        self._context = frames[-1, -_CONTEXT:].copy()
        batched = np.concatenate((contexts, frames), axis=1)
        h, c = self._state
        out, h, c = vad_session().run(None, {"input": batched, "h": h, "c": c})
        self._state = (h, c)
        self._probs.append(np.asarray(out, dtype=np.float32).reshape(-1))


def speech_spans(
    probs: np.ndarray, total_samples: int, options: VadOptions = PIPELINE_VAD
) -> list[Span]:
    """Padded speech spans, in samples, from the frames' probabilities (Silero's rules
    as faster-whisper 1.2 applies them)."""
    rate = SAMPLE_RATE
    threshold = options.threshold
    low = (
        options.neg_threshold if options.neg_threshold is not None else max(threshold - 0.15, 0.01)
    )
    pad = rate * options.speech_pad_ms / 1000
    min_speech = rate * options.min_speech_duration_ms / 1000
    max_speech = rate * options.max_speech_duration_s - FRAME - 2 * pad
    min_silence = rate * options.min_silence_duration_ms / 1000
    split_silence = rate * 98 / 1000  # a silence this long is a place to split long speech

    spans: list[list[int]] = []
    triggered = False
    start = silence_from = last_split = resume_at = 0  # 0 means "none", as upstream
    for i, prob in enumerate(probs.tolist()):
        at = FRAME * i
        if prob >= threshold and silence_from:
            silence_from = 0  # the silence was a short gap: speech goes on
            if resume_at < last_split:
                resume_at = at
        if prob >= threshold and not triggered:
            triggered, start = True, at
            continue
        if triggered and at - start > max_speech:  # too long: split it
            if last_split:
                spans.append([start, last_split])
                if resume_at < last_split:
                    triggered = False
                else:
                    start = resume_at
                last_split = resume_at = silence_from = 0
            else:
                spans.append([start, at])
                last_split = resume_at = silence_from = 0
                triggered = False
                continue
        if prob < low and triggered:
            silence_from = silence_from or at
            if at - silence_from > split_silence:
                last_split = silence_from
            if at - silence_from < min_silence:
                continue
            if silence_from - start > min_speech:
                spans.append([start, silence_from])
            last_split = resume_at = silence_from = 0
            triggered = False
    if triggered and total_samples - start > min_speech:
        spans.append([start, total_samples])
    _pad(spans, pad, total_samples)
    return [(s, e) for s, e in spans]


def _pad(spans: list[list[int]], pad: float, total: int) -> None:
    """Widen each span by ``pad`` samples, or by half the gap when neighbours are close."""
    for i, span in enumerate(spans):
        if i == 0:
            span[0] = int(max(0, span[0] - pad))
        if i + 1 < len(spans):
            following = spans[i + 1]
            gap = following[0] - span[1]
            if gap < 2 * pad:
                span[1] += int(gap // 2)
                following[0] = int(max(0, following[0] - gap // 2))
            else:
                span[1] = int(min(total, span[1] + pad))
                following[0] = int(max(0, following[0] - pad))
        else:
            span[1] = int(min(total, span[1] + pad))


def detect_speech(audio: np.ndarray, options: VadOptions = PIPELINE_VAD) -> list[Span]:
    """Speech spans of audio held in memory (a chunk without a planned speech map)."""
    probs = SpeechProbabilities()
    probs.feed(audio)
    return speech_spans(probs.finish(), audio.size, options)


def pack_windows(
    spans: Sequence[Span], max_extent: float = float("inf"), max_speech: float = WINDOW_SECONDS
) -> list[list[Span]]:
    """Consecutive spans merged into windows of at most ``max_speech`` seconds of speech
    (``collect_chunks``), none reaching over more than ``max_extent`` seconds."""
    windows: list[list[Span]] = []
    current: list[Span] = []
    speech = 0
    for span in spans:
        length = span[1] - span[0]
        too_much = speech + length > max_speech * SAMPLE_RATE
        if current and (too_much or span[1] - current[0][0] > max_extent * SAMPLE_RATE):
            windows.append(current)
            current, speech = [], 0
        current.append(span)
        speech += length
    if current:
        windows.append(current)
    return windows
