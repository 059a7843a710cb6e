"""Readable segments and subtitle cues from timed words (pure)."""

from __future__ import annotations

from hypothesis import given, settings
from hypothesis import strategies as st

from server.transcripts import cues
from worker.phrases import MAX_SECONDS, TimedWord, group_words, phrase_text, wrap_lines


def timed(text: str, start: float = 0.0, per_word: float = 0.4) -> list[TimedWord]:
    return [
        TimedWord(f" {w}", round(start + i * per_word, 3), round(start + (i + 1) * per_word, 3))
        for i, w in enumerate(text.split())
    ]


def test_sentences_become_segments():
    words = timed("The keeper lit the lamp. Ships could see it. Rocks were near.")
    assert [phrase_text(p) for p in group_words(words)] == [
        "The keeper lit the lamp.",
        "Ships could see it.",
        "Rocks were near.",
    ]


def test_a_pause_ends_a_phrase():
    words = timed("and then") + timed("after a while", start=5.0)
    assert [phrase_text(p) for p in group_words(words)] == ["and then", "after a while"]


def test_a_long_sentence_is_halved_at_its_clause():
    text = (
        "When the sun finally came out after three long days of rain, children ran into "
        "the parks and people opened their windows to let in the fresh air"
    )
    phrases = [phrase_text(p) for p in group_words(timed(text, per_word=0.25))]
    assert phrases[0].endswith("rain,")
    assert all(len(line) <= 42 for p in phrases for line in wrap_lines(p).split("\n"))


@settings(max_examples=200, deadline=None)
@given(
    st.lists(st.text("abcdefghij", min_size=1, max_size=12), min_size=1, max_size=80),
    st.floats(0.05, 1.5),
)
def test_every_word_once_in_order_within_the_limits(words, per_word):
    timed_words = timed(" ".join(words), per_word=per_word)
    phrases = group_words(timed_words)
    assert [w for p in phrases for w in p] == timed_words
    for phrase in phrases:
        if len(phrase) > 1:
            lines = wrap_lines(phrase_text(phrase)).split("\n")
            assert len(lines) <= 2 and all(len(line) <= 42 for line in lines)
            assert phrase[-1].end - phrase[0].start <= MAX_SECONDS + 1e-9


def test_cues_of_a_long_segment_without_words_split_in_proportion():
    text = " ".join(["word"] * 60)  # 299 characters over 30 s
    [*parts] = cues([{"start": 10.0, "end": 40.0, "text": text}])
    assert len(parts) >= 5
    assert parts[0][0] == 10.0 and abs(parts[-1][1] - 40.0) < 0.2
    for start, end, lines in parts:
        assert end - start <= MAX_SECONDS
        assert all(len(line) <= 42 for line in lines.split("\n"))
        assert lines.count("\n") <= 1


def test_cues_start_at_their_first_word():
    words = [
        {"word": w.text.strip(), "start": w.start, "end": w.end}
        for w in timed("one two three four five six seven eight nine ten " * 3, start=3.0)
    ]
    text = " ".join(w["word"] for w in words)
    parts = cues([{"start": 2.0, "end": words[-1]["end"], "text": text, "words": words}])
    starts = {w["start"] for w in words}
    assert all(start in starts for start, _, _ in parts)


def test_a_phrase_that_two_lines_cannot_hold_is_split():
    # 84 characters, but no space near enough the middle for two lines of 42.
    text = "is available to take your call at the moment Please hold while we try to connect you"
    phrases = [phrase_text(p) for p in group_words(timed(text, per_word=0.2))]
    assert len(phrases) == 2 and " ".join(phrases) == text


def test_wrap_lines_balances_two_lines():
    assert wrap_lines("short line") == "short line"
    top, bottom = wrap_lines("Ships far out at sea could see the light and knew the rocks").split(
        "\n"
    )
    assert len(top) <= 42 and len(bottom) <= 42 and abs(len(top) - len(bottom)) < 12
