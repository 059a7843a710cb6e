"""Stitching chunk results into one transcript, and rendering it in each format."""

from __future__ import annotations

import itertools
import json
import zlib
from collections import Counter
from typing import Any

from server.speakers import Diarization, label
from worker.phrases import TimedWord, group_words, phrase_text, wrap_lines

FORMATS = ("txt", "srt", "vtt", "json", "verbose_json")
MEDIA_TYPES = {
    "txt": "text/plain; charset=utf-8",
    "srt": "application/x-subrip; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
    "json": "application/json",
    "verbose_json": "application/json",
}


def merge(
    chunks: list[tuple[float, float, dict[str, Any]]],
    duration: float,
    speakers: Diarization | None = None,
) -> dict[str, Any]:
    """Segments in chunk order on the original timeline, kept inside their chunk and
    monotonic, so nothing overlaps or repeats at a boundary. `chunks` holds each chunk's
    (start, end, result) in order. With `speakers` (diarization asked for), every chunk's
    voices are clustered together and each segment and word says who spoke."""
    segments: list[dict[str, Any]] = []
    cursor = 0.0
    for start, end, result in chunks:
        for seg in sorted(result["segments"], key=lambda s: s["start"]):
            text = seg["text"].strip()
            if not text:
                continue
            seg_start = min(max(seg["start"], start, cursor), end)
            seg_end = min(max(seg["end"], seg_start), end)
            segments.append({**seg, "text": text, "start": seg_start, "end": seg_end})
            cursor = seg_end
    languages = Counter(r.get("language") for _, _, r in chunks if r.get("language"))
    merged = {
        "duration_seconds": duration,
        "language": languages.most_common(1)[0][0] if languages else None,
        "text": " ".join(s["text"] for s in segments),
        "segments": segments,
    }
    if speakers is not None:
        voices = [v for _, _, r in chunks for v in r.get("voices") or ()]
        heard = label(segments, voices, speakers)
        merged |= {"segments": heard.segments, "speakers": heard.speakers, "turns": heard.turns}
    return merged


MERGED_KEYS = ("duration_seconds", "language", "text", "segments", "speakers", "turns")
TIMINGS = {"submitted_at": "created_at", "started_at": "started_at", "finished_at": "finished_at"}


def merged_part(document: dict[str, Any]) -> dict[str, Any]:
    """What merge() produced, out of a finished document (to reuse it elsewhere)."""
    return {key: document[key] for key in MERGED_KEYS if key in document}


def document(header: Any, merged: dict[str, Any], extra: dict[str, Any]) -> dict[str, Any]:
    """The transcript as stored and served as `json`: the merge, which transcription,
    model and options produced it, and how long it took."""
    # Fixed-width times: a document's size does not depend on when it was made.
    timings = {
        name: header[column].isoformat(timespec="milliseconds") if header[column] else None
        for name, column in TIMINGS.items()
    }
    extra = {key: str(value) for key, value in extra.items()}
    head = {"id": str(header["id"]), "model": header["model"], "options": header["options"]}
    return {**head, **merged, "timings": timings, **extra}


def document_bytes(document: dict[str, Any]) -> bytes:
    """The document's serialised form: its size decides where it is stored."""
    return json.dumps(document, ensure_ascii=False, separators=(",", ":")).encode()


def render(transcript: dict[str, Any], fmt: str) -> str:
    if fmt == "txt":
        return "".join(f"{line}\n" for line in turns(transcript["segments"]))
    if fmt == "srt":
        return "\n".join(
            f"{i}\n{timestamp(start, ',')} --> {timestamp(end, ',')}\n{text}\n"
            for i, (start, end, text) in enumerate(cues(transcript["segments"]), start=1)
        )
    if fmt == "vtt":
        body = "".join(
            f"\n{timestamp(start, '.')} --> {timestamp(end, '.')}\n{text}\n"
            for start, end, text in cues(transcript["segments"], voice_spans=True)
        )
        return "WEBVTT\n" + body
    if fmt == "verbose_json":
        return json.dumps(verbose_json(transcript), ensure_ascii=False)
    raise ValueError(f"unknown format {fmt!r}")


