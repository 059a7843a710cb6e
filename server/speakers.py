"""Who said what: the voices of every chunk clustered once per file, at the merge.

Each transcribe job returns speaker embeddings of its chunk's speech (protocol `Voice`:
windows of about 1.6 s). A label made per chunk would not line up across chunks, so the
board clusters all of a transcription's voices together (agglomerative, average linkage
on cosine distance, as pyannote clusters a file's embeddings in one global pass), names
the clusters S1, S2, ... in order of first speech, and gives every word the label of the
voice nearest it in time. A segment whose words change speaker is split there.
"""

from __future__ import annotations

import base64
from dataclasses import dataclass
from typing import Any

import numpy as np
from scipy.cluster.hierarchy import fcluster, linkage

# Average cosine distance below which two groups of voices are one speaker: tuned on the
# real-voice conversations and the evaluation set of tests/realspeech.py (bench/
# speakers.py measures it). The best values there span only 0.485-0.49: this encoder
# puts some pairs of voices (two podcast hosts) closer than one voice recorded in two
# rooms, so no threshold fits every file.
SAME_SPEAKER_DISTANCE = 0.4875
# A cluster of windows adding up to less than this is not a speaker of its own but stray
# windows (laughter, noise, a word across a change of speaker): they join the nearest one.
SMALLEST_SPEAKER_SECONDS = 2.5
# A speaker's pause up to this long stays inside the turn (a breath, a word's gap).
PAUSE_IN_TURN = 1.0
# A shorter stretch of another voice inside one speaker's talk is taken for that speaker.
SHORTEST_TURN_SECONDS = 1.0
# A voice this close (cosine similarity of the cluster's mean to a known speaker's
# reference) is that speaker: tuned like SAME_SPEAKER_DISTANCE.
KNOWN_SPEAKER_SIMILARITY = 0.7


@dataclass(frozen=True)
class Diarization:
    """What the user asked: the number of speakers (all None: found by the threshold) and
    the voices of known speakers, by name."""

    num: int | None = None
    min: int | None = None
    max: int | None = None
    known: tuple[tuple[str, np.ndarray], ...] = ()

    @classmethod
    def from_options(cls, options: dict[str, Any]) -> Diarization | None:
        """None when the transcription did not ask for speakers."""
        if not options.get("diarize"):
            return None
        known = tuple(
            (k["name"], _unit(unpack(k["embedding"]))) for k in options.get("known_speakers") or ()
        )
        return cls(
            options.get("num_speakers"),
            options.get("min_speakers"),
            options.get("max_speakers"),
            known,
        )


def unpack(embedding: str) -> np.ndarray:
    """A `Voice.embedding` off the wire: float16 little-endian, base64."""
    return np.frombuffer(base64.b64decode(embedding), dtype="<f2").astype(np.float32)


@dataclass(frozen=True)
class Speakers:
    """Who spoke when: the labelled segments, the turns (each a stretch of one voice,
    from the voice windows: who spoke when, whether or not words were heard), and the
    speakers in order of first speech with their seconds of speech."""

    segments: list[dict[str, Any]]
    turns: list[dict[str, Any]]
    speakers: list[dict[str, Any]]


def label(
    segments: list[dict[str, Any]], voices: list[dict[str, Any]], asked: Diarization
) -> Speakers:
    """Clusters the voices of every chunk together and labels the segments with them:
    S1, S2, ... in order of first speech (a known speaker by name); a segment is split
    where its words change speaker."""
    if not voices:
        return Speakers(segments, [], [])
    voices = sorted(voices, key=lambda v: v["start"] + v["end"])
    embeddings = np.stack([unpack(v["embedding"]) for v in voices])
    spans = np.array([(v["start"], v["end"]) for v in voices])
    clusters = cluster(embeddings, spans[:, 1] - spans[:, 0], asked)
    names = _names(clusters, embeddings, asked.known)
    labels = _smoothed(spans, [names[int(c)] for c in clusters])
    turns = _turns(spans, labels)
    times = spans.mean(axis=1)
    labelled = [piece for seg in segments for piece in _split(seg, times, labels)]
    seconds: dict[str, float] = {}
    for turn in turns:
        seconds[turn["speaker"]] = seconds.get(turn["speaker"], 0.0) + turn["end"] - turn["start"]
    speakers = [{"label": name, "seconds": round(total, 3)} for name, total in seconds.items()]
    return Speakers(labelled, turns, speakers)


def _names(
    clusters: np.ndarray, embeddings: np.ndarray, known: tuple[tuple[str, np.ndarray], ...]
) -> dict[int, str]:
    """Known speakers by name, the others S1, S2, ... in order of first speech."""
    names = _known_names(clusters, embeddings, known)
    unknown = 0
    for c in clusters:  # in time order
        if int(c) not in names:
            unknown += 1
            names[int(c)] = f"S{unknown}"
    return names


def _smoothed(spans: np.ndarray, labels: list[str]) -> list[str]:
    """A blip (a run of windows shorter than SHORTEST_TURN_SECONDS) inside one speaker's
    talk, with that speaker close on both sides, is that speaker: no one says half a word
    in the middle of someone else's sentence, but a window can sound off. The shortest
    blip goes first, so that of two blips side by side the likelier one stays."""
    labels = list(labels)
    while blips := _blips(spans, labels):
        _, run, label = min(blips)
        for i in run:
            labels[i] = label
    return labels


