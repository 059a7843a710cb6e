"""The submission API through a real server: auth on every route, pagination, output
formats, and bad input."""

from __future__ import annotations

import threading
import time
import uuid

import httpx
import psutil
import pytest
import srt
import webvtt

from tests.farm import ProtocolWorker, submit

UNAUTHENTICATED_ROUTES = {"public", "signed-url"}
ALL_ROLES = ("submit", "worker", "admin")


@pytest.fixture(scope="module")
def openapi(server):
    return httpx.get(server.url + "/openapi.json").json()


def operations(openapi):
    for path, methods in openapi["paths"].items():
        for method, op in methods.items():
            yield path, method, op


def concrete(path: str) -> str:
    """Any value will do for path parameters: auth is checked before lookups."""
    return (
        path.replace("{transcription_id}", str(uuid.uuid4()))
        .replace("{job_id}", str(uuid.uuid4()))
        .replace("{key}", "sources/x")
    )


def test_every_route_declares_who_may_call_it(openapi):
    undeclared = [
        f"{m.upper()} {p}" for p, m, op in operations(openapi) if "x-scribefarm-roles" not in op
    ]
    assert undeclared == []


def test_every_route_refuses_no_key_with_401_and_other_roles_with_403(server, keys, openapi):
    checked = 0
    for path, method, op in operations(openapi):
        roles = op["x-scribefarm-roles"]
        if set(roles) <= UNAUTHENTICATED_ROUTES:
            continue
        url = concrete(path)
        with server.client(None) as anonymous:
            response = anonymous.request(method, url, json={})
            assert response.status_code == 401, (method, path, response.text)
            assert response.json()["code"] == "unauthenticated"
        with server.client("sf_not-a-real-key") as bogus:
            assert bogus.request(method, url, json={}).status_code == 401, (method, path)
        for role in set(ALL_ROLES) - set(roles):
            with server.client(keys[role]) as wrong:
                response = wrong.request(method, url, json={})
                assert response.status_code == 403, (method, path, role, response.text)
                assert response.json()["code"] == "forbidden"
        checked += 1
    assert checked >= 10


def test_signed_media_links_refuse_bad_and_expired_signatures(server, keys):
    with server.client(keys["submit"]) as submitter:
        assert submit(submitter, b"secret audio").status_code == 201
    worker = ProtocolWorker(server, keys["worker"])
    [job] = worker.claim()
    url = job["source_url"]
    assert httpx.get(url).content == b"secret audio"
    assert httpx.get(url, headers={"Range": "bytes=7-11"}).content == b"audio"
    tampered = url[:-4] + ("0000" if not url.endswith("0000") else "1111")
    assert httpx.get(tampered).status_code == 403
    expired = url.replace("expires=", "expires=1&x=")
    assert httpx.get(expired).status_code == 403
    worker.complete(job, {"kind": "chunk", "duration_seconds": 0, "chunks": []})
    worker.close()


def test_a_submit_key_sees_only_its_own_transcriptions(server, keys):
    other = server.create_key("submit")
    with server.client(keys["submit"]) as mine, server.client(other) as theirs:
        tid = submit(mine, b"x").json()["id"]
        assert theirs.get(f"/v1/transcriptions/{tid}").status_code == 404
        assert theirs.post(f"/v1/transcriptions/{tid}/cancel").status_code == 404
        assert tid not in [t["id"] for t in theirs.get("/v1/transcriptions").json()["items"]]
    with server.client(keys["admin"]) as admin:
        assert admin.get(f"/v1/transcriptions/{tid}").status_code == 200


def test_pagination_walks_every_transcription_once_newest_first(server):
    key = server.create_key("submit")
    with server.client(key) as client:
        ids = [submit(client, b"x").json()["id"] for _ in range(25)]
        client.post(f"/v1/transcriptions/{ids[3]}/cancel")
        seen, cursor, pages = [], None, 0
        while True:
            params = {"limit": 10} | ({"cursor": cursor} if cursor else {})
            page = client.get("/v1/transcriptions", params=params).json()
            seen += [t["id"] for t in page["items"]]
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert pages == 3
        assert seen == list(reversed(ids))
        canceled = client.get("/v1/transcriptions", params={"state": "canceled"}).json()
        assert [t["id"] for t in canceled["items"]] == [ids[3]]
        bad = client.get("/v1/transcriptions", params={"cursor": "garbage!"})
        assert bad.status_code == 422 and bad.json()["code"] == "bad_cursor"


SEGMENTS = [
    {"start": 0.5, "end": 2.25, "text": " Hello there."},
    {"start": 61.0, "end": 63.5, "text": " A minute later, with a comma."},
    {"start": 3725.125, "end": 3727.0, "text": " Over an hour in."},
]