def turns(segments: list[dict[str, Any]]) -> list[str]:
    """Plain text: a line per segment, or with speakers a line per turn ("S1: ...")."""
    if not any("speaker" in s for s in segments):
        return [s["text"] for s in segments]
    return [
        f"{speaker}: {' '.join(s['text'] for s in turn)}"
        for speaker, turn in itertools.groupby(segments, key=lambda s: s["speaker"])
    ]


def cues(
    segments: list[dict[str, Any]], voice_spans: bool = False
) -> list[tuple[float, float, str]]:
    """Subtitle cues: at most 2 lines of 42 characters and 7 s each. The engine's segments
    already fit; a longer one (another engine, an older transcript) is split between words,
    at its word times when it has them, else at times in proportion to its characters.
    A speaker goes before the text ("S1: ..."), or in a WebVTT voice span (<v S1>)."""
    result = []
    for segment in segments:
        speaker = segment.get("speaker")
        for phrase in group_words(_timed_words(segment)):
            text = phrase_text(phrase)
            if speaker is not None and not voice_spans:
                text = f"{speaker}: {text}"
            text = wrap_lines(text)
            if speaker is not None and voice_spans:
                text = f"<v {speaker}>{text}"
            result.append((phrase[0].start, phrase[-1].end, text))
    return result


def _timed_words(segment: dict[str, Any]) -> list[TimedWord]:
    text, start, end = segment["text"], segment["start"], segment["end"]
    words = segment.get("words")
    if words and " ".join(w["word"] for w in words) == " ".join(text.split()):
        return [TimedWord(f" {w['word']}", w["start"], w["end"]) for w in words]
    pieces = text.split()
    if not pieces:
        return []
    per_char = (end - start) / max(1, len(text))
    timed, at = [], 0
    for piece in pieces:
        at = text.index(piece, at)
        first = start + at * per_char
        at += len(piece)
        timed.append(TimedWord(f" {piece}", round(first, 3), round(start + at * per_char, 3)))
    return timed


def verbose_json(
    transcript: dict[str, Any], *, segments: bool = True, words: bool | None = None
) -> dict[str, Any]:
    """OpenAI's `verbose_json` transcription response, from a transcript document.

    `segments` and `words` choose what is included, as OpenAI's
    `timestamp_granularities[]` does; `words=None` includes words when the transcript
    has them (the transcription asked for word timestamps).

    What the document keeps is passed through: times, text, the language (as OpenAI
    names it: "english"), the duration, `avg_logprob` and `no_speech_prob`. What it does
    not keep is filled with neutral values (see docs/api.md):
    - `tokens`: [] (token ids stay on the worker);
    - `seek`: 0 (the decoding window's offset is not kept);
    - `temperature`: 0.0 (the faster-whisper engine decodes at temperature 0 only, with
      no fallback; not recorded per segment);
    - `avg_logprob`, `no_speech_prob`: 0.0 when the engine gave none (whisperx gives
      no `no_speech_prob`);
    - `compression_ratio`: computed from the segment's own text, as Whisper computes it
      over its 30 s decoding window (so short segments score low).
    """
    if words is None:
        words = any(s.get("words") is not None for s in transcript["segments"]) or bool(
            (transcript.get("options") or {}).get("word_timestamps")
        )
    response: dict[str, Any] = {
        "task": "transcribe",
        "language": language_name(transcript.get("language"), transcript.get("options")),
        "duration": transcript["duration_seconds"],
        "text": transcript["text"],
    }
    if segments:
        response["segments"] = [
            {
                "id": i,
                "seek": 0,
                "start": s["start"],
                "end": s["end"],
                "text": s["text"],
                "tokens": [],
                "temperature": 0.0,
                "avg_logprob": number_or_zero(s.get("avg_logprob")),
                "compression_ratio": compression_ratio(s["text"]),
                "no_speech_prob": number_or_zero(s.get("no_speech_prob")),
                **speaker_of(s),
            }
            for i, s in enumerate(transcript["segments"])
        ]
    if words:
        response["words"] = [
            {"word": w["word"], "start": w["start"], "end": w["end"], **speaker_of(w)}
            for s in transcript["segments"]
            for w in s.get("words") or ()
        ]
    return response


