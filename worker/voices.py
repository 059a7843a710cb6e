"""Speaker embeddings on the worker, in numpy: Resemblyzer's voice encoder without torch.

Resemblyzer (MIT, https://github.com/resemble-ai/Resemblyzer) ships its weights in its
wheel as ``pretrained.pt``, a state dict in torch's legacy (non-zip) format. We read that
file with a restricted unpickler and run the network ourselves, so the worker needs
only ``pip install --no-deps resemblyzer==0.1.4`` (no torch, no librosa).

The computation is Resemblyzer's own (checked against ``VoiceEncoder.embed_utterance``
with librosa 0.11 and torch 2.13 on 111 windows of real speech: cosine 1.000000, the
same numbers to float32 rounding; tests/unit/test_voices.py keeps two of them):

* a 40-channel mel power spectrogram as librosa computes it (25 ms Hann frames every
  10 ms, Slaney mel scale and norm, ``center=True`` with the zero padding that
  librosa >= 0.10 uses by default); a window of ``n`` samples gives ``n // 160`` frames,
  as Resemblyzer's partial utterances have (a 1.6 s window: 160 frames);
* a 3-layer LSTM (40 -> 256), then Linear(256 -> 256) on the last layer's final hidden
  state, ReLU and L2 normalisation.
"""

from __future__ import annotations

import base64
import importlib.util
import io
import pickle
import threading
from collections import OrderedDict
from pathlib import Path
from typing import Any

import numpy as np
from threadpoolctl import threadpool_limits

from worker.audio import SAMPLE_RATE

INSTALL_HINT = "pip install --no-deps resemblyzer==0.1.4"  # --no-deps keeps torch out
N_FFT = 400  # 25 ms
HOP = 160  # 10 ms
N_MELS = 40
HIDDEN = 256
LAYERS = 3
TARGET_DBFS = -30.0  # Resemblyzer's audio_norm_target_dBFS

_LEGACY_MAGIC = 0x1950A86A20F9469CFC6C
_LEGACY_PROTOCOL = 1001
_STORAGE_DTYPES = {
    "FloatStorage": "<f4",
    "DoubleStorage": "<f8",
    "HalfStorage": "<f2",
    "LongStorage": "<i8",
    "IntStorage": "<i4",
    "ShortStorage": "<i2",
    "CharStorage": "i1",
    "ByteStorage": "u1",
    "BoolStorage": "?",
}


class VoiceEncoderMissing(RuntimeError):
    """Resemblyzer's weights are not installed."""


def weights_path() -> Path:
    """``pretrained.pt`` of the installed resemblyzer package, found without importing it
    (its ``__init__`` imports torch)."""
    spec = importlib.util.find_spec("resemblyzer")
    for folder in (spec.submodule_search_locations or []) if spec else []:
        path = Path(folder) / "pretrained.pt"
        if path.is_file():
            return path
    raise VoiceEncoderMissing(
        "the voice encoder's weights (resemblyzer's pretrained.pt) are not installed: "
        f"install them with `{INSTALL_HINT}` (--no-deps keeps torch out of the worker)"
    )


# --- torch's legacy serialization, without torch -----------------------------------


class _Storage:
    def __init__(self, dtype: str, key: str) -> None:
        self.dtype, self.key = dtype, key


class _Tensor:
    """A tensor whose storage bytes come after the pickle: resolved once they are read."""

    def __init__(self, storage: _Storage, offset: int, size: tuple, stride: tuple) -> None:
        self.storage, self.offset, self.size, self.stride = storage, offset, size, stride

    def resolve(self, storages: dict[str, np.ndarray]) -> np.ndarray:
        data = storages[self.storage.key][self.offset :]
        strides = tuple(s * data.itemsize for s in self.stride)
        view = np.lib.stride_tricks.as_strided(data, self.size, strides, writeable=False)
        return np.array(view)


def _rebuild_tensor(storage: _Storage, offset: int, size: tuple, stride: tuple, *_: Any) -> Any:
    return _Tensor(storage, offset, tuple(size), tuple(stride))


