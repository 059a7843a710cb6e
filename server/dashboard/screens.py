"""The dashboard's screens: what each page loads from the board, and the parts of it
(fragments) its live stream sends again when they change."""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, get_args
from urllib.parse import urlencode
from uuid import UUID

from fastapi import Request
from fastapi.templating import Jinja2Templates

from server.api.transcriptions import decode_cursor, encode_cursor
from server.dashboard import views
from server.dashboard.session import Viewer
from server.errors import ApiError
from server.state import server_state
from shared.protocol import TranscriptionState

templates = Jinja2Templates(directory=Path(__file__).parent / "templates")
templates.env.globals.update(clock=views.clock, number=views.number, formats=views.DOWNLOAD_FORMATS)

PAGE_SIZE = 50
WORKERS_SHOWN_SECONDS = 86400.0  # gone workers stay listed for a day
THROUGHPUT_SECONDS = 300.0  # "× realtime over the last minutes"
HISTORY_MINUTES = 60
DEAD_JOBS_SHOWN = 50
STATES = get_args(TranscriptionState)

Loader = Callable[[Request, Viewer, Mapping[str, str], dict[str, Any]], Awaitable[dict[str, Any]]]


@dataclass(frozen=True)
class Screen:
    template: str
    fragments: tuple[str, ...]  # element ids; each is rendered by templates/_<id>.html
    tick_seconds: float
    admin_only: bool
    load: Loader


def render_fragments(screen: Screen, context: dict[str, Any]) -> dict[str, str]:
    return {
        name: templates.get_template(f"_{name}.html").render(context) for name in screen.fragments
    }


def like_escaped(text: str) -> str:
    return text.replace("\\", "\\\\").replace("%", "\\%").replace("_", "\\_")


async def load_transcriptions(
    request: Request, viewer: Viewer, params: Mapping[str, str], memo: dict[str, Any]
) -> dict[str, Any]:
    state = params.get("state") or None
    if state not in (None, *STATES):
        raise ApiError(422, "invalid_request", f"state: one of {', '.join(STATES)}")
    search = (params.get("q") or "").strip()[:200]
    cursor = params.get("cursor") or None
    rows = await server_state(request).board.reads.transcriptions(
        viewer.owner_filter,
        state,
        like_escaped(search) or None,
        decode_cursor(cursor),
        PAGE_SIZE + 1,
    )
    page = rows[:PAGE_SIZE]
    query = {"state": state or "", "q": search, "cursor": cursor or ""}
    return {
        "here": "/?" + urlencode({k: v for k, v in query.items() if v}),
        "transcriptions": [views.TranscriptionView(row) for row in page],
        "state": state or "",
        "states": STATES,
        "default_chunk_seconds": int(server_state(request).settings.default_chunk_seconds),
        "q": search,
        "cursor": cursor,
        "next_cursor": encode_cursor(page[-1]) if len(rows) > PAGE_SIZE else None,
    }


async def load_transcription(
    request: Request, viewer: Viewer, params: Mapping[str, str], memo: dict[str, Any]
) -> dict[str, Any]:
    try:
        transcription_id = UUID(params.get("id", ""))
    except ValueError as exc:
        raise ApiError(404, "not_found", "no such transcription") from exc
    board = server_state(request).board
    row = await board.reads.transcription(transcription_id, viewer.owner_filter)
    planners, chunks = views.chunk_views(row)
    return {
        "here": f"/transcriptions/{transcription_id}",
        "t": views.TranscriptionView(row),
        "planning": planners[0] if planners else None,
        "spans": len(planners),
        "chunks": chunks,
        "marks": views.time_marks(row["duration_seconds"]),
        **await transcript(board, row, memo),
        "failed": [c for c in (*planners, *chunks) if c.job["state"] == "dead"],
    }


async def transcript(board: Any, row: Any, memo: dict[str, Any]) -> dict[str, Any]:
    """The merged transcript once it succeeded, else the finished chunks' segments (no
    speakers until the merge: only it clusters the voices); read again only when the
    transcription has moved on (a stream's ticks stay one query)."""
    version = (row["state"], row["jobs_done"])
    if memo.get("version") != version:
        if row["state"] == "succeeded":
            document = await board.transcriptions.transcript_document(row["id"], None)
            segments, speakers = document["segments"], document.get("speakers") or []
        else:
            segments = views.live_segments(await board.reads.chunk_results(row["id"]))
            speakers = []
        memo.update(version=version, transcript=shown_transcript(segments, speakers))
    return memo["transcript"]


def shown_transcript(segments: list[dict], speakers: list[dict]) -> dict[str, Any]:
    """What the transcript and the summary show: with speakers, their legend and turns."""
    legend = views.speaker_views(speakers)
    turns = views.speaker_turns(segments, legend) if legend else []
    return {"segments": segments, "speakers": legend, "turns": turns}


async def load_workers(
    request: Request, viewer: Viewer, params: Mapping[str, str], memo: dict[str, Any]
) -> dict[str, Any]:
    state = server_state(request)
    rows = await state.board.reads.workers(WORKERS_SHOWN_SECONDS, THROUGHPUT_SECONDS)
    gone = state.settings.worker_gone_seconds
    workers = [views.WorkerView(row, gone, THROUGHPUT_SECONDS) for row in rows]
    return {
        "workers": workers,
        "counts": {s: sum(w.state == s for w in workers) for s in ("busy", "idle", "gone")},
        "throughput_minutes": int(THROUGHPUT_SECONDS // 60),
    }


async def load_board(
    request: Request, viewer: Viewer, params: Mapping[str, str], memo: dict[str, Any]
) -> dict[str, Any]:
    row = await server_state(request).board.reads.board(HISTORY_MINUTES, DEAD_JOBS_SHOWN)
    audio, depth = views.history_charts(row["history"])
    return {
        "counts": views.job_counts(row["counts"]),
        "states": views.COUNTED_STATES,
        "audio_chart": audio,
        "depth_chart": depth,
        "minutes": HISTORY_MINUTES,
        "dead": [{**job, "ago": views.ago(job["seconds_ago"])} for job in row["dead"]],
    }


SCREENS = {
    "transcriptions": Screen("transcriptions.html", ("rows",), 1.0, False, load_transcriptions),
    "transcription": Screen(
        "transcription.html", ("summary", "timeline", "transcript"), 1.0, False, load_transcription
    ),
    "workers": Screen("workers.html", ("worker-rows",), 2.0, True, load_workers),
    "board": Screen("board.html", ("job-counts", "charts", "dead-jobs"), 2.0, True, load_board),
}
