"""Stitching chunk results and rendering them (server/transcripts.py, pure)."""

from __future__ import annotations

import json

from server import transcripts


def result(*segments: tuple[float, float, str], language: str | None = "en") -> dict:
    return {
        "segments": [{"start": s, "end": e, "text": t} for s, e, t in segments],
        "language": language,
    }


def test_merge_keeps_segments_in_chunk_order_inside_their_chunks_without_overlap():
    chunks = [
        (0.0, 10.0, result((8.0, 12.0, " spills over the edge "), (1.0, 3.0, "first"))),
        (10.0, 20.0, result((9.5, 11.0, "starts early"), (15.0, 14.0, "ends before it starts"))),
    ]
    merged = transcripts.merge(chunks, 20.0)
    times = [(s["start"], s["end"], s["text"]) for s in merged["segments"]]
    assert times == [
        (1.0, 3.0, "first"),
        (8.0, 10.0, "spills over the edge"),  # cut at its chunk's end, text stripped
        (10.0, 11.0, "starts early"),  # not before its chunk, nor the last segment
        (15.0, 15.0, "ends before it starts"),  # never ends before it starts
    ]
    assert merged["text"] == "first spills over the edge starts early ends before it starts"
    assert merged["duration_seconds"] == 20.0


def test_merge_drops_empty_segments_and_takes_the_most_common_language():
    chunks = [
        (0.0, 5.0, result((0.0, 1.0, "  "), language="de")),
        (5.0, 10.0, result((5.0, 6.0, "eins"), language="de")),
        (10.0, 15.0, result((10.0, 11.0, "two"), language="en")),
        (15.0, 20.0, result((15.0, 16.0, "drei"), language="de")),
    ]
    merged = transcripts.merge(chunks, 20.0)
    assert [s["text"] for s in merged["segments"]] == ["eins", "two", "drei"]
    assert merged["language"] == "de"
    assert transcripts.merge([], 7.5) == {
        "duration_seconds": 7.5,
        "language": None,
        "text": "",
        "segments": [],
    }


def test_renders_srt_vtt_and_txt_from_the_same_segments():
    doc = transcripts.merge(
        [
            (0.0, 70.0, result((1.5, 3.25, "Hello there."))),
        ],
        70.0,
    )
    doc["segments"].append({"start": 3661.0, "end": 3662.5, "text": "An hour later."})
    assert transcripts.render(doc, "txt") == "Hello there.\nAn hour later.\n"
    srt = transcripts.render(doc, "srt")
    assert srt.startswith("1\n00:00:01,500 --> 00:00:03,250\nHello there.\n")
    assert "2\n01:01:01,000 --> 01:01:02,500\nAn hour later.\n" in srt
    vtt = transcripts.render(doc, "vtt")
    assert vtt.startswith("WEBVTT\n\n00:00:01.500 --> 00:00:03.250\nHello there.\n")


def test_a_long_segment_becomes_several_readable_cues():
    text = " ".join(f"word{i}" for i in range(40))  # about 280 characters, 20 s
    cues = transcripts.cues([{"start": 0.0, "end": 20.0, "text": text}])
    assert len(cues) > 1
    assert " ".join(t.replace("\n", " ") for _, _, t in cues) == text  # no word lost or cut
    for start, end, cue in cues:
        assert end - start <= 7.0 + 1e-9
        assert all(len(line) <= 42 for line in cue.split("\n")) and cue.count("\n") <= 1


def test_the_stored_document_serialises_compactly_and_round_trips():
    merged = transcripts.merge([(0.0, 5.0, result((0.0, 1.0, "Grüße")))], 5.0)
    body = transcripts.document_bytes(merged)
    assert "Grüße".encode() in body and b", " not in body  # UTF-8, no padding
    assert json.loads(body) == merged