def _blips(spans: np.ndarray, labels: list[str]) -> list[tuple[float, list[int], str]]:
    """(seconds, windows, the label around it) of every blip."""
    runs: list[list[int]] = []  # window indices, one label each, in time order
    for i, label in enumerate(labels):
        if runs and labels[runs[-1][-1]] == label:
            runs[-1].append(i)
        else:
            runs.append([i])
    blips = []
    for before, run, after in zip(runs, runs[1:], runs[2:], strict=False):
        seconds = spans[run[-1], 1] - spans[run[0], 0]
        near = max(spans[run[0], 0] - spans[before[-1], 1], spans[after[0], 0] - spans[run[-1], 1])
        if seconds < SHORTEST_TURN_SECONDS and near < 2 * PAUSE_IN_TURN:
            if labels[before[0]] == labels[after[0]]:
                blips.append((seconds, run, labels[before[0]]))
    return blips


def _turns(spans: np.ndarray, labels: list[str]) -> list[dict[str, Any]]:
    """Consecutive windows of one voice joined, over its own short pauses; where two
    voices' windows overlap, the change is halfway through the overlap."""
    turns: list[dict[str, Any]] = []
    for (start, end), speaker in zip(spans.tolist(), labels, strict=True):
        last = turns[-1] if turns else None
        if last is not None and last["speaker"] == speaker and start <= last["end"] + PAUSE_IN_TURN:
            last["end"] = round(max(last["end"], end), 3)
            continue
        if last is not None and start < last["end"]:
            start = last["end"] = round((start + last["end"]) / 2, 3)
        turns.append({"speaker": speaker, "start": round(start, 3), "end": round(end, 3)})
    return turns


def cluster(embeddings: np.ndarray, durations: np.ndarray, counts: Diarization) -> np.ndarray:
    """A cluster id per voice: the count given, else clusters closer than the threshold,
    kept between min and max."""
    n = len(embeddings)
    if n == 1:
        return np.zeros(1, dtype=int)
    tree = linkage(embeddings, method="average", metric="cosine")
    if counts.num is not None:
        return fcluster(tree, t=min(counts.num, n), criterion="maxclust")
    found = fcluster(tree, t=SAME_SPEAKER_DISTANCE, criterion="distance")
    found = _absorb_small(found, embeddings, durations, keep_at_least=counts.min or 1)
    wanted = min(max(len(set(found)), counts.min or 1), counts.max or n, n)
    if wanted != len(set(found)):
        return fcluster(tree, t=wanted, criterion="maxclust")
    return found


def _absorb_small(
    found: np.ndarray, embeddings: np.ndarray, durations: np.ndarray, keep_at_least: int
) -> np.ndarray:
    """Clusters with too little speech join the nearest one with enough."""
    ids = np.unique(found)
    seconds = {c: durations[found == c].sum() for c in ids}
    big = [c for c in ids if seconds[c] >= SMALLEST_SPEAKER_SECONDS]
    if not big or len(big) < keep_at_least:
        return found
    centroids = np.stack([_unit(embeddings[found == c].mean(axis=0)) for c in big])
    result = found.copy()
    for i in np.flatnonzero(~np.isin(found, big)):
        result[i] = big[int(np.argmax(centroids @ embeddings[i]))]
    return result


def _known_names(
    clusters: np.ndarray, embeddings: np.ndarray, known: tuple[tuple[str, np.ndarray], ...]
) -> dict[int, str]:
    """Each cluster whose voice matches a known speaker's reference, by that name. A name
    may take several clusters: one person recorded in two rooms can cluster apart, and
    their reference then brings them together."""
    if not known:
        return {}
    references = np.stack([vector for _, vector in known])
    names: dict[int, str] = {}
    for c in np.unique(clusters):
        similarity = references @ _unit(embeddings[clusters == c].mean(axis=0))
        if similarity.max() >= KNOWN_SPEAKER_SIMILARITY:
            names[int(c)] = known[int(similarity.argmax())][0]
    return names


def _unit(vector: np.ndarray) -> np.ndarray:
    return vector / (np.linalg.norm(vector) or 1.0)


def _speaker_at(t: float, times: np.ndarray, labels: list[str]) -> str:
    """The label of the voice window centred nearest `t`."""
    i = int(np.searchsorted(times, t))
    if i == len(times) or (i > 0 and t - times[i - 1] <= times[i] - t):
        i -= 1
    return labels[i]


def _split(segment: dict[str, Any], times: np.ndarray, labels: list[str]) -> list[dict[str, Any]]:
    """The segment with its speaker; with words, one piece per run of one speaker."""
    words = segment.get("words")
    if not words:
        speaker = _speaker_at((segment["start"] + segment["end"]) / 2, times, labels)
        return [{**segment, "speaker": speaker}]
    runs: list[list[dict[str, Any]]] = []
    for word in words:
        speaker = _speaker_at((word["start"] + word["end"]) / 2, times, labels)
        word = {**word, "speaker": speaker}
        if runs and runs[-1][-1]["speaker"] == speaker:
            runs[-1].append(word)
        else:
            runs.append([word])
    if len(runs) == 1:
        return [{**segment, "words": runs[0], "speaker": runs[0][0]["speaker"]}]
    return [
        {
            **segment,
            "start": run[0]["start"] if i else segment["start"],
            "end": run[-1]["end"] if i < len(runs) - 1 else segment["end"],
            "text": " ".join(w["word"] for w in run),
            "words": run,
            "speaker": run[0]["speaker"],
        }
        for i, run in enumerate(runs)
    ]