def diarized_json(transcript: dict[str, Any]) -> dict[str, Any]:
    """OpenAI's `diarized_json` response: the segments with their speakers."""
    return {
        "task": "transcribe",
        "duration": transcript["duration_seconds"],
        "text": transcript["text"],
        "segments": [
            {
                "type": "transcript.text.segment",
                "id": f"seg_{i}",
                "start": s["start"],
                "end": s["end"],
                "text": s["text"],
                "speaker": s.get("speaker", "S1"),
            }
            for i, s in enumerate(transcript["segments"])
        ],
    }


def speaker_of(part: dict[str, Any]) -> dict[str, str]:
    """{"speaker": ...} for a segment or word of a diarized transcript; else nothing."""
    return {"speaker": part["speaker"]} if "speaker" in part else {}


def number_or_zero(value: float | None) -> float:
    return 0.0 if value is None else float(value)


def compression_ratio(text: str) -> float:
    """Whisper's measure of repetition: above 2.4, the decoding likely looped."""
    data = text.encode()
    return len(data) / len(zlib.compress(data)) if data else 0.0


# Whisper's languages, by the ISO 639 code Whisper reports, named as OpenAI's API
# names them in verbose_json (whisper/tokenizer.py's LANGUAGES).
LANGUAGE_NAMES = {
    "en": "english", "zh": "chinese", "de": "german", "es": "spanish", "ru": "russian",
    "ko": "korean", "fr": "french", "ja": "japanese", "pt": "portuguese", "tr": "turkish",
    "pl": "polish", "ca": "catalan", "nl": "dutch", "ar": "arabic", "sv": "swedish",
    "it": "italian", "id": "indonesian", "hi": "hindi", "fi": "finnish", "vi": "vietnamese",
    "he": "hebrew", "uk": "ukrainian", "el": "greek", "ms": "malay", "cs": "czech",
    "ro": "romanian", "da": "danish", "hu": "hungarian", "ta": "tamil", "no": "norwegian",
    "th": "thai", "ur": "urdu", "hr": "croatian", "bg": "bulgarian", "lt": "lithuanian",
    "la": "latin", "mi": "maori", "ml": "malayalam", "cy": "welsh", "sk": "slovak",
    "te": "telugu", "fa": "persian", "lv": "latvian", "bn": "bengali", "sr": "serbian",
    "az": "azerbaijani", "sl": "slovenian", "kn": "kannada", "et": "estonian",
    "mk": "macedonian", "br": "breton", "eu": "basque", "is": "icelandic", "hy": "armenian",
    "ne": "nepali", "mn": "mongolian", "bs": "bosnian", "kk": "kazakh", "sq": "albanian",
    "sw": "swahili", "gl": "galician", "mr": "marathi", "pa": "punjabi", "si": "sinhala",
    "km": "khmer", "sn": "shona", "yo": "yoruba", "so": "somali", "af": "afrikaans",
    "oc": "occitan", "ka": "georgian", "be": "belarusian", "tg": "tajik", "sd": "sindhi",
    "gu": "gujarati", "am": "amharic", "yi": "yiddish", "lo": "lao", "uz": "uzbek",
    "fo": "faroese", "ht": "haitian creole", "ps": "pashto", "tk": "turkmen",
    "nn": "nynorsk", "mt": "maltese", "sa": "sanskrit", "lb": "luxembourgish",
    "my": "myanmar", "bo": "tibetan", "tl": "tagalog", "mg": "malagasy", "as": "assamese",
    "tt": "tatar", "haw": "hawaiian", "ln": "lingala", "ha": "hausa", "ba": "bashkir",
    "jw": "javanese", "su": "sundanese", "yue": "cantonese",
}  # fmt: skip


def language_name(code: str | None, options: dict[str, Any] | None = None) -> str:
    """The language as OpenAI names it ("english"); the code itself when Whisper does
    not know it; the requested language, or "unknown", when nothing was heard."""
    code = code or (options or {}).get("language")
    if not code:
        return "unknown"
    return LANGUAGE_NAMES.get(code, code)


def timestamp(seconds: float, decimal_mark: str) -> str:
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal_mark}{millis:03d}"
