"""How close a transcript is to what was said: the figures bench/fidelity.py prints and
the fidelity test bounds.

Text is compared after Whisper's English normalizer (tests/speech.py), as the field
scores transcripts. Besides the word error rate:

* deletion runs: stretches of 4 or more reference words missing from the transcript
  (a dropped phrase, which a WER averages away);
* insertions: words in the transcript that were not said;
* start error: for each segment whose first word matches a reference word, how far the
  segment's start is from that word's start; for recordings without word times, how far
  each utterance's (turn's) first segment starts from where its speech starts.
"""

from __future__ import annotations

import statistics
from collections.abc import Sequence
from dataclasses import dataclass

import jiwer

from tests.speech import normalise_text

DELETION_RUN = 4


@dataclass(frozen=True)
class Score:
    wer: float
    deletion_runs: int
    insertions: int
    start_error: float | None  # median seconds, None without reference times

    def line(self) -> str:
        error = "–" if self.start_error is None else f"{self.start_error:.2f} s"
        return (
            f"WER {100 * self.wer:.1f} %, {self.deletion_runs} deletion runs, "
            f"{self.insertions} insertions, segment start error {error}"
        )


@dataclass(frozen=True)
class TimedText:
    """A transcript's segments: (start, text), in order."""

    segments: Sequence[tuple[float, str]]


def score(
    reference: str,
    hypothesis: TimedText,
    reference_words: Sequence[tuple[str, float, float]] | None = None,
    turns: Sequence[tuple[str, float, float]] = (),
) -> Score:
    """Scores ``hypothesis`` against ``reference``; start errors need the reference's
    timed words ((word, start, end) in order) or its turns ((speaker, start, end))."""
    ref = normalise_text(reference).split()
    hyp, firsts = _words_and_segment_starts(hypothesis)
    if not ref:
        return Score(float(bool(hyp)), 0, len(hyp), None)
    out = jiwer.process_words(" ".join(ref), " ".join(hyp) or "")
    chunks = out.alignments[0]
    runs = sum(
        1 for c in chunks if c.type == "delete" and c.ref_end_idx - c.ref_start_idx >= DELETION_RUN
    )
    if reference_words is not None:
        start_error = _start_error(reference_words, hypothesis, firsts)
    else:
        start_error = _turn_start_error(turns, hypothesis)
    return Score(out.wer, runs, out.insertions, start_error)


def _turn_start_error(
    turns: Sequence[tuple[str, float, float]], hypothesis: TimedText
) -> float | None:
    """Median |start of a turn's first segment − start of the turn's speech|, over turns
    a segment starts in (from a second before the speech, which padding may reach)."""
    errors = []
    for _, start, end in turns:
        inside = [at for at, _ in hypothesis.segments if start - 1.0 <= at < end]
        if inside:
            errors.append(abs(inside[0] - start))
    return statistics.median(errors) if errors else None


def _words_and_segment_starts(text: TimedText) -> tuple[list[str], list[int | None]]:
    """The normalised words of all segments, and where each segment's words begin."""
    words: list[str] = []
    firsts: list[int | None] = []
    for _, segment in text.segments:
        mine = normalise_text(segment).split()
        firsts.append(len(words) if mine else None)
        words += mine
    return words, firsts


def _start_error(
    reference_words: Sequence[tuple[str, float, float]],
    hypothesis: TimedText,
    firsts: list[int | None],
) -> float | None:
    """Median |segment start − start of the reference word its first word matches|."""
    ref, times = [], []
    for word, start, _ in reference_words:
        for piece in normalise_text(word).split():
            ref.append(piece)
            times.append(start)
    hyp, _ = _words_and_segment_starts(hypothesis)
    if not ref or not hyp:
        return None
    matched: dict[int, int] = {}
    for chunk in jiwer.process_words(" ".join(ref), " ".join(hyp)).alignments[0]:
        if chunk.type == "equal":
            for k in range(chunk.hyp_end_idx - chunk.hyp_start_idx):
                matched[chunk.hyp_start_idx + k] = chunk.ref_start_idx + k
    errors = [
        abs(start - times[matched[first]])
        for (start, _), first in zip(hypothesis.segments, firsts, strict=True)
        if first is not None and first in matched
    ]
    return statistics.median(errors) if errors else None
