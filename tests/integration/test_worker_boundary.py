"""The worker image installs only the `worker` extra: nothing a worker runs may need the
server's packages (issue 14). A worker process with those packages made unimportable
imports every worker module and answers `scribefarm worker --help`; one server-only
import in a module both sides share (shared/protocol.py, say) fails this test."""

from __future__ import annotations

import subprocess
import sys
import textwrap
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
SERVER_ONLY = ("fastapi", "starlette", "uvicorn", "asyncpg", "sqlalchemy", "sqlmodel")
SERVER_ONLY += ("alembic", "obstore", "jinja2")
# Every module of the worker (the whisperx engine needs its own environment: its
# imports are checked there, in tests/integration/test_whisperx.py).
WORKER_MODULES = [f"worker.{path.stem}" for path in sorted((ROOT / "worker").glob("[!_]*.py"))] + [
    "worker.engines",
    "worker.engines.faster_whisper",
]

WORKER_WITHOUT_SERVER_PACKAGES = textwrap.dedent(
    """
    import importlib, importlib.abc, sys

    class ServerOnly(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] in {blocked!r}:
                raise ImportError(f"{{name}} is a server package, not in the worker extra")

    sys.meta_path.insert(0, ServerOnly())
    for module in {modules!r}:
        importlib.import_module(module)
    sys.argv = ["scribefarm", "worker", "--help"]
    from server.cli import app
    app()
    """
)


def test_the_worker_runs_without_the_servers_packages():
    script = WORKER_WITHOUT_SERVER_PACKAGES.format(blocked=SERVER_ONLY, modules=WORKER_MODULES)
    result = subprocess.run(
        [sys.executable, "-c", script], cwd=ROOT, capture_output=True, text=True, timeout=120
    )
    assert result.returncode == 0, result.stderr[-3000:]
    assert "--server" in result.stdout and "--url-allowlist" in result.stdout
