"""Schemathesis against the server's own /openapi.json, with each role's key and none.

Every operation gets requests generated from its schema (valid ones, and for the roles
it admits invalid ones too), sent to a real server process, and every answer must be no
server error and exactly what the schema documents: its status code, content type,
headers and body. A role an operation does not admit gets a few requests, whose 401 or
403 must be documented as well.

Schemathesis' own pytest integration (`schemathesis.pytest.from_fixture`) does not run
under pytest 9 (it sets `Function._nodeid`), so this drives its Python API directly, in
two of its phases: the coverage cases of each operation (`iter_coverage_cases`, fixed
edge cases), and `as_strategy()` inside a derandomized Hypothesis test (the same
requests on every run); each request goes through `call_and_validate()` with CHECKS.

Stateless requests would rarely name anything that exists (a transcription, a worker, a
signed media link), so half of them are aimed at real ones made here first; see `aim`.
"""

from __future__ import annotations

import threading
import time
import zlib
from collections.abc import Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any
from urllib.parse import parse_qs, urlsplit, urlunsplit

import httpx
import hypothesis
import pytest
import requests
import schemathesis
from hypothesis import strategies
from schemathesis import GenerationMode
from schemathesis.checks import not_a_server_error
from schemathesis.core.failures import FailureGroup
from schemathesis.specs.openapi.checks import (
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from tests.farm import WORKER_HEADERS, ProtocolWorker, chunk_transcript, submit

ROLES = ("submit", "worker", "admin", None)
UNAUTHENTICATED = {"public", "signed-url"}  # x-scribefarm-roles of routes needing no key
ADMITTED_EXAMPLES = 30  # per operation and role that may use it: valid and invalid requests
REFUSED_EXAMPLES = 3  # per operation and role that may not: its 401/403 must be documented
MAX_WAIT_SECONDS = 0.2  # long polls, cut short; test_board.py tests the waiting itself
OPENAI_ROUTE = "/v1/audio/transcriptions"


def no_server_error(ctx: Any, response: Any, case: schemathesis.Case) -> bool | None:
    """not_a_server_error, but for the OpenAI route's documented 504: the server runs
    with SCRIBEFARM_OPENAI_WAIT_SECONDS=0 and no worker, so a valid request gets it
    (test_openai.py covers its 200s)."""
    if case.operation.path == OPENAI_ROUTE and response.status_code == 504:
        return None
    return not_a_server_error(ctx, response, case)


CHECKS = [
    no_server_error,
    status_code_conformance,
    content_type_conformance,
    response_headers_conformance,
    response_schema_conformance,
]


class SourceHandler(BaseHTTPRequestHandler):
    """Media for URL submissions and a receiver for their webhooks, on loopback: the
    URLs the fuzzer makes up are pointed here, so no request leaves the machine."""

    def do_GET(self) -> None:
        partial = self.headers.get("Range") is not None
        self.send_response(206 if partial else 200)
        if partial:
            self.send_header("Content-Range", "bytes 0-0/5")
        body = b"a" if partial else b"audio"
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("Content-Length") or 0))
        self.send_response(200)
        self.send_header("Content-Length", "0")
        self.end_headers()

    def log_message(self, *args: Any) -> None:
        pass


@pytest.fixture(scope="module")
def source_host() -> Iterator[str]:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), SourceHandler)
    thread = threading.Thread(target=httpd.serve_forever, daemon=True)
    thread.start()
    yield f"127.0.0.1:{httpd.server_port}"
    httpd.shutdown()
    httpd.server_close()


@pytest.fixture(scope="module")
def server(make_server):
    # Loopback sources are allowed (they are all `source_host`); an OpenAI request is
    # answered at once instead of waiting an hour for a worker that never comes.
    return make_server(url_allowlist="127.0.0.1", openai_wait_seconds=0)


@pytest.fixture(scope="module")
def targets(server, keys) -> Iterator[dict[str, Any]]:
    """Real objects for requests to name: a finished and a queued transcription (the
    submit key's), new ones to delete, a registered worker, and a signed media link."""
    client = server.client(keys["submit"])
    finished = submit(client, b"finished", word_timestamps=True, priority=100).json()["id"]
    queued = submit(client, b"queued").json()["id"]

    def new_transcription() -> str:
        response = submit(client, b"to delete")
        assert response.status_code == 201, response.text
        return response.json()["id"]

    setup = ProtocolWorker(server, keys["worker"], name="fuzz-setup")
    [chunk] = setup.claim()
    assert chunk["transcription_id"] == finished
    plan = {
        "kind": "chunk",
        "duration_seconds": 10.0,
        "chunks": [{"index": 0, "start": 0, "end": 10}],
    }
    assert setup.complete(chunk, plan).status_code == 200
    [job] = setup.claim()
    assert setup.complete(job, chunk_transcript(job)).status_code == 200
    setup.close()
    fuzzing = ProtocolWorker(server, keys["worker"], name="fuzz-claimer")
    fuzzing.close()
    link = urlsplit(chunk["source_url"])
    yield {
        "transcriptions": [finished, queued],
        "new_transcription": new_transcription,
        "worker_id": fuzzing.id,
        "media": {
            "key": link.path.removeprefix("/v1/media/"),
            "query": {k: v[0] for k, v in parse_qs(link.query).items()},
        },
    }
    client.close()