@pytest.fixture(scope="module")
def finished(server, keys):
    """A transcription completed through the worker protocol with known segments."""
    with server.client(keys["submit"]) as client:
        # Top priority: claimed before anything other tests left queued.
        submitted = submit(client, b"x", word_timestamps=True, priority=100).json()
        tid = submitted["id"]
        # No model asked for: the board's default, shown as the one it runs with.
        assert submitted["options"]["model"] is None and submitted["model"] == "tiny.en"
    worker = ProtocolWorker(server, keys["worker"], name="formats")
    [chunk] = worker.claim(max_jobs=1)
    assert chunk["transcription_id"] == tid
    worker.complete(
        chunk,
        {
            "kind": "chunk",
            "duration_seconds": 3730.0,
            "chunks": [{"index": 0, "start": 0.0, "end": 3730.0}],
        },
    )
    [job] = worker.claim()
    result = {
        "kind": "transcribe",
        "segments": SEGMENTS,
        "language": "en",
        "audio_seconds": 3730.0,
        "processing_seconds": 12.0,
    }
    assert worker.complete(job, result).status_code == 200
    worker.close()
    return tid


def test_transcript_as_txt(server, keys, finished):
    with server.client(keys["submit"]) as client:
        response = client.get(f"/v1/transcriptions/{finished}/transcript", params={"format": "txt"})
    assert response.headers["content-type"].startswith("text/plain")
    assert response.text == "Hello there.\nA minute later, with a comma.\nOver an hour in.\n"


def test_transcript_as_srt_parses_with_the_srt_library(server, keys, finished):
    with server.client(keys["submit"]) as client:
        body = client.get(f"/v1/transcriptions/{finished}/transcript?format=srt").text
    subs = list(srt.parse(body))
    assert [s.content for s in subs] == [s["text"].strip() for s in SEGMENTS]
    assert [s.start.total_seconds() for s in subs] == [0.5, 61.0, 3725.125]
    assert [s.end.total_seconds() for s in subs] == [2.25, 63.5, 3727.0]


def test_transcript_as_vtt_parses_with_webvtt(server, keys, finished, tmp_path):
    with server.client(keys["submit"]) as client:
        body = client.get(f"/v1/transcriptions/{finished}/transcript?format=vtt").text
    captions = webvtt.from_string(body)
    assert [c.text for c in captions] == [s["text"].strip() for s in SEGMENTS]
    assert [c.start for c in captions] == ["00:00:00.500", "00:01:01.000", "01:02:05.125"]


def test_transcript_as_json_carries_segments_model_and_options(server, keys, finished):
    with server.client(keys["submit"]) as client:
        body = client.get(f"/v1/transcriptions/{finished}/transcript?format=json").json()
    assert body["model"] == "tiny.en" and body["options"]["word_timestamps"] is True
    assert body["language"] == "en" and body["duration_seconds"] == 3730.0
    assert [s["start"] for s in body["segments"]] == [0.5, 61.0, 3725.125]


def test_unknown_transcript_format_and_unfinished_transcript_are_clear_errors(server, keys):
    with server.client(keys["submit"]) as client:
        tid = submit(client, b"x").json()["id"]
        bad = client.get(f"/v1/transcriptions/{tid}/transcript", params={"format": "docx"})
        assert bad.status_code == 422 and "format" in bad.json()["message"]
        early = client.get(f"/v1/transcriptions/{tid}/transcript")
        assert early.status_code == 409 and early.json()["code"] == "not_finished"


# --- bad input ---------------------------------------------------------------


def test_unknown_and_malformed_fields_are_422_with_a_readable_message(server, keys):
    with server.client(keys["submit"]) as client:
        typo = submit(client, b"x", modle="tiny.en")
        assert typo.status_code == 422
        assert typo.json()["message"] == "modle: Extra inputs are not permitted"
        lang = submit(client, b"x", language="English")
        assert lang.status_code == 422 and lang.json()["message"].startswith("language:")
        chunk = submit(client, b"x", target_chunk_seconds="forever")
        assert chunk.status_code == 422 and "target_chunk_seconds" in chunk.json()["message"]
    with server.client(keys["worker"]) as worker:
        extra = worker.post("/v1/workers", json={"name": "w", "gpus": 8})
        assert extra.status_code == 422 and extra.json()["message"] == (
            "gpus: Extra inputs are not permitted"
        )
        broken = worker.post(
            "/v1/jobs/claim", content=b"{not json", headers={"content-type": "application/json"}
        )
        assert broken.status_code == 422 and broken.json()["code"] == "invalid_request"


