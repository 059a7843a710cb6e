"""A decoded window's words grouped into readable segments (subtitle cues).

Whisper decodes up to 30 s at a time; without timestamp tokens (as the batched
pipeline decodes, and as accurately as it) a window comes back as one long text. Its
words, timed by cross-attention alignment, are grouped here into segments a reader can
follow: one sentence or phrase each, fitting two subtitle lines of 42 characters and
at most 7 seconds, broken after a sentence's end, at a pause, or else at the last comma.
Each segment starts at its first word, so a cue appears when its words are spoken.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

LINE_CHARS = 42  # a subtitle line: the usual limit (e.g. Netflix's guidelines)
MAX_SECONDS = 7.0
PAUSE_SECONDS = 1.0  # a silence this long between words ends a phrase
_SENTENCE_ENDS = (".", "?", "!", "。", "？", "！")
_CLAUSE_ENDS = (",", ";", ":", "，", "、")


@dataclass(frozen=True)
class TimedWord:
    text: str  # as decoded, with its leading space
    start: float
    end: float
    probability: float = 1.0


def group_words(words: Sequence[TimedWord]) -> list[list[TimedWord]]:
    """Consecutive words in phrases that fit two lines and MAX_SECONDS (a single longer
    word stands alone): sentences, each too long one halved until its pieces fit."""
    phrases: list[list[TimedWord]] = []
    for sentence in _sentences(words):
        phrases.extend(_fit(sentence))
    return phrases


def phrase_text(words: Sequence[TimedWord]) -> str:
    return "".join(w.text for w in words).strip()


def _sentences(words: Sequence[TimedWord]) -> list[list[TimedWord]]:
    """Split after a sentence's end and at pauses."""
    sentences: list[list[TimedWord]] = []
    current: list[TimedWord] = []
    for word in words:
        if current and word.start - current[-1].end >= PAUSE_SECONDS:
            sentences.append(current)
            current = []
        current.append(word)
        if word.text.rstrip().endswith(_SENTENCE_ENDS):
            sentences.append(current)
            current = []
    if current:
        sentences.append(current)
    return sentences


def wrap_lines(text: str, width: int = LINE_CHARS) -> str:
    """One line, or two as even as the words allow (a cue's second line)."""
    if len(text) <= width or " " not in text:
        return text
    middle = len(text) / 2
    spaces = [i for i, char in enumerate(text) if char == " "]
    best = min(spaces, key=lambda i: (max(i, len(text) - i - 1) > width, abs(i - middle)))
    return f"{text[:best]}\n{text[best + 1 :]}"


def _fits_two_lines(text: str) -> bool:
    return all(len(line) <= LINE_CHARS for line in wrap_lines(text).split("\n"))


def _fit(words: list[TimedWord]) -> list[list[TimedWord]]:
    fits = _fits_two_lines(phrase_text(words)) and words[-1].end - words[0].start <= MAX_SECONDS
    if fits or len(words) == 1:
        return [words]
    cut = min(range(1, len(words)), key=lambda i: _cut_cost(words, i))
    return _fit(words[:cut]) + _fit(words[cut:])


def _cut_cost(words: list[TimedWord], i: int) -> float:
    """Cutting before word i: balanced halves are best, after a clause's end better still,
    so neither line is left with one word of the next clause."""
    imbalance = abs(len(phrase_text(words[:i])) - len(phrase_text(words[i:])))
    return imbalance - (30 if words[i - 1].text.rstrip().endswith(_CLAUSE_ENDS) else 0)