@pytest.fixture(scope="module")
def api_schema(server) -> schemathesis.BaseSchema:
    return schemathesis.openapi.from_url(server.url + "/openapi.json")


def heads(value: Any) -> bool:
    """A fair, repeatable coin from a generated value: aims half of the requests."""
    return zlib.crc32(repr(value).encode()) % 2 == 0


def local_url(value: Any, host: str) -> Any:
    """The same URL on `host`: the server probes it, and it must not be the internet."""
    if not isinstance(value, str):
        return value
    try:
        parts = urlsplit(value)
    except ValueError:
        return value
    if parts.scheme not in ("http", "https"):
        return value  # refused before any lookup
    return urlunsplit(("http", host, parts.path, parts.query, parts.fragment))


def aim(case: schemathesis.Case, targets: dict[str, Any], host: str) -> None:
    """Points half of the valid requests at real objects where they name one (invalid
    ones stay as generated, to be refused), keeps long polls short, and points every
    URL the server would fetch at `host`."""
    path = case.operation.path
    params = case.path_parameters or {}
    body = case.body if isinstance(case.body, dict) else {}
    if case.meta is None or case.meta.generation.mode.is_positive:
        if "transcription_id" in params and heads(params["transcription_id"]):
            if case.method.upper() == "DELETE":  # a new one each time: the others stay
                params["transcription_id"] = targets["new_transcription"]()
            else:
                known = targets["transcriptions"]
                params["transcription_id"] = known[zlib.crc32(repr(case.query).encode()) % 2]
        if path == "/v1/media/{key}" and heads(case.query):
            params["key"] = targets["media"]["key"]
            case.query = {**(case.query or {}), **targets["media"]["query"]}
        if path == "/v1/jobs/claim" and heads(body.get("worker_id")):
            body["worker_id"] = targets["worker_id"]
    wait = body.get("wait_seconds")
    if type(wait) in (int, float) and MAX_WAIT_SECONDS < wait <= 60:
        body["wait_seconds"] = MAX_WAIT_SECONDS
    if path == "/v1/transcriptions":
        for field in ("url", "webhook_url"):
            if field in body:
                body[field] = local_url(body[field], host)


def request_headers(case: schemathesis.Case, key: str | None) -> dict[str, str]:
    """The role's key, and the worker protocol's version header: a quarter of the
    requests keep the one generated for them instead (most get 426)."""
    headers = {} if key is None else {"Authorization": f"Bearer {key}"}
    generated = {name.lower(): value for name, value in (case.headers or {}).items()}
    for name, value in WORKER_HEADERS.items():
        if name.lower() not in generated or zlib.crc32(repr(generated).encode()) % 4:
            headers[name] = value
    return headers


class Sender:
    """Sends cases as one role (`key`, or none) and checks each answer."""

    def __init__(self, key: str | None, targets: dict[str, Any], host: str) -> None:
        self.key, self.targets, self.host = key, targets, host
        self.session = requests.Session()

    def __call__(self, case: schemathesis.Case) -> None:
        aim(case, self.targets, self.host)
        headers = request_headers(case, self.key)
        case.call_and_validate(headers=headers, checks=CHECKS, session=self.session, timeout=30)


def coverage(operation: Any, send: Sender) -> None:
    """Schemathesis' coverage phase: schema-derived edge cases (boundaries, each
    constraint broken in turn, missing and extra parts), the same on every run."""
    schema = operation.schema
    config = schema.config.generation_for(operation=operation, phase="coverage")
    modes = [GenerationMode.POSITIVE, GenerationMode.NEGATIVE]
    for case in schema.iter_coverage_cases(
        operation, generation_modes=modes, generation_config=config
    ):
        send(case)