class _Unpickler(pickle.Unpickler):
    """Builds tensors, storages and OrderedDicts only: a pickle cannot run other code."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) == ("collections", "OrderedDict"):
            return OrderedDict
        if module == "torch._utils" and name in ("_rebuild_tensor_v2", "_rebuild_tensor"):
            return _rebuild_tensor
        if module == "torch" and name in _STORAGE_DTYPES:
            return _STORAGE_DTYPES[name]
        raise pickle.UnpicklingError(f"refusing {module}.{name} in a weights file")

    def __init__(self, file: io.BytesIO) -> None:
        super().__init__(file)
        self.dtypes: dict[str, str] = {}  # storage key -> dtype

    def persistent_load(self, pid: Any) -> _Storage:
        # ('storage', storage type, key, location, element count, view metadata)
        if pid[0] != "storage" or pid[5] is not None:
            raise pickle.UnpicklingError(f"unsupported persistent id {pid[:2]}")
        self.dtypes[pid[2]] = pid[1]
        return _Storage(pid[1], pid[2])


def _resolve(obj: Any, storages: dict[str, np.ndarray]) -> Any:
    if isinstance(obj, _Tensor):
        return obj.resolve(storages)
    if isinstance(obj, dict):
        return type(obj)((k, _resolve(v, storages)) for k, v in obj.items())
    if isinstance(obj, list | tuple):
        return type(obj)(_resolve(v, storages) for v in obj)
    return obj


def load_legacy_torch(path: Path) -> Any:
    """The object in a file written by torch's legacy ``torch.save``, tensors as ndarrays."""
    f = io.BytesIO(path.read_bytes())
    if _Unpickler(f).load() != _LEGACY_MAGIC or _Unpickler(f).load() != _LEGACY_PROTOCOL:
        raise ValueError(f"{path} is not in torch's legacy serialization format")
    info = _Unpickler(f).load()
    if not info.get("little_endian"):
        raise ValueError(f"{path} was written on a big-endian machine")
    unpickler = _Unpickler(f)
    obj = unpickler.load()
    storages: dict[str, np.ndarray] = {}
    for key in _Unpickler(f).load():
        count = int.from_bytes(f.read(8), "little")
        dtype = np.dtype(unpickler.dtypes[key])
        storages[key] = np.frombuffer(f.read(count * dtype.itemsize), dtype)
    return _resolve(obj, storages)


def load_weights(path: Path | None = None) -> dict[str, np.ndarray]:
    """The encoder's state dict (name -> float32 array) from Resemblyzer's checkpoint."""
    state = load_legacy_torch(path or weights_path())["model_state"]
    return {name: np.asarray(value, np.float32) for name, value in state.items()}


# --- the features ------------------------------------------------------------------


def _hz_to_mel(hz: np.ndarray) -> np.ndarray:
    # Slaney's scale: linear below 1 kHz, logarithmic above (librosa's htk=False).
    hz = np.asarray(hz, np.float64)
    step = np.log(6.4) / 27.0
    return np.where(hz < 1000, hz * 3 / 200, 15 + np.log(np.maximum(hz, 1e-10) / 1000) / step)


def _mel_to_hz(mel: np.ndarray) -> np.ndarray:
    step = np.log(6.4) / 27.0
    return np.where(mel < 15, mel * 200 / 3, 1000 * np.exp(step * (mel - 15)))


def mel_filters() -> np.ndarray:
    """librosa.filters.mel(sr=16000, n_fft=400, n_mels=40): shape (201, 40), float32."""
    fft_hz = np.fft.rfftfreq(N_FFT, 1 / SAMPLE_RATE)
    edges = _mel_to_hz(np.linspace(_hz_to_mel(0.0), _hz_to_mel(SAMPLE_RATE / 2), N_MELS + 2))
    ramps = edges[:, None] - fft_hz[None, :]
    widths = np.diff(edges)
    lower = -ramps[:-2] / widths[:-1, None]
    upper = ramps[2:] / widths[1:, None]
    weights = np.maximum(0, np.minimum(lower, upper)) * (2 / (edges[2:] - edges[:-2]))[:, None]
    return weights.T.astype(np.float32)


