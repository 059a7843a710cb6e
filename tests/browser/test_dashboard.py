"""The dashboard in a real browser: Playwright drives Debian's Chromium against a real
server and real worker processes (real ffmpeg, the real model) on synthesized speech.

Screenshots of every page at 1280 px and 390 px go to SCREENSHOTS (printed by .ci/run).
"""

from __future__ import annotations

import os
import re
import signal
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest
import srt
from playwright.sync_api import Browser, Page, expect, sync_playwright

from tests.farm import ProtocolWorker, WorkerProcess, submit, wait_for, wait_until_finished
from tests.integration.test_dashboard import diarized_chunk, plan_conversation

CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking"]
SCREENSHOTS = Path(
    os.environ.get(
        "SCRIBEFARM_SCREENSHOTS", Path(__file__).parents[2] / ".ci" / "artifacts" / "screenshots"
    )
)
WIDTHS = (1280, 390)
LEASE = 4.0
GONE = 6.0  # SCRIBEFARM_WORKER_GONE_SECONDS: a killed worker is gone within seconds
SLOW = 60_000  # ms: real workers on a shared 2-core machine


@pytest.fixture(scope="module")
def farm(make_server):
    server = make_server(lease_seconds=LEASE, worker_gone_seconds=GONE, retry_base_seconds=0.5)
    keys = {role: server.create_key(role) for role in ("submit", "worker", "admin")}
    options = ("--threads", "1", "--batch-size", "2")
    workers = [WorkerProcess(server, keys["worker"], f"w{i}", options).start() for i in (1, 2)]
    yield server, keys, workers
    for worker in workers:
        worker.stop()


@pytest.fixture(scope="module")
def browser() -> Iterator[Browser]:
    if not Path(CHROMIUM).exists():
        pytest.fail(f"{CHROMIUM} is missing: ./dev installs Debian's chromium package")
    with sync_playwright() as playwright:
        browser = playwright.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield browser
        browser.close()


@pytest.fixture(scope="module")
def made() -> dict[str, str]:
    """Transcription ids the later tests (and the screenshots) come back to."""
    return {}


def open_page(browser: Browser, server, width: int = 1280) -> Page:
    context = browser.new_context(viewport={"width": width, "height": 900}, base_url=server.url)
    context.set_default_timeout(15_000)
    return context.new_page()


def sign_in(browser: Browser, server, key: str, width: int = 1280) -> Page:
    """With the keyboard: type the key, press Enter."""
    page = open_page(browser, server, width)
    page.goto("/")
    expect(page).to_have_url(re.compile(r"/signin\?next=%2F$"))
    page.get_by_label("API key").fill(key)
    page.keyboard.press("Enter")
    expect(page.get_by_role("heading", name="Transcriptions")).to_be_visible()
    return page


def record_progress(page: Page) -> None:
    """Keeps every value the live progress bar shows (and proves the page never reloads:
    a reload would lose the record)."""
    page.evaluate(
        """() => {
        window.seen = [];
        const note = () => window.seen.push(document.querySelector('#summary progress').value);
        note();
        new MutationObserver(note).observe(document.getElementById('summary'), {childList: true});
    }"""
    )


def throttle_uploads(page: Page, bytes_per_second: int) -> None:
    cdp = page.context.new_cdp_session(page)
    cdp.send("Network.enable")
    conditions = {"offline": False, "latency": 0, "downloadThroughput": -1}
    cdp.send(
        "Network.emulateNetworkConditions", conditions | {"uploadThroughput": bytes_per_second}
    )


def leased_by(server, transcription_id: str) -> list[dict]:
    """Workers holding its transcribe jobs. From a thread of its own: Playwright's sync
    API keeps an event loop running in this one."""
    query = (
        "SELECT w.name FROM jobs j JOIN workers w ON w.id = j.worker_id "
        "WHERE j.transcription_id = $1 AND j.kind = 'transcribe' AND j.state = 'leased'"
    )
    with ThreadPoolExecutor(1) as thread:
        return thread.submit(server.sql, query, transcription_id).result()


def current_time(page: Page) -> float:
    return page.evaluate("document.getElementById('player').currentTime")