def fuzz(operation: Any, send: Sender, admitted: bool) -> None:
    """Schemathesis' fuzzing phase: requests drawn by Hypothesis from the schema."""
    modes = [GenerationMode.POSITIVE] + ([GenerationMode.NEGATIVE] if admitted else [])
    cases = strategies.one_of(*(operation.as_strategy(generation_mode=m) for m in modes))

    @hypothesis.settings(
        max_examples=ADMITTED_EXAMPLES if admitted else REFUSED_EXAMPLES,
        derandomize=True,  # the same requests on every run
        database=None,
        deadline=None,  # a real server over HTTP: latency is not the generator's fault
        # Drawing the larger bodies (a job's result) is slow on a busy CI machine; what is
        # tested here is the server, not how fast requests are generated.
        suppress_health_check=[hypothesis.HealthCheck.too_slow],
    )
    @hypothesis.given(case=cases)
    def run(case: schemathesis.Case) -> None:
        send(case)

    run()


@pytest.mark.parametrize("role", ROLES, ids=[r or "no-key" for r in ROLES])
def test_every_operation_answers_as_documented(role, keys, api_schema, targets, source_host):
    send = Sender(keys[role] if role else None, targets, source_host)
    failures: list[str] = []
    tested = 0
    for result in api_schema.get_all_operations():
        operation = result.ok()
        roles = set(operation.definition.raw["x-scribefarm-roles"])
        admitted = bool(roles & UNAUTHENTICATED) or role in roles
        phases = ["coverage", "fuzzing"] if admitted else ["fuzzing"]  # edge cases, too
        for phase in phases:
            try:
                if phase == "coverage":
                    coverage(operation, send)
                else:
                    fuzz(operation, send, admitted)
            except (Exception, FailureGroup) as exc:  # the first failure of each phase
                notes = "\n".join(getattr(exc, "__notes__", ()))
                where = f"{operation.label} with {role or 'no'} key, {phase}"
                failures.append(f"{where}:\n{exc}\n{notes}")
        tested += 1
    send.session.close()
    assert tested == sum(len(methods) for methods in api_schema.raw_schema["paths"].values())
    assert tested >= 18
    assert not failures, "\n\n".join(failures)


# --- what the fuzzing found, pinned down ---------------------------------------------


def test_a_media_link_with_a_signature_that_is_not_hex_is_refused_not_a_crash(server):
    """Was a 500: hmac.compare_digest refuses non-ASCII strings."""
    expires = int(time.time()) + 3600
    for signature in ("é" * 64, "g" * 64):
        params = {"expires": expires, "signature": signature}
        response = httpx.get(f"{server.url}/v1/media/sources/x", params=params)
        assert response.status_code == 422, response.text
        assert response.json()["code"] == "invalid_request"


def test_text_with_a_nul_character_is_refused_not_a_crash(server, keys):
    """Was a 500: PostgreSQL's text and jsonb cannot hold U+0000."""
    with server.client(keys["worker"]) as worker:
        registered = worker.post("/v1/workers", json={"name": "a\0b"})
        assert registered.status_code == 422, registered.text
        assert registered.json()["code"] == "invalid_text"
        cached = worker.post("/v1/chunk-cache/lookup", json={"keys": ["\0"]})
        assert cached.status_code == 422, cached.text
    with server.client(keys["submit"]) as client:
        part = b'Content-Disposition: form-data; name="file"; filename="a\0.wav"\r\n\r\nx'
        default_model = b'Content-Disposition: form-data; name="model"\r\n\r\nwhisper-1'
        multipart = {"Content-Type": "multipart/form-data; boundary=b"}
        named = client.post(
            "/v1/transcriptions", content=b"--b\r\n" + part + b"\r\n--b--\r\n", headers=multipart
        )
        assert named.status_code == 422 and named.json()["code"] == "invalid_text", named.text
        # A model name with a NUL is one no worker has: refused before it is stored.
        model = submit(client, b"x", model="tiny\0")
        assert model.status_code == 422 and model.json()["code"] == "unknown_model", model.text
        body = b"--b\r\n" + default_model + b"\r\n--b\r\n" + part + b"\r\n--b--\r\n"
        openai = client.post(OPENAI_ROUTE, content=body, headers=multipart)
        assert openai.status_code == 400, openai.text
        assert openai.json()["error"]["code"] == "invalid_text"
        listed = client.get("/v1/transcriptions").json()["items"]
        assert not any("\0" in (t["filename"] or "") for t in listed)


def test_every_operation_has_its_own_id(api_schema):
    """GET and HEAD of /v1/media once shared one (OpenAPI requires them unique)."""
    ids = [
        op["operationId"] for ms in api_schema.raw_schema["paths"].values() for op in ms.values()
    ]
    assert len(ids) == len(set(ids))
