"""Object storage: the local directory and an S3 bucket (moto's real S3 API on
loopback) pass the same tests; then the whole farm runs on the bucket."""

from __future__ import annotations

import asyncio
import dataclasses
import os
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import obstore
import pytest
from obstore.store import S3Store

from server.app import create_app
from server.errors import ApiError
from server.settings import Settings
from server.storage import LocalStorage, S3Storage, Storage
from tests.conftest import S3Server
from tests.farm import ProtocolWorker, WorkerProcess, submit, wait_until_finished
from tests.speech import PARAGRAPHS, word_error_rate

BASE_URL = "http://scribefarm.test"  # the local backend's app, served in-process


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"


@dataclasses.dataclass
class Backend:
    name: str
    storage: Storage
    http: httpx.AsyncClient  # reaches the media URLs: the app (local) or the bucket (S3)
    root: Path


@pytest.fixture(params=["local", "s3"])
def backend(
    request: pytest.FixtureRequest, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> Iterator[Backend]:
    """Storage as the server opens it: create_app(Settings()) from the environment."""
    monkeypatch.setenv("SCRIBEFARM_DATA_DIR", str(tmp_path))
    if request.param == "s3":
        for name, value in request.getfixturevalue("s3_server").env.items():
            monkeypatch.setenv(name, value)
    app = create_app(Settings())
    storage = app.state.server.storage
    assert isinstance(storage, S3Storage if request.param == "s3" else LocalStorage)
    http = httpx.AsyncClient(mounts={BASE_URL: httpx.ASGITransport(app)}, timeout=30)
    yield Backend(request.param, storage, http, tmp_path)


async def chunked(data: bytes, size: int) -> AsyncIterator[bytes]:
    for at in range(0, len(data), size):
        await asyncio.sleep(0)
        yield data[at : at + size]


async def read_all(storage: Storage, key: str) -> bytes:
    return b"".join([chunk async for chunk in storage.read(key)])


@pytest.mark.anyio
async def test_a_streamed_write_reads_back_byte_identical(backend: Backend):
    # 12 MiB in odd-sized pieces: on S3 a multipart upload of three parts.
    data = os.urandom(12 * 1024 * 1024 + 12345)
    size = await backend.storage.write("sources/big", chunked(data, 1_000_003))
    assert size == len(data)
    assert await backend.storage.exists("sources/big")
    assert await read_all(backend.storage, "sources/big") == data


@pytest.mark.anyio
async def test_put_read_exists_delete(backend: Backend):
    storage = backend.storage
    assert not await storage.exists("transcripts/a.json")
    await storage.put("transcripts/a.json", b'{"text": "hello"}')
    assert await storage.exists("transcripts/a.json")
    assert await read_all(storage, "transcripts/a.json") == b'{"text": "hello"}'
    await storage.put("transcripts/a.json", b"replaced")
    assert await read_all(storage, "transcripts/a.json") == b"replaced"
    await storage.delete("transcripts/a.json")
    assert not await storage.exists("transcripts/a.json")
    await storage.delete("transcripts/a.json")  # missing is fine
    await storage.delete("never/written")


@pytest.mark.anyio
async def test_reading_a_missing_object_is_404(backend: Backend):
    with pytest.raises(ApiError) as raised:
        await read_all(backend.storage, "sources/missing")
    assert (raised.value.status, raised.value.code) == (404, "not_found")


@pytest.mark.anyio
async def test_a_failed_upload_leaves_no_object(backend: Backend, request: pytest.FixtureRequest):
    """An upload refused half way (over the size limit) must not leave half an object."""

    async def refused() -> AsyncIterator[bytes]:
        async for chunk in chunked(os.urandom(11 * 1024 * 1024), 1024 * 1024):
            yield chunk
        raise ApiError(413, "upload_too_large", "over the limit")

    with pytest.raises(ApiError) as raised:
        await backend.storage.write("sources/refused", refused())
    assert raised.value.status == 413
    assert not await backend.storage.exists("sources/refused")
    if backend.name == "local":
        assert [p.name for p in backend.root.rglob("*") if p.is_file()] == ["signing.key"]
    else:
        s3: S3Server = request.getfixturevalue("s3_server")
        assert s3.client().list_multipart_uploads(Bucket=s3.bucket).get("Uploads", []) == []


@pytest.mark.anyio
async def test_media_url_serves_http_ranges(backend: Backend, request: pytest.FixtureRequest):
    data = bytes(range(256)) * 400
    await backend.storage.put("sources/ranged", data)
    url = backend.storage.media_url("sources/ranged", 60, BASE_URL)
    if backend.name == "local":
        assert url.startswith(f"{BASE_URL}/v1/media/sources/ranged?expires=")
    else:  # presigned: straight to the bucket, no credentials needed by the reader
        s3: S3Server = request.getfixturevalue("s3_server")
        assert url.startswith(f"{s3.endpoint_url}/{s3.bucket}/sources/ranged?")
        assert "X-Amz-Signature=" in url and "X-Amz-Expires=60" in url
        assert s3.secret_access_key not in url

    whole = await backend.http.get(url)
    assert whole.status_code == 200 and whole.content == data
    part = await backend.http.get(url, headers={"Range": "bytes=1000-1999"})
    assert part.status_code == 206
    assert part.headers["content-range"] == f"bytes 1000-1999/{len(data)}"
    assert part.content == data[1000:2000]
    tail = await backend.http.get(url, headers={"Range": "bytes=-10"})
    assert tail.status_code == 206 and tail.content == data[-10:]


@pytest.mark.anyio
@pytest.mark.parametrize("key", ["../x", "sources/../../x", "/etc/passwd", "a//b", "", "."])
async def test_keys_cannot_escape(backend: Backend, key: str):
    storage = backend.storage
    attempts = [
        storage.write(key, chunked(b"x", 1)),
        storage.put(key, b"x"),
        read_all(storage, key),
        storage.delete(key),
        storage.exists(key),
    ]
    for attempt in attempts:
        with pytest.raises(ApiError) as raised:
            await attempt
        assert (raised.value.status, raised.value.code) == (400, "bad_key")
    with pytest.raises(ApiError):
        storage.media_url(key, 60, BASE_URL)
    assert not (backend.root.parent / "x").exists()


@pytest.mark.parametrize("bucket", ["ab", "My_Bucket", "-leading", "trailing.", "a..b", "x" * 64])
def test_invalid_bucket_names_are_refused_with_the_setting_named(bucket: str):
    with pytest.raises(ValueError, match="SCRIBEFARM_S3_BUCKET"):
        S3Storage(bucket, endpoint_url="http://127.0.0.1:9")


@pytest.mark.anyio
async def test_a_missing_bucket_is_a_storage_error_the_log_explains(
    s3_server: S3Server, caplog: pytest.LogCaptureFixture
):
    storage = S3Storage(
        "not-created",
        endpoint_url=s3_server.endpoint_url,
        access_key_id=s3_server.access_key_id,
        secret_access_key=s3_server.secret_access_key,
    )
    for attempt in (storage.put("a", b"x"), storage.write("a", chunked(b"x", 1))):
        with pytest.raises(ApiError) as raised:
            await attempt
        assert (raised.value.status, raised.value.code) == (502, "storage_error")
        assert "not-created" not in raised.value.message  # details stay in the log
    assert "not-created" in caplog.text and "SCRIBEFARM_S3_" in caplog.text


# --- the farm on a bucket ------------------------------------------------------------


def bucket_store(s3: S3Server) -> S3Store:
    return S3Store(
        s3.bucket,
        endpoint=s3.endpoint_url,
        region=s3.region,
        access_key_id=s3.access_key_id,
        secret_access_key=s3.secret_access_key,
        client_options={"allow_http": True},
    )


def bucket_keys(store: S3Store) -> list[str]:
    return sorted(meta["path"] for page in obstore.list(store) for meta in page)


def transcribe_on_s3(server, keys, speech, before_worker=None) -> tuple[str, dict]:
    """Submits `speech`, runs `before_worker(tid)`, then a real worker process with no
    storage settings at all until the transcription finishes."""
    with server.client(keys["submit"]) as client:
        response = submit(client, speech.read_bytes(), speech.name)
        assert response.status_code == 201, response.text
        tid = response.json()["id"]
        if before_worker:
            before_worker(tid)
        without_s3 = dataclasses.replace(server, settings={})
        assert not any(k.startswith("SCRIBEFARM_S3") for k in without_s3.env)
        worker = WorkerProcess(without_s3, keys["worker"], f"w-{tid[:8]}", ("--threads", "1"))
        worker.start()
        try:
            view = wait_until_finished(client, tid, timeout=240)
        finally:
            worker.stop()
    assert view["state"] == "succeeded", (view, worker.log[-3000:])
    return tid, view


def test_the_farm_reads_sources_from_s3_through_presigned_urls(make_server, media, s3_server):
    server = make_server(**s3_server.settings)
    keys = {role: server.create_key(role) for role in ("submit", "worker")}
    speech = media.speech(PARAGRAPHS[0])
    store = bucket_store(s3_server)

    def source_is_in_the_bucket_and_presigned(tid: str) -> None:
        assert bucket_keys(store) == [f"sources/{tid}"]
        assert bytes(obstore.get(store, f"sources/{tid}").bytes()) == speech.read_bytes()
        # The job a worker claims names a presigned URL on the bucket; give it back.
        probe = ProtocolWorker(server, keys["worker"])
        [job] = probe.claim()
        url = job["source_url"]
        assert url.startswith(f"{s3_server.endpoint_url}/{s3_server.bucket}/sources/{tid}?")
        assert "X-Amz-Signature=" in url
        ranged = httpx.get(url, headers={"Range": "bytes=0-43"})
        assert ranged.status_code == 206 and ranged.content == speech.read_bytes()[:44]
        assert probe.release(job).status_code == 200
        probe.close()
        # With S3 the server serves no media itself.
        with server.client(None) as anonymous:
            link = f"/v1/media/sources/{tid}?expires=9999999999&signature={'0' * 64}"
            assert anonymous.get(link).status_code == 404

    tid, _ = transcribe_on_s3(server, keys, speech, source_is_in_the_bucket_and_presigned)
    with server.client(keys["submit"]) as client:
        text = client.get(f"/v1/transcriptions/{tid}/transcript").json()["text"]
    assert word_error_rate(PARAGRAPHS[0], text) < 0.15, text


def test_large_transcripts_go_to_the_bucket_and_delete_removes_every_object(
    make_server, media, s3_server
):
    server = make_server(**s3_server.settings, inline_result_bytes=1)  # every transcript
    keys = {role: server.create_key(role) for role in ("submit", "worker")}
    store = bucket_store(s3_server)
    tid, _ = transcribe_on_s3(server, keys, media.speech(PARAGRAPHS[1]))

    transcript_key = f"transcripts/{tid}.json"
    assert bucket_keys(store) == [f"sources/{tid}", transcript_key]
    with server.client(keys["submit"]) as client:
        served = client.get(f"/v1/transcriptions/{tid}/transcript", params={"format": "json"})
        assert served.status_code == 200, served.text
        assert served.content == bytes(obstore.get(store, transcript_key).bytes())
        text = served.json()["text"]
        assert word_error_rate(PARAGRAPHS[1], text) < 0.15, text

        deleted = client.delete(f"/v1/transcriptions/{tid}")
        assert deleted.status_code in (200, 204), deleted.text
        assert client.get(f"/v1/transcriptions/{tid}").status_code == 404
    assert bucket_keys(store) == []
