"""Fidelity on real speech (issue 12): through a real server and real worker processes,
the farm's transcript of real recordings is as accurate as faster-whisper's own
pipeline on the whole file, and its subtitles stay readable. The full comparison, on
files of 5 minutes and more, is bench/fidelity.py; this runs on its 2-minute excerpt."""

from __future__ import annotations

import pytest
import srt
from faster_whisper import BatchedInferencePipeline, WhisperModel

from tests.farm import submit, two_workers, wait_until_finished
from tests.realspeech import default_cache_dir, excerpt
from tests.scoring import TimedText, score
from worker.engines import resolve_model


@pytest.fixture(scope="module")
def recording():
    return excerpt(default_cache_dir())


@pytest.fixture(scope="module")
def farm_result(make_server, recording):
    server = make_server()
    keys = {role: server.create_key(role) for role in ("submit", "worker")}
    with two_workers(server, keys["worker"], "fidelity"), server.client(keys["submit"]) as client:
        response = submit(client, recording.audio.read_bytes(), recording.audio.name)
        assert response.status_code == 201, response.text
        view = wait_until_finished(client, response.json()["id"])
        assert view["state"] == "succeeded", view
        url = f"/v1/transcriptions/{view['id']}/transcript"
        yield view, client.get(url).json(), client.get(url, params={"format": "srt"}).text


@pytest.fixture(scope="module")
def direct(recording):
    """faster-whisper's pipeline on the same file with its defaults, as a user runs it, and
    its word timestamps (a second pass): the reference times where a recording has none."""
    model = WhisperModel(resolve_model("tiny.en"), device="cpu", compute_type="int8", cpu_threads=2)
    pipeline = BatchedInferencePipeline(model)
    segments, _ = pipeline.transcribe(str(recording.audio), batch_size=8)
    timed, _ = pipeline.transcribe(str(recording.audio), batch_size=8, word_timestamps=True)
    words = recording.words or [(w.word, w.start, w.end) for s in timed for w in s.words or ()]
    return TimedText([(s.start, s.text) for s in segments]), words


def test_the_farm_is_as_accurate_as_the_pipeline(recording, farm_result, direct):
    view, document, _ = farm_result
    assert view["progress"]["jobs_total"] >= 2  # it really was cut into chunks
    baseline, words = direct
    farm = TimedText([(s["start"], s["text"]) for s in document["segments"]])
    ours, theirs = score(recording.text, farm, words), score(recording.text, baseline, words)
    print(f"farm: {ours.line()}\ndirect: {theirs.line()}")
    assert ours.wer <= theirs.wer + 0.01
    assert ours.deletion_runs <= theirs.deletion_runs
    # Each segment starts where its first word does (0.2 s: the bound)...
    assert ours.start_error is not None and ours.start_error <= 0.2
    # ...and so nearer each utterance's onset in the recording than the pipeline's 30 s
    # windows start.
    by_turn = [score(recording.text, t, None, recording.turns) for t in (farm, baseline)]
    assert by_turn[0].start_error < by_turn[1].start_error


def test_subtitles_are_readable(farm_result):
    _, document, subtitles = farm_result
    cues = list(srt.parse(subtitles))
    assert len(cues) >= len(document["segments"]) > 10
    for cue in cues:
        lines = cue.content.split("\n")
        assert len(lines) <= 2 and all(len(line) <= 42 for line in lines), cue
        assert (cue.end - cue.start).total_seconds() <= 7.0, cue
    assert " ".join(c.content.replace("\n", " ") for c in cues) == document["text"]
