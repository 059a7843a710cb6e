"""The web dashboard: server-rendered pages, a little JavaScript, one live stream per
page. See docs/dashboard.md."""

from __future__ import annotations

from dataclasses import dataclass, field
from pathlib import Path

from fastapi import FastAPI
from fastapi.staticfiles import StaticFiles

from server.dashboard import events, pages
from server.dashboard.session import SessionKeys, SessionSigner

STATIC = Path(__file__).parent / "static"


@dataclass
class DashboardState:
    signer: SessionSigner
    keys: SessionKeys = field(default_factory=SessionKeys)


def install(app: FastAPI) -> None:
    app.include_router(pages.router)
    app.include_router(events.router)
    app.mount("/static", StaticFiles(directory=STATIC), name="static")
