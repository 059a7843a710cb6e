"""Stitching chunk results into one transcript, and rendering it in each format."""

from __future__ import annotations

import json
from collections import Counter
from typing import Any

FORMATS = ("txt", "srt", "vtt", "json")
MEDIA_TYPES = {
    "txt": "text/plain; charset=utf-8",
    "srt": "application/x-subrip; charset=utf-8",
    "vtt": "text/vtt; charset=utf-8",
    "json": "application/json",
}


def merge(chunks: list[tuple[float, float, dict[str, Any]]], duration: float) -> dict[str, Any]:
    """Segments in chunk order on the original timeline, kept inside their chunk and
    monotonic, so nothing overlaps or repeats at a boundary. `chunks` holds each chunk's
    (start, end, result) in order."""
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
    return {
        "duration_seconds": duration,
        "language": languages.most_common(1)[0][0] if languages else None,
        "text": " ".join(s["text"] for s in segments),
        "segments": segments,
    }


MERGED_KEYS = ("duration_seconds", "language", "text", "segments")
TIMINGS = {"submitted_at": "created_at", "started_at": "started_at", "finished_at": "finished_at"}


def merged_part(document: dict[str, Any]) -> dict[str, Any]:
    """What merge() produced, out of a finished document (to reuse it elsewhere)."""
    return {key: document[key] for key in MERGED_KEYS}


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
        return "".join(f"{s['text']}\n" for s in transcript["segments"])
    if fmt == "srt":
        return "\n".join(
            f"{i}\n{timestamp(s['start'], ',')} --> {timestamp(s['end'], ',')}\n{s['text']}\n"
            for i, s in enumerate(transcript["segments"], start=1)
        )
    if fmt == "vtt":
        cues = "".join(
            f"\n{timestamp(s['start'], '.')} --> {timestamp(s['end'], '.')}\n{s['text']}\n"
            for s in transcript["segments"]
        )
        return "WEBVTT\n" + cues
    raise ValueError(f"unknown format {fmt!r}")


def timestamp(seconds: float, decimal_mark: str) -> str:
    millis = round(seconds * 1000)
    hours, millis = divmod(millis, 3_600_000)
    minutes, millis = divmod(millis, 60_000)
    secs, millis = divmod(millis, 1000)
    return f"{hours:02d}:{minutes:02d}:{secs:02d}{decimal_mark}{millis:03d}"