def test_upload_follow_the_progress_seek_in_the_transcript_and_download_srt(
    farm, browser, media, made
):
    server, keys, _ = farm
    speech = media.paragraphs((0, 1))  # over 30 s of speech: two decoding windows
    page = sign_in(browser, server, keys["submit"])
    throttle_uploads(page, 256 * 1024)  # a few seconds: the upload's bar is seen moving
    page.get_by_label("Audio or video file").set_input_files(speech)
    page.locator("#upload-chunk").fill("6")
    page.get_by_role("button", name="Upload and transcribe").click()
    bar = page.locator("#upload-progress")
    wait_for(lambda: 0 < float(bar.get_attribute("value") or 0) < 100, 10, "the upload bar")
    page.wait_for_url(re.compile(r"/transcriptions/[0-9a-f-]{36}$"))
    made["speech"] = page.url.rsplit("/", 1)[1]

    record_progress(page)
    expect(page.locator("#summary .badge")).to_have_text("succeeded", timeout=SLOW)
    seen = page.evaluate("window.seen")
    assert seen[0] < 100 and seen[-1] == 100, seen  # it moved live, to 100 %
    chunks = re.search(r"(\d+)/\1 chunks", page.locator("#summary").inner_text())
    assert chunks and int(chunks[1]) >= 2  # cut between its windows into several chunks
    expect(page.locator(".timeline .chunk.succeeded")).to_have_count(int(chunks[1]))

    segments = page.locator("#transcript .segment")
    expect(segments.first).to_contain_text("stood at the end")
    third = segments.nth(2)
    start = float(third.get_attribute("data-start"))
    assert start > 1
    third.click()
    wait_for(lambda: abs(current_time(page) - start) < 1.0, 10, "the player to seek")
    expect(third).to_have_attribute("aria-current", "true")
    first = segments.first  # and with the keyboard
    first.focus()
    page.keyboard.press("Enter")
    wait_for(lambda: current_time(page) < start - 0.5, 10, "the player to seek back")

    with page.expect_download() as download:
        page.get_by_role("link", name="srt", exact=True).click()
    subtitles = list(srt.parse(Path(download.value.path()).read_text()))
    assert len(subtitles) == segments.count()
    assert "stood at the end" in subtitles[0].content.replace("\n", " ")  # two lines
    page.context.close()


def test_a_killed_worker_shows_gone_and_its_chunk_taken_over(farm, browser, media, made):
    server, keys, workers = farm
    speech = media.paragraphs((1, 2))
    workers_page = sign_in(browser, server, keys["admin"])
    workers_page.goto("/workers")
    expect(workers_page.locator("tr.worker-row")).to_have_count(2)
    with server.client(keys["submit"]) as client:
        tid = submit(client, speech.read_bytes(), "meeting.wav", target_chunk_seconds=8).json()[
            "id"
        ]
        made["taken_over"] = tid
        leased = wait_for(lambda: leased_by(server, tid), 120, "a leased job", every=0.05)
        victim_name = leased[0]["name"]
        victim = next(w for w in workers if w.name == victim_name)
        victim.signal(signal.SIGKILL)

        row = workers_page.locator(f'tr.worker-row[data-name="{victim_name}"]')
        expect(row.locator(".badge")).to_have_text("gone", timeout=30_000)  # live, no reload
        detail = workers_page.context.new_page()
        detail.goto(f"/transcriptions/{tid}")
        taken_over = detail.locator(".chunk-row", has_text="taken over")
        expect(taken_over.first).to_be_visible(timeout=SLOW)
        expect(taken_over.first.locator(".worker")).not_to_have_text(victim_name)
        expect(taken_over.first.locator(".attempts")).to_have_text(re.compile(r"^2 of"))
        expect(detail.locator("#summary .badge")).to_have_text("succeeded", timeout=SLOW)
        assert wait_until_finished(client, tid)["state"] == "succeeded"
    survivor = next(w for w in workers if w.name != victim_name)
    busy = workers_page.locator(f'tr.worker-row[data-name="{survivor.name}"] .engine-busy')
    expect(busy).to_have_text(re.compile(r"^[1-9]\d*%$"), timeout=30_000)  # its model ran
    workers_page.context.close()


def test_a_submit_key_sees_only_its_own_transcriptions(farm, browser, made):
    server, keys, _ = farm
    other_key = server.create_key("submit")
    with server.client(other_key) as other:
        theirs = submit(other, b"these are meeting notes, not audio\n" * 50, "notes.txt")
        theirs = theirs.json()["id"]
        made["failed"] = theirs
        mine = made["speech"]
        assert other.get(f"/v1/transcriptions/{mine}").status_code == 404
        assert other.get(f"/v1/transcriptions/{mine}/transcript").status_code == 404
        assert mine not in other.get("/v1/transcriptions").text
        wait_until_finished(other, theirs)

    page = sign_in(browser, server, other_key)
    expect(page.locator("#rows a", has_text="notes.txt")).to_be_visible()
    expect(page.locator(f'#rows a[href="/transcriptions/{mine}"]')).to_have_count(0)
    expect(page.get_by_role("link", name="Workers")).to_have_count(0)  # admin pages
    for path in (f"/transcriptions/{mine}", f"/transcriptions/{mine}/transcript?format=srt"):
        response = page.goto(path)
        assert response.status == 404, path
        expect(page.get_by_role("heading", name="Not found")).to_be_visible()
    assert page.request.get(f"/transcriptions/{mine}/media", max_redirects=0).status == 404
    assert page.goto("/workers").status == 403
    page.context.close()


