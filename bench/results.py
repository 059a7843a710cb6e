"""bench/RESULTS.md: each benchmark's section, with the run's header and verdicts."""

from __future__ import annotations

import argparse
import statistics
import sys
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

from bench import ROOT
from bench.machine import load_average, machine_info, wait_until_quiet

RESULTS = ROOT / "bench" / "RESULTS.md"


def bench_parser(description: str, quick: str, quiet_timeout: float) -> argparse.ArgumentParser:
    """A benchmark's command line, with what every one takes: --quick (`quick`, and
    RESULTS.md untouched), --no-record and --quiet-timeout."""
    p = argparse.ArgumentParser(
        description=description, formatter_class=argparse.RawTextHelpFormatter
    )
    p.add_argument("--quick", action="store_true", help=f"{quick}; RESULTS.md untouched")
    p.add_argument("--no-record", action="store_true", help="print only")
    p.add_argument(
        "--quiet-timeout",
        type=float,
        default=quiet_timeout,
        help="seconds to wait for a quiet machine (0: do not wait)",
    )
    return p


def recorded(args: argparse.Namespace) -> bool:
    """Whether the run writes its section of RESULTS.md."""
    return not (args.quick or args.no_record)


def run_options(args: argparse.Namespace) -> dict[str, Any]:
    """What `run` reads from a benchmark's options, as `bench_parser`'s command line
    gave them."""
    return {"quiet_timeout": args.quiet_timeout, "record": recorded(args)}


def write_section(title: str, body: str) -> None:
    """Replaces the section headed `title` (or appends it), keeping every other
    section, and any '### Analysis' written by hand at the end of this one."""
    header = "# Benchmark results\n\nFigures recorded by the benchmarks in `bench/`.\n"
    text = RESULTS.read_text() if RESULTS.exists() else header
    section = f"{title}\n\n{body.rstrip()}\n"
    start = text.find(title + "\n")
    if start < 0:
        RESULTS.write_text(text.rstrip("\n") + "\n\n" + section)
        return
    following = text.find("\n## ", start + len(title))
    end = len(text) if following < 0 else following + 1
    old = text[start:end]
    analysis = old.find("\n### Analysis")
    if analysis >= 0:
        section += old[analysis:].rstrip("\n") + "\n"
    tail = text[end:]
    RESULTS.write_text(text[:start] + section + ("\n" + tail if tail else ""))


def publish(title: str, section: str, record: bool) -> None:
    """Prints a benchmark's report and, unless asked not to, records it."""
    print(f"\n{title}\n\n{section}")
    if record:
        write_section(title, section)
        print("recorded in bench/RESULTS.md")
    else:
        print("(--quick/--no-record: bench/RESULTS.md left as it was)")


# The head of a report's targets table: one row per target follows.
TARGETS_HEADER = ["", "### Targets", "", "| target | measured | |", "|---|---|---|"]


def verdict(met: bool) -> str:
    return "met" if met else "**not met**"


def seconds_list(values: list[float]) -> str:
    """The median in bold, then every run."""
    return f"**{statistics.median(values):.2f}** ({', '.join(f'{v:.2f}' for v in values)})"


def header_lines(info: dict[str, str], command: str, load_start: str, quiet: bool) -> list[str]:
    caveat = "" if quiet else " (**the machine never got quiet**: other work shared the cores)"
    return [
        f"Run {info['date']} at commit {info['commit']}: {info['cpus']} × {info['cpu']}, "
        f"{info['ram']} RAM, Python {info['python']}; load average (1, 5, 15 min) "
        f"{load_start} at start, {load_average()} at the end (this benchmark's own work "
        f"included){caveat}.",
        f"Command: `{command}`",
    ]


def command_line() -> str:
    return ".venv/bin/python -m " + " ".join(
        [Path(sys.argv[0]).with_suffix("").relative_to(ROOT).as_posix().replace("/", ".")]
        + sys.argv[1:]
    )


def run(
    section: str, options: Any, measure: Callable[[Any, Path], Any], report: Callable[..., str]
):
    """A benchmark's whole run: waits for a quiet machine (`options.quiet_timeout`),
    measures in a scratch folder, reports, and records unless `options.record` is off."""
    quiet = wait_until_quiet(options.quiet_timeout, enabled=options.quiet_timeout > 0)
    load_start, info = load_average(), machine_info()
    with tempfile.TemporaryDirectory(prefix="scribefarm-bench-") as work:
        results = measure(options, Path(work))
    publish(section, report(results, info, load_start, quiet), options.record)
