"""No import circles among the project's modules (issue 14).

A circle breaks only when one of its modules happens to be imported first (server.errors
once was: through the board package and storage, back to itself), so the suite's own
import order never shows it. This reads every module's imports as Python runs them (at
module level, not under `if TYPE_CHECKING`, not inside functions) and looks for a circle.
Importing `a.b.c` runs package `a.b` first, unless the importer is inside `a.b` already.
"""

from __future__ import annotations

import ast
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("server", "worker", "shared")


def modules() -> dict[str, Path]:
    found = {}
    for package in PACKAGES:
        for path in (ROOT / package).rglob("*.py"):
            parts = path.relative_to(ROOT).with_suffix("").parts
            found[".".join(parts[:-1] if parts[-1] == "__init__" else parts)] = path
    return found


def run_time_imports(tree: ast.Module) -> list[ast.Import | ast.ImportFrom]:
    """The import statements at module level, those in try/else/if blocks included, but
    not those only type checkers see."""
    found, pending = [], list(tree.body)
    while pending:
        node = pending.pop()
        if isinstance(node, ast.Import | ast.ImportFrom):
            found.append(node)
        elif isinstance(node, ast.If) and "TYPE_CHECKING" in ast.unparse(node.test):
            pending += node.orelse
        elif isinstance(node, ast.If | ast.Try):
            pending += node.body + node.orelse + getattr(node, "finalbody", [])
            pending += [n for handler in getattr(node, "handlers", []) for n in handler.body]
    return found


def imported(name: str, node: ast.Import | ast.ImportFrom, known: dict[str, Path]) -> set[str]:
    """The project modules a statement of module `name` runs."""
    if isinstance(node, ast.Import):
        targets = [alias.name for alias in node.names]
    else:
        package = name if known[name].name == "__init__.py" else name.rpartition(".")[0]
        base = node.module or ""
        if node.level:
            base = ".".join(package.split(".")[: len(package.split(".")) - node.level + 1] + [base])
        base = base.strip(".")
        targets = [base] + [f"{base}.{alias.name}" for alias in node.names]
    runs = set()
    for target in targets:
        parts = target.split(".")
        for i in range(1, len(parts) + 1):  # a module runs its packages first
            module = ".".join(parts[:i])
            if module in known and not (name + ".").startswith(module + "."):
                runs.add(module)
    runs.discard(name)
    return runs


def graph() -> dict[str, set[str]]:
    known = modules()
    return {
        name: set().union(
            *(imported(name, n, known) for n in run_time_imports(ast.parse(p.read_text())))
        )
        for name, p in known.items()
    }


def circle_from(start: str, edges: dict[str, set[str]]) -> list[str] | None:
    path, on_path, done = [start], {start}, set()

    def visit(node: str) -> list[str] | None:
        for nxt in sorted(edges[node]):
            if nxt in on_path:
                return path[path.index(nxt) :] + [nxt]
            if nxt not in done:
                path.append(nxt)
                on_path.add(nxt)
                if circle := visit(nxt):
                    return circle
                on_path.discard(path.pop())
                done.add(nxt)
        return None

    return visit(start)


def test_no_module_imports_itself_through_others():
    edges = graph()
    assert len(edges) > 60 and "server.board" in edges["server.errors"]
    circles = [c for name in sorted(edges) if (c := circle_from(name, edges))]
    assert circles == [], " -> ".join(circles[0])
