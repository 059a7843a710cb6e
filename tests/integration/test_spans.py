"""A long source planned in spans, by several chunk jobs at once (issue 15): it is cut in
its pauses, each span's plan is the whole plan's there (but for the windows nearest a
cut), and the farm's transcript stays as accurate as faster-whisper's own pipeline."""

from __future__ import annotations

import asyncio

import numpy as np
import pytest
from faster_whisper import BatchedInferencePipeline, WhisperModel

from shared.protocol import SPAN_STRIDE
from tests.farm import submit, two_workers, wait_until_finished
from tests.realspeech import default_cache_dir, excerpt
from tests.speech import decode, word_error_rate
from worker.audio import SAMPLE_RATE, probe_source, read_range
from worker.chunking import CUT_SEARCH_SECONDS, plan_source, quiet_cuts, span_starts
from worker.engines import resolve_model
from worker.engines.faster_whisper import FasterWhisperEngine
from worker.runner import Worker, WorkerConfig
from worker.vad import FRAME

SPAN_SECONDS = 120.0  # the smallest the server allows: three spans in six minutes
LOOPS = 3


@pytest.fixture(scope="module")
def recording():
    return excerpt(default_cache_dir())


@pytest.fixture(scope="module")
def long_source(recording, media):
    """Six minutes of real speech, as an MP3 (seeks into it must be exact)."""
    looped = np.concatenate([decode(recording.audio)] * LOOPS)
    return str(media.convert(media.write_wav(looped), "mp3"))


def speech_of(plan) -> set[tuple[float, float]]:
    return {(round(s, 3), round(e, 3)) for chunk in plan.chunks for s, e in chunk.speech}


def test_a_long_source_is_cut_in_its_pauses_and_each_span_plans_as_the_whole_does(
    long_source,
):
    whole = plan_source(long_source, 60, 120)
    starts = span_starts(probe_source(long_source).declared_seconds, SPAN_SECONDS)
    cuts = quiet_cuts(long_source, starts)
    assert len(cuts) == 2
    duration = whole.duration_seconds
    for k, (start, cut) in enumerate(zip(starts, cuts, strict=True), start=1):
        assert abs(start - k * duration / 3) <= 1
        assert start <= cut < start + CUT_SEARCH_SECONDS
        assert round(cut * SAMPLE_RATE) % FRAME == 0  # on the speech detection's frames
        # In a pause: no speech the whole source's plan found, and quiet around it.
        assert not any(s < cut < e for chunk in whole.chunks for s, e in chunk.speech)
        around = read_range(long_source, cut - 0.1, cut + 0.1)
        assert np.sqrt(np.mean(np.square(around))) < 0.01

    bounds = [0.0, *cuts, None]
    spans = []
    for k in range(3):
        settled = []
        plan = plan_source(
            long_source,
            60,
            120,
            start=bounds[k],
            end=bounds[k + 1],
            first_index=k * SPAN_STRIDE,
            on_settled=settled.extend,
        )
        assert plan.chunks[: len(settled)] == settled  # settled early, the same
        numbers = [k * SPAN_STRIDE + i for i in range(len(plan.chunks))]
        assert [c.index for c in plan.chunks] == numbers
        end = bounds[k + 1] or duration
        assert all(bounds[k] <= c.start < c.end <= end for c in plan.chunks)
        spans.append(plan)
    assert spans[-1].duration_seconds == duration
    ours = set().union(*(speech_of(plan) for plan in spans))
    theirs = speech_of(whole)
    # The same speech (within 1 %), and the same spans but near the cuts, where speech
    # detection starts afresh.
    assert abs(sum(e - s for s, e in ours) / sum(e - s for s, e in theirs) - 1) < 0.01
    assert len(ours & theirs) >= 0.75 * len(theirs)


def test_the_farm_plans_a_long_file_in_spans_as_accurately_as_the_pipeline(
    make_server, recording, long_source
):
    server = make_server(plan_span_seconds=SPAN_SECONDS)
    keys = {role: server.create_key(role) for role in ("submit", "worker")}
    with two_workers(server, keys["worker"], "spans"), server.client(keys["submit"]) as client:
        with open(long_source, "rb") as audio:
            response = submit(client, audio.read(), "long.mp3")
        assert response.status_code == 201, response.text
        view = wait_until_finished(client, response.json()["id"])
        assert view["state"] == "succeeded", view
        text = client.get(f"/v1/transcriptions/{view['id']}/transcript?format=txt").text
    planners = server.sql(
        "SELECT seq, state FROM jobs WHERE transcription_id = $1 AND kind = 'chunk'", view["id"]
    )
    assert sorted((r["seq"], r["state"]) for r in planners) == [
        (-2, "succeeded"),
        (-1, "succeeded"),
        (0, "succeeded"),
    ]
    model = WhisperModel(resolve_model("tiny.en"), device="cpu", compute_type="int8", cpu_threads=2)
    segments, _ = BatchedInferencePipeline(model).transcribe(long_source, batch_size=8)
    direct = " ".join(s.text.strip() for s in segments)
    reference = " ".join([recording.text] * LOOPS)
    ours, theirs = word_error_rate(reference, text), word_error_rate(reference, direct)
    print(f"WER farm in spans {ours:.3f}, direct {theirs:.3f}")
    assert ours <= theirs + 0.01


class DetectsLanguages(FasterWhisperEngine):
    """The bundled English-only model, taken for a multilingual one (none ships offline),
    so that the worker detects the language once, from the first speech: it answers
    English, and counts the detections."""

    multilingual = True

    def __init__(self) -> None:
        super().__init__("tiny.en", cpu_threads=2)
        self.detections = 0

    def detect_language(self, item):
        self.detections += 1
        return "en", 0.99


def test_a_language_detected_once_from_the_first_span_reaches_every_spans_chunks(
    make_server, long_source
):
    """With the language to detect first, the first chunk job plans its span, detects
    the language from its first speech, and only then splits: no span queues a chunk
    before the language is known."""
    server = make_server(plan_span_seconds=SPAN_SECONDS)
    keys = {role: server.create_key(role) for role in ("submit", "worker")}
    with server.client(keys["submit"]) as client, open(long_source, "rb") as audio:
        response = submit(client, audio.read(), "long.mp3", model="tiny.en")
        assert response.status_code == 201, response.text
        tid = response.json()["id"]
        engine = DetectsLanguages()
        config = WorkerConfig(server=server.url, key=keys["worker"], exit_when_idle=2.0)
        asyncio.run(Worker(config, engine).run())
        view = wait_until_finished(client, tid, timeout=10)
        assert view["state"] == "succeeded", view
    assert engine.detections == 1
    [row] = server.sql("SELECT detected_language FROM transcriptions WHERE id = $1", tid)
    assert row["detected_language"] == "en"
    planners = server.sql(
        "SELECT count(*) AS n FROM jobs WHERE transcription_id = $1 AND kind = 'chunk'", tid
    )
    assert planners[0]["n"] == 3
