"""Logging for ``aiki server`` and ``aiki worker``: text for people, JSON lines for machines.

Every line about a run carries ``run_id``, ``workflow``, ``version``, ``attempt`` and
``worker_id``: the worker's Run actor sets them once in a context variable
(:func:`bind_run`), which every task it starts inherits, and :class:`RunFields` copies them
onto each record; a server line about a run passes them itself (``extra=run_fields(...)``).
Stdlib logging only: a formatter per format, no new dependency.
"""

from __future__ import annotations

import contextvars
import datetime
import json
import logging
import sys
from collections.abc import Mapping
from typing import Any, TextIO

RUN_KEYS = ("run_id", "workflow", "version", "attempt", "worker_id")
FORMATS = ("text", "json", "auto")

_RUN: contextvars.ContextVar[Mapping[str, Any] | None] = contextvars.ContextVar(
    "aiki_log_run", default=None)


def run_fields(run_id: str, workflow: str, version: str, attempt: int,
               worker_id: str | None) -> dict[str, Any]:
    return {"run_id": run_id, "workflow": workflow, "version": version, "attempt": attempt,
            "worker_id": worker_id}


def bind_run(run_id: str, workflow: str, version: str, attempt: int,
             worker_id: str | None) -> None:
    """Tag every log line of the current task (and the tasks it starts) with this run."""
    _RUN.set(run_fields(run_id, workflow, version, attempt, worker_id))


class RunFields(logging.Filter):
    """Copies the bound run's fields onto a record that does not carry them already."""

    def filter(self, record: logging.LogRecord) -> bool:
        bound = _RUN.get()
        if bound is not None and not hasattr(record, "run_id"):
            for key, value in bound.items():
                setattr(record, key, value)
        return True


class JsonFormatter(logging.Formatter):
    """One JSON object per line: time (ISO 8601, UTC), level, logger, message, the run's
    fields when the line is about a run, and the traceback if any."""

    def format(self, record: logging.LogRecord) -> str:
        line: dict[str, Any] = {
            "time": datetime.datetime.fromtimestamp(record.created, datetime.UTC)
            .isoformat(timespec="milliseconds").replace("+00:00", "Z"),
            "level": record.levelname.lower(),
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in RUN_KEYS:
            if hasattr(record, key):
                line[key] = getattr(record, key)
        if record.exc_info:
            line["exception"] = self.formatException(record.exc_info)
        return json.dumps(line, default=str)


class TextFormatter(logging.Formatter):
    """``time level logger: message``, then ``run_id=... workflow=...`` for a line about a
    run."""

    def __init__(self) -> None:
        super().__init__("%(asctime)s %(levelname)-7s %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        text = super().format(record)
        fields = [f"{key}={getattr(record, key)}" for key in RUN_KEYS if hasattr(record, key)]
        if not fields:
            return text
        first, nl, rest = text.partition("\n")
        return f"{first} [{' '.join(fields)}]{nl}{rest}"


def resolve_format(fmt: str, stream: TextIO) -> str:
    """``auto``: text on a terminal, JSON lines otherwise (a container's log collector)."""
    if fmt not in FORMATS:
        raise ValueError(f"log format must be one of {', '.join(FORMATS)}, got {fmt!r}")
    if fmt != "auto":
        return fmt
    return "text" if stream.isatty() else "json"


def setup(level: str = "info", fmt: str = "text", stream: TextIO | None = None) -> str:
    """Send the root logger's records to ``stream`` (stderr) in ``fmt``; the format used."""
    stream = stream if stream is not None else sys.stderr
    used = resolve_format(fmt, stream)
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter() if used == "json" else TextFormatter())
    handler.addFilter(RunFields())
    root = logging.getLogger()
    for old in list(root.handlers):
        root.removeHandler(old)
    root.addHandler(handler)
    root.setLevel(getattr(logging, level.upper()))
    if level != "debug":
        logging.getLogger("trio-websocket").setLevel(logging.WARNING)
    return used
