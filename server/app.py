"""The FastAPI application: wires settings, the board, storage and the routers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

from fastapi import APIRouter, FastAPI
from fastapi.openapi.utils import get_openapi
from fastapi.routing import APIRoute

from server import autoscaler, dashboard, db, errors, maintenance, webhooks
from server.api import health, media, metrics, transcriptions, workers
from server.api import openai as openai_api
from server.api import webhooks as webhooks_api
from server.auth import KeyCache, RoleCheck
from server.board import JOBS_CHANNEL, Board, init_connection
from server.bodylimit import BodyLimit
from server.dashboard import DashboardState
from server.dashboard.events import OpenStreams
from server.dashboard.session import SessionSigner
from server.doorbell import Doorbell
from server.leadership import Leadership
from server.notifications import FinishedWaiter, Notifications
from server.probes import ProbeLimiter
from server.settings import Settings
from server.state import ServerState
from server.storage import LocalStorage, open_storage


def create_app(settings: Settings | None = None) -> FastAPI:
    settings = settings or Settings()
    state = ServerState(
        settings=settings,
        storage=open_storage(settings),
        keys=KeyCache(),
        probes=ProbeLimiter(settings.submissions_per_minute),
        dashboard=DashboardState(SessionSigner(settings.signing_secret)),
        open_streams=OpenStreams(),
    )

    @contextlib.asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        url = db.database_url(settings)
        await asyncio.to_thread(db.migrate, url)
        pool = await db.create_pool(url, settings.db_pool_size, init_connection)
        state.board = Board(pool, settings, state.storage)
        scaler = autoscaler.from_settings(state.board.reads, settings)  # None when off
        notifications = Notifications()
        state.doorbell = Doorbell()
        notifications.subscribe(JOBS_CHANNEL, state.doorbell.notified)
        state.finished = FinishedWaiter(notifications)
        sender = webhooks.WebhookSender(pool, settings, notifications)
        # Board-wide duties run on one replica at a time: the leader.
        duties = [lambda: maintenance.sweep(state.board, settings.poll_seconds)]
        if settings.retention_days:
            max_age = settings.retention_days * 86400
            duties.append(lambda: maintenance.expire(state.board, state.storage, max_age))
        if scaler:
            duties.append(scaler.run)
        state.leadership = Leadership(url, duties, settings.poll_seconds)
        background = [
            asyncio.create_task(notifications.run(url, settings.poll_seconds)),
            asyncio.create_task(
                maintenance.poll(state.board, state.doorbell, settings.poll_seconds)
            ),
            asyncio.create_task(sender.run()),
            asyncio.create_task(state.leadership.run()),
        ]
        try:
            yield
        finally:
            for task in background:
                task.cancel()
            await asyncio.gather(*background, return_exceptions=True)
            if scaler:
                await scaler.provider.close()
            await pool.close()

    app = FastAPI(
        title="scribefarm",
        version="0.1.0",
        summary="A distributed transcription farm",
        lifespan=lifespan,
    )
    app.state.server = state
    errors.install(app)
    # /v1/media serves the local backend only; with S3, workers read presigned URLs.
    local = isinstance(state.storage, LocalStorage)
    modules = (transcriptions, openai_api, webhooks_api, workers, media, health, metrics)
    served = [m for m in modules if local or m is not media]
    routers = [module.router for module in served]
    for router in routers:
        app.include_router(router)
    dashboard.install(app)  # the web pages at /: not in the API's schema
    app.add_middleware(BodyLimit, settings=settings)  # before parsing, before auth
    app.openapi = lambda: openapi_with_roles(app, routers)
    return app


def route_roles(route: APIRoute) -> list[str] | None:
    """The roles a route's RoleCheck admits, found in its dependency tree."""
    stack = list(route.dependant.dependencies)
    while stack:
        dep = stack.pop()
        if isinstance(dep.call, RoleCheck):
            return list(dep.call.roles)
        stack.extend(dep.dependencies)
    return None


def openapi_with_roles(app: FastAPI, routers: list[APIRouter]) -> dict:
    if app.openapi_schema is None:
        schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
        routes = [r for router in routers for r in router.routes if isinstance(r, APIRoute)]
        for route in routes:
            if roles := route_roles(route):  # a key is checked against the board: 503 too
                for method in route.methods:
                    operation = schema["paths"][route.path_format][method.lower()]
                    operation["x-scribefarm-roles"] = roles
                    operation["responses"].setdefault("503", errors.database_down_response())
                    if "requestBody" in operation:  # every body is capped (bodylimit.py)
                        operation["responses"].setdefault("413", errors.body_too_large_response())
        app.openapi_schema = schema
    return app.openapi_schema
