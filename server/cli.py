"""The `scribefarm` command. Imports stay inside the commands, so a worker image (which
lacks the server's dependencies) can still run `scribefarm worker`."""

from __future__ import annotations

import asyncio
import os
from datetime import UTC, datetime, timedelta
from enum import StrEnum
from typing import Annotated

import typer

app = typer.Typer(no_args_is_help=True, help="scribefarm: a distributed transcription farm.")
keys_app = typer.Typer(no_args_is_help=True, help="Manage API keys.")
app.add_typer(keys_app, name="keys")


class Role(StrEnum):
    submit = "submit"
    worker = "worker"
    admin = "admin"


@app.command()
def server(
    host: Annotated[str, typer.Option(help="Address to listen on.")] = "127.0.0.1",
    port: Annotated[int, typer.Option(help="Port to listen on.")] = 8000,
) -> None:
    """Run the board's HTTP server (API, worker protocol, dashboard)."""
    import uvicorn

    from server import logs
    from server.app import create_app
    from server.settings import Settings

    settings = Settings()
    logs.configure(settings.log_format, settings.log_level)
    uvicorn.run(create_app(settings), host=host, port=port, log_config=None, access_log=False)


@app.command()
def worker(
    server: Annotated[str, typer.Option(envvar="SCRIBEFARM_SERVER", help="The board's URL.")],
    key: Annotated[str, typer.Option(envvar="SCRIBEFARM_KEY", help="A worker API key.")],
    engine: Annotated[str, typer.Option(envvar="SCRIBEFARM_ENGINE")] = "faster-whisper",
    model: Annotated[
        str | None,
        typer.Option(envvar="SCRIBEFARM_MODEL", help="Model name or local path [tiny.en]."),
    ] = None,
    device: Annotated[
        str, typer.Option(envvar="SCRIBEFARM_DEVICE", help="auto, cpu or cuda.")
    ] = "auto",
    threads: Annotated[
        int, typer.Option(envvar="SCRIBEFARM_THREADS", help="CPU threads (0: all).")
    ] = 0,
    batch_size: Annotated[int, typer.Option(envvar="SCRIBEFARM_BATCH_SIZE", min=1)] = 8,
    name: Annotated[str | None, typer.Option(envvar="SCRIBEFARM_WORKER_NAME")] = None,
    exit_when_idle: Annotated[
        float | None,
        typer.Option(envvar="SCRIBEFARM_EXIT_WHEN_IDLE", help="Exit after this many idle seconds."),
    ] = None,
    max_jobs: Annotated[int | None, typer.Option(envvar="SCRIBEFARM_MAX_JOBS", min=1)] = None,
) -> None:
    """Pull jobs from a board and run them until stopped (SIGTERM: finish, then exit 0)."""
    from server import logs
    from worker.runner import Worker, WorkerConfig

    logs.configure(os.environ.get("SCRIBEFARM_LOG_FORMAT", "auto"))
    config = WorkerConfig(
        server=server,
        key=key,
        engine=engine,
        model=model,
        device=device,
        threads=threads,
        batch_size=batch_size,
        exit_when_idle=exit_when_idle,
        max_jobs=max_jobs,
    )
    if name:
        config.name = name
    raise typer.Exit(asyncio.run(Worker(config).run()))


@app.command()
def migrate() -> None:
    """Apply the schema migrations to the board's database."""
    from server import db
    from server.settings import Settings

    db.migrate(db.database_url(Settings()))
    typer.echo("the board's schema is up to date")


@keys_app.command("create")
def keys_create(
    role: Annotated[Role, typer.Option(help="submit, worker or admin.")],
    name: Annotated[str, typer.Option(help="A label to tell keys apart.")] = "",
    expires_in_days: Annotated[float | None, typer.Option(min=0.001)] = None,
) -> None:
    """Create an API key. The key is shown once, alone on the last line."""
    key = asyncio.run(create_key(role.value, name or role.value, expires_in_days))
    typer.echo(f"created a {role.value} key; it is shown only now, store it safely:")
    typer.echo(key)


async def create_key(role: str, name: str, expires_in_days: float | None) -> str:
    from server import db
    from server.auth import hash_key, new_key
    from server.board import Board, init_connection
    from server.settings import Settings

    settings = Settings()
    url = db.database_url(settings)
    await asyncio.to_thread(db.migrate, url)
    pool = await db.create_pool(url, 1, init_connection)
    try:
        key = new_key()
        expires = None
        if expires_in_days is not None:
            expires = datetime.now(UTC) + timedelta(days=expires_in_days)
        await Board(pool, settings).create_key(name, role, hash_key(key), key[:10], expires)
        return key
    finally:
        await pool.close()