def test_a_model_no_worker_has_is_refused_until_one_registers(make_server):
    """Queued for a model no worker has, a transcription would wait for ever."""
    server = make_server(models="base.en")
    keys = {role: server.create_key(role) for role in ("submit", "worker")}
    sources = server.data_dir / "storage" / "sources"
    with server.client(keys["submit"]) as client:
        refused = submit(client, b"x", model="large-v3")
        assert refused.status_code == 422 and refused.json()["code"] == "unknown_model"
        message = refused.json()["message"]
        assert "'large-v3'" in message and "offers base.en, tiny.en." in message, message
        assert "--model large-v3" in message
        assert not sources.exists() or list(sources.iterdir()) == []  # nothing kept
        from_url = {"url": "https://media.example.com/a.mp3", "model": "large-v3"}
        refused = client.post("/v1/transcriptions", json=from_url)
        assert refused.status_code == 422 and refused.json()["code"] == "unknown_model"

        assert submit(client, b"x", model="base.en").status_code == 201  # SCRIBEFARM_MODELS
        big = ProtocolWorker(server, keys["worker"], models=["large-v3"])
        accepted = submit(client, b"x", model="large-v3")
        assert accepted.status_code == 201 and accepted.json()["model"] == "large-v3"
        big.close()


def test_empty_missing_and_non_multipart_uploads_are_refused(server, keys):
    with server.client(keys["submit"]) as client:
        empty = submit(client, b"")
        assert empty.status_code == 422 and empty.json()["code"] == "empty_file"
        no_file = client.post(
            "/v1/transcriptions", data={"language": "en"}, files={"x": ("a", b"1")}
        )
        assert no_file.status_code == 422 and no_file.json()["code"] == "file_required"
        raw = client.post("/v1/transcriptions", content=b"abc")
        assert raw.status_code == 415 and "multipart" in raw.json()["message"]
    storage = server.data_dir / "storage" / "sources"
    assert not storage.exists() or not any(p.stat().st_size == 0 for p in storage.iterdir())


def test_worker_routes_refuse_an_old_protocol_with_426(server, keys):
    with server.client(keys["worker"]) as worker:
        old = worker.post(
            "/v1/workers", json={"name": "w"}, headers={"X-Scribefarm-Protocol": "0.9"}
        )
        assert old.status_code == 426 and "Upgrade the worker" in old.json()["message"]


MB = 1024 * 1024


def multipart_stream(size: int, boundary: str = "sfboundary"):
    yield (
        f'--{boundary}\r\nContent-Disposition: form-data; name="file"; filename="big.wav"\r\n'
        "Content-Type: application/octet-stream\r\n\r\n"
    ).encode()
    block = b"\0" * MB
    for _ in range(size // MB):
        yield block
    yield f"\r\n--{boundary}--\r\n".encode()


def upload(server, key, size, **headers):
    with server.client(key, timeout=120) as client:
        return client.post(
            "/v1/transcriptions",
            content=multipart_stream(size),
            headers={"content-type": "multipart/form-data; boundary=sfboundary", **headers},
        )


@pytest.fixture(scope="module")
def small_limit(make_server):
    server = make_server(max_upload_bytes=64 * MB)
    return server, server.create_key("submit")


def test_upload_over_the_limit_is_413_naming_the_limit(small_limit):
    server, key = small_limit
    streamed = upload(server, key, 100 * MB)  # chunked: refused once it crosses the limit
    assert streamed.status_code == 413
    assert streamed.json()["message"] == (
        f"the upload is over the limit of {64 * MB} bytes (SCRIBEFARM_MAX_UPLOAD_BYTES)"
    )
    exact = sum(len(part) for part in multipart_stream(100 * MB))
    declared = upload(server, key, 100 * MB, **{"content-length": str(exact)})
    assert declared.status_code == 413
    assert not list((server.data_dir / "storage").rglob("*.partial"))
    assert upload(server, key, 60 * MB).status_code == 201


def test_a_large_upload_streams_to_storage_with_flat_server_memory(make_server):
    server = make_server()
    key = server.create_key("submit")
    process = psutil.Process(server.process.pid)
    before = process.memory_info().rss
    peak = before
    done = threading.Event()

    def sample():
        nonlocal peak
        while not done.is_set():
            peak = max(peak, process.memory_info().rss)
            time.sleep(0.02)

    sampler = threading.Thread(target=sample)
    sampler.start()
    try:
        response = upload(server, key, 2000 * MB)  # the default limit is 2 GiB
    finally:
        done.set()
        sampler.join()
    assert response.status_code == 201, response.text
    stored = server.data_dir / "storage" / "sources" / response.json()["id"]
    assert stored.stat().st_size == 2000 * MB
    assert peak - before < 100 * MB, f"server RSS grew by {(peak - before) / MB:.0f} MB"
    stored.unlink()  # 2 GB of zeros: no need to keep them until the session ends
