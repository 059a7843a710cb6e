"""Reading media through object storage that fails some requests: each read either
gives exactly the fault-free samples or raises a MediaError that is retried, never a
shorter or empty read.

The chaos run found the bug this pins down: when a request after the first (a seek's
range request) was answered 503, ffmpeg logged it only as a warning, ended the input
and exited 0, so the worker transcribed an empty or truncated chunk as if it were the
whole one, or failed a good file for good as having "zero length".
"""

from __future__ import annotations

from collections.abc import Iterator

import numpy as np
import pytest

from tests.chaos.proxies import FaultyHttpProxy, ProxyLoop
from tests.speech import serve_directory
from worker.audio import MediaError, read_range, stream_audio

# Enough to fail each request an operation makes (a probe, an open, its seeks).
REQUESTS = 6


@pytest.fixture(scope="module")
def faulty_media(media) -> Iterator[tuple[FaultyHttpProxy, str]]:
    """The media directory over HTTP (Range supported) behind a fault proxy."""
    loop = ProxyLoop()
    with serve_directory(media.directory) as base:
        proxy = FaultyHttpProxy(loop, int(base.rsplit(":", 1)[1]), seed=0)
        yield proxy, proxy.url
        proxy.close()
    loop.stop()


def outcomes(proxy: FaultyHttpProxy, read, expected: np.ndarray) -> list[str]:
    """Fails the n-th request of `read()` for each n: what came of it each time."""
    found = []
    for failing in range(REQUESTS):
        proxy.fail_next(*[n == failing for n in range(REQUESTS)])
        try:
            samples = read()
        except MediaError as exc:
            assert not exc.permanent, f"request {failing} failed: {exc.reason}"
            assert "network" in exc.reason
            found.append("retried")
        else:
            assert samples.size == expected.size, f"request {failing} failed: short read"
            assert np.array_equal(samples, expected), f"request {failing} failed: other samples"
            found.append("exact")
    proxy.fail_next()
    return found


@pytest.mark.parametrize("fmt", ["wav", "m4a-nopns"])
def test_a_failed_seek_is_an_error_to_retry_never_a_short_read(media, faulty_media, fmt):
    proxy, base = faulty_media
    path = media.convert(media.paragraphs((0, 1)), fmt)
    url = f"{base}/{path.name}"
    expected = read_range(str(path), 12.0, 20.0)
    found = outcomes(proxy, lambda: read_range(url, 12.0, 20.0), expected)
    assert found[0] == "retried" and "exact" in found, found  # the faults did land


def test_a_failed_request_while_decoding_everything_is_an_error_to_retry(media, faulty_media):
    proxy, base = faulty_media
    # AAC in MP4 with its index at the end: reading it over HTTP takes several requests.
    path = media.convert(media.paragraphs((2,)), "m4a-nopns")
    expected = np.concatenate(list(stream_audio(str(path))))
    found = outcomes(
        proxy, lambda: np.concatenate(list(stream_audio(f"{base}/{path.name}"))), expected
    )
    assert found[0] == "retried", found