def test_the_form_asks_for_speakers_and_the_page_shows_them_live(browser, make_server, media):
    """Diarization asked for from the form; the board's merge clusters the voices a
    protocol worker reports (tests/integration/test_dashboard.py's conversation)."""
    # A board of its own (no real worker takes these jobs), started from a thread of its
    # own: Playwright's sync API keeps an event loop running in this one.
    with ThreadPoolExecutor(1) as thread:
        server = thread.submit(make_server).result()
    keys = {role: server.create_key(role) for role in ("submit", "worker")}
    page = sign_in(browser, server, keys["submit"])
    count = page.locator("#upload-speakers")
    expect(count).to_be_disabled()  # a count means nothing until speakers are told apart
    page.get_by_label("Tell speakers apart").first.check()
    expect(count).to_be_enabled()
    count.fill("3")
    page.get_by_label("Audio or video file").set_input_files(media.paragraphs((0,)))
    page.get_by_role("button", name="Upload and transcribe").click()
    page.wait_for_url(re.compile(r"/transcriptions/[0-9a-f-]{36}$"))

    worker = ProtocolWorker(server, keys["worker"])
    chunk_job, jobs = plan_conversation(worker)
    assert chunk_job["options"]["diarize"] is True and chunk_job["options"]["num_speakers"] == 3
    worker.complete(jobs[0], diarized_chunk(jobs[0]))
    expect(page.locator("#transcript .segment").first).to_contain_text("ann talks")
    expect(page.locator("#transcript .speaker-legend")).to_have_count(0)  # not before the merge
    for job in jobs[1:]:
        worker.complete(job, diarized_chunk(job))
    worker.close()

    legend = page.locator("#transcript .speaker-legend")  # live, no reload
    expect(legend.locator(".count")).to_have_text("3 speakers", timeout=SLOW)
    expect(page.locator("#summary .speaker-count")).to_have_text("3 speakers")
    expect(legend.locator("li")).to_have_text(
        ["S1 11.5 s · 43 %", "S2 6.5 s · 24 %", "S3 9.0 s · 33 %"]
    )
    turns = page.locator("#transcript .turn")
    expect(turns.locator("> .speaker-label")).to_have_text(["S1", "S2", "S1", "S3"])
    expect(turns.nth(1).locator(".segment")).to_have_count(2)
    colours = [colour_of(turns.nth(i).locator("> .speaker-label")) for i in range(4)]
    assert colours[0] == colours[2] and len({colours[0], colours[1], colours[3]}) == 3, colours
    assert colours[0] == colour_of(legend.locator("li .speaker-label").first)
    for width in WIDTHS:
        page.set_viewport_size({"width": width, "height": 900})
        shoot(page, width, "transcription-speakers")
    page.context.close()


def colour_of(label) -> str:
    return label.evaluate("element => getComputedStyle(element).backgroundColor")


@pytest.mark.parametrize("width", WIDTHS)
def test_screenshots_of_every_page(farm, browser, made, width):
    """Every page at a desktop and a phone width, saved for people to look at; none may
    need sideways scrolling."""
    server, keys, _ = farm
    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    page = open_page(browser, server, width)
    page.goto("/signin")
    shoot(page, width, "signin")
    page.context.close()
    page = sign_in(browser, server, keys["admin"], width)
    pages = {
        "transcriptions": "/",
        "transcription": f"/transcriptions/{made['speech']}",
        "transcription-taken-over": f"/transcriptions/{made['taken_over']}",
        "transcription-failed": f"/transcriptions/{made['failed']}",
        "workers": "/workers",
        "board": "/board",
    }
    for name, path in pages.items():
        page.goto(path)
        expect(page.locator("main h1")).to_be_visible()
        shoot(page, width, name)
    page.context.close()


def shoot(page: Page, width: int, name: str) -> None:
    page.screenshot(path=SCREENSHOTS / f"{name}-{width}.png", full_page=True)
    overflow = page.evaluate("document.documentElement.scrollWidth")
    assert overflow <= width, f"{name} is {overflow} px wide at {width} px"