_WINDOW = (0.5 - 0.5 * np.cos(2 * np.pi * np.arange(N_FFT) / N_FFT)).astype(np.float32)


def mel_frames(windows: np.ndarray, filters: np.ndarray) -> np.ndarray:
    """Mel power spectrograms of equal-length windows (batch, samples) -> (batch, frames,
    40), as librosa's melspectrogram (center=True, zero padding) less its last frame."""
    frames = windows.shape[1] // HOP
    padded = np.pad(windows, ((0, 0), (N_FFT // 2, N_FFT // 2)))
    strided = np.lib.stride_tricks.sliding_window_view(padded, N_FFT, axis=1)[:, ::HOP]
    spectrum = np.fft.rfft(strided[:, :frames] * _WINDOW, axis=-1)
    power = (spectrum.real**2 + spectrum.imag**2).astype(np.float32)
    return power @ filters


def normalize_volume(audio: np.ndarray) -> np.ndarray:
    """Quiet audio raised to -30 dBFS RMS, as Resemblyzer's preprocessing does (never lowered)."""
    gain = _gain(audio)
    return audio if gain == 1 else (audio * gain).astype(np.float32)


def _gain(samples: np.ndarray) -> float:
    rms = float(np.sqrt(np.mean(np.square(samples, dtype=np.float64)))) if samples.size else 0.0
    if rms == 0 or 20 * np.log10(rms) >= TARGET_DBFS:
        return 1.0
    return 10 ** (TARGET_DBFS / 20) / rms


def _samples(audio: np.ndarray, audio_start: float, start: float, end: float) -> np.ndarray:
    first = max(0, round((start - audio_start) * SAMPLE_RATE))
    return audio[first : max(first, round((end - audio_start) * SAMPLE_RATE))]


# --- the network ---------------------------------------------------------------------


class VoiceEncoder:
    """Resemblyzer's network in numpy. The weights are read once and never change, so one
    instance serves any number of threads."""

    def __init__(self, path: Path | None = None) -> None:
        state = load_weights(path)
        self.filters = mel_filters()
        # Gates reordered from torch's (i, f, g, o) to (i, f, o, g), and the sigmoid gates'
        # rows halved: then one tanh over all gates gives tanh(x) for g and tanh(x / 2)
        # for the others, and sigmoid(x) = (1 + tanh(x / 2)) / 2.
        order = np.r_[0:512, 768:1024, 512:768]
        scale = np.r_[np.full(768, 0.5), np.ones(256)].astype(np.float32)
        self.layers = []
        for k in range(LAYERS):
            w_ih = state[f"lstm.weight_ih_l{k}"][order] * scale[:, None]
            w_hh = state[f"lstm.weight_hh_l{k}"][order] * scale[:, None]
            bias = (state[f"lstm.bias_ih_l{k}"] + state[f"lstm.bias_hh_l{k}"])[order] * scale
            self.layers.append((np.ascontiguousarray(w_ih.T), np.ascontiguousarray(w_hh.T), bias))
        self.linear = (np.ascontiguousarray(state["linear.weight"].T), state["linear.bias"])

    def embed(self, windows: list[np.ndarray]) -> np.ndarray:
        """One L2-normalised embedding (n, 256) per 16 kHz mono window, each window on its
        own, at its own volume (as ``embed_utterance`` of a 1.6 s window: the same numbers)."""
        mels = [np.zeros((0, N_MELS), np.float32)] * len(windows)
        for _, members in _groups([len(w) for w in windows]).items():
            batch = np.stack([np.asarray(windows[i], np.float32) for i in members])
            for i, mel in zip(members, mel_frames(batch, self.filters), strict=True):
                mels[i] = mel
        return self.embed_frames(mels)

    def embed_frames(self, mels: list[np.ndarray]) -> np.ndarray:
        """One embedding per mel spectrogram (frames, 40), all in one batch: a shorter one
        starts later (zeros before it, and its state held at zero until it starts), so
        every one ends on the last step, exactly as if run alone."""
        lengths = np.array([len(m) for m in mels])
        if not len(mels):
            return np.zeros((0, HIDDEN), np.float32)
        if lengths.min() == 0:
            raise ValueError("a window shorter than 10 ms cannot be embedded")
        steps = int(lengths.max())
        padded = np.zeros((len(mels), steps, N_MELS), np.float32)
        for i, mel in enumerate(mels):
            padded[i, steps - len(mel) :] = mel
        # Small matrices, one step after another: BLAS threads only wait on each other, and
        # beside the engine's threads and other workers they made it 5x slower (measured).
        with threadpool_limits(limits=1, user_api="blas"):
            return self._forward(padded, steps - lengths)

    def _forward(self, mels: np.ndarray, starts: np.ndarray) -> np.ndarray:
        sequence = mels.transpose(1, 0, 2)  # time major: (frames, batch, 40)
        for k, (w_ih, w_hh, bias) in enumerate(self.layers):
            sequence = _lstm_layer(sequence, starts, w_ih, w_hh, bias, keep=k < LAYERS - 1)
        w, b = self.linear
        raw = np.maximum(sequence @ w + b, 0)
        with np.errstate(invalid="ignore"):  # an all-zero row stays NaN: embed_speech drops it
            return raw / np.linalg.norm(raw, axis=1, keepdims=True)


def _groups(lengths: list[int]) -> dict[int, list[int]]:
    groups: dict[int, list[int]] = {}
    for i, length in enumerate(lengths):
        groups.setdefault(length, []).append(i)
    return groups


def _lstm_layer(
    x: np.ndarray,
    starts: np.ndarray,
    w_ih: np.ndarray,
    w_hh: np.ndarray,
    bias: np.ndarray,
    *,
    keep: bool,
) -> np.ndarray:
    """One LSTM layer over (frames, batch, in): all hidden states when ``keep``, else the
    last one; row i's state stays zero before step starts[i]. The input projection of
    all frames is one matmul; each step adds h @ w_hh."""
    steps, batch, _ = x.shape
    projected = (x.reshape(steps * batch, -1) @ w_ih + bias).reshape(steps, batch, -1)
    h = np.zeros((batch, HIDDEN), np.float32)
    c = np.zeros((batch, HIDDEN), np.float32)
    hs = np.empty((steps, batch, HIDDEN), np.float32) if keep else None
    gates = np.empty((batch, 4 * HIDDEN), np.float32)
    for t in range(steps):
        np.matmul(h, w_hh, out=gates)
        gates += projected[t]
        np.tanh(gates, out=gates)
        sig = gates[:, : 3 * HIDDEN]
        sig *= 0.5
        sig += 0.5
        c *= sig[:, HIDDEN : 2 * HIDDEN]
        c += sig[:, :HIDDEN] * gates[:, 3 * HIDDEN :]
        h = sig[:, 2 * HIDDEN :] * np.tanh(c)
        waiting = starts > t
        if waiting.any():
            h[waiting] = 0
            c[waiting] = 0
        if hs is not None:
            hs[t] = h
    return hs if hs is not None else h


_shared: VoiceEncoder | None = None
_shared_lock = threading.Lock()


def encoder() -> VoiceEncoder:
    """The process's encoder, loaded on first use (about 0.1 s, 17 MB)."""
    global _shared
    with _shared_lock:
        if _shared is None:
            _shared = VoiceEncoder()
        return _shared


# --- windows of speech ---------------------------------------------------------------


def speech_windows(
    speech: list[tuple[float, float]], window: float = 1.6, shortest: float = 0.5
) -> list[tuple[float, float]]:
    """Windows covering each speech region side by side, ``window`` long, the last one
    ending at the region's end (overlapping its neighbour); a region shorter than
    ``window`` (but at least ``shortest``) is one window of its own length, a shorter one
    gets none. Side by side, not overlapping by half as Resemblyzer's partials do: the
    encoder's time is in proportion to the windows, and half-overlapping ones labelled the
    test conversations and the evaluation set no better (bench/RESULTS.md)."""
    out: list[tuple[float, float]] = []
    eps = 1e-6
    for start, end in speech:
        length = end - start
        if length + eps < shortest:
            continue
        if length < window + eps:
            out.append((start, end))
            continue
        count = int(length / window + eps)
        out += [
            (round(start + i * window, 6), round(start + (i + 1) * window, 6)) for i in range(count)
        ]
        if out[-1][1] < end - eps:
            out.append((round(end - window, 6), end))
    return out


ChunkSpeech = tuple[np.ndarray, float, list[tuple[float, float]]]  # audio, its start, speech


def embed_speech(chunks: list[ChunkSpeech]) -> list[list[tuple[float, float, np.ndarray]]]:
    """For each chunk (``audio`` starting at ``audio_start`` seconds, and its speech in
    absolute seconds), the ``speech_windows`` of its speech with their embeddings. The
    windows of all the chunks go through the network in one batch (bigger matrices: about
    a fifth less time per window for a batch of 8 chunks than for one).

    As Resemblyzer does with the partials of an utterance (and as its model was trained),
    the mel spectrogram is computed once over the whole audio and each window takes its
    frames from it, so the frames at a window's edges see the audio around the window, not
    zeros (measured: a window cut out on its own is at cosine 0.96..1 of its partial in
    context). Window starts are thereby rounded to the 10 ms frame grid.

    Each window's volume is normalised on its own (``normalize_volume``'s gain, applied as
    its square to the power spectrogram). Measured on tests/realspeech.py's full set with
    levels varied by 0..-25 dB, same/different-speaker AUC: per window 0.998-0.999, once
    over the chunk's speech 0.994-0.998, none 0.978-0.998. A level is no cue to a voice
    (the model never saw it: its training audio was normalised), only noise in it.
    """
    windows = [_window_mels(*chunk) for chunk in chunks]
    mels = [mel for chunk in windows for _, mel in chunk]
    vectors = iter(encoder().embed_frames(mels) if mels else [])
    heard = []
    for chunk in windows:
        embedded = [(span, next(vectors)) for span, _ in chunk]
        # A window the network has nothing to say about (all zero after the ReLU) has no
        # direction to compare: it is left out, as too short a window is.
        heard.append([(s, e, v) for (s, e), v in embedded if np.isfinite(v).all()])
    return heard


def _window_mels(
    audio: np.ndarray, audio_start: float, speech: list[tuple[float, float]]
) -> list[tuple[tuple[float, float], np.ndarray]]:
    """Each speech window with its frames of the chunk's mel spectrogram, at its volume."""
    mel = mel_frames(np.asarray(audio, np.float32)[None], encoder().filters)[0]
    out = []
    for start, end in speech_windows(speech):
        first = max(0, round((start - audio_start) * SAMPLE_RATE / HOP))
        frames = mel[first : first + round((end - start) * SAMPLE_RATE / HOP)]
        if len(frames):
            gain = np.float32(_gain(_samples(audio, audio_start, start, end)) ** 2)
            out.append(((start, end), frames * gain))
    return out


def embed_clip(audio: np.ndarray) -> np.ndarray:
    """One voice for a whole clip (a known speaker's reference): the mean of its windows'
    embeddings, normalised, as Resemblyzer's ``embed_utterance`` averages its partials."""
    seconds = len(audio) / SAMPLE_RATE
    [windows] = embed_speech([(audio, 0.0, [(0.0, seconds)])])
    mean = np.mean([v for _, _, v in windows], axis=0)
    return mean / np.linalg.norm(mean)


# --- on the wire ---------------------------------------------------------------------


def pack(embedding: np.ndarray) -> str:
    """Base64 of the float16 little-endian values: 256 dimensions -> 684 characters (the
    board reads them with server/speakers.py `unpack`)."""
    return base64.b64encode(np.asarray(embedding, "<f2").tobytes()).decode("ascii")
