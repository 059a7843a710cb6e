"""Benchmarks: each measures the farm against the tool a user would otherwise run and
records its figures in bench/RESULTS.md. Shared pieces, by concern: machine.py (the
machine and its quiet), harness.py (a real farm), memory.py (workers' memory),
phases.py (where the time goes, from the board's rows), results.py (RESULTS.md)."""

from __future__ import annotations

from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def log(message: str) -> None:
    print(message, flush=True)
