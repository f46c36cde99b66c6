"""The ``aiki`` command.

- ``aiki server``: the server process (store, WebSocket listener, SIGINT/SIGTERM shutdown);
- ``aiki worker --app module:attr``: a worker process for the workflows ``attr`` names;
- ``aiki runs list | show ID``, ``aiki workers``, ``aiki enqueue NAME``: a client;
- ``aiki demo``: the embedded crash-and-resume demo.

Client and worker commands find the server with ``--server`` (default ``$AIKI_SERVER`` or
``ws://127.0.0.1:9090``) and the token with ``--token-file`` (default ``$AIKI_TOKEN``). Every
flag can also be set from ``AIKI_<FLAG>`` (``--lease-ttl`` from ``AIKI_LEASE_TTL``); a flag
given on the command line wins. Seconds may be written ``30``, ``30s``, ``5m``, ``2h``, ``1d``.
Read commands print tables (``rich``: colour on a terminal, plain text when piped) or, with
``--output json``, JSON; times are ISO 8601 with the local timezone (``--utc`` for UTC).
Errors are one line on stderr and exit status 1.
"""

from __future__ import annotations

import argparse
import datetime
import importlib
import io
import json
import logging
import os
import re
import signal
import sys
from collections.abc import Sequence
from functools import partial
from pathlib import Path
from typing import Any

import attrs
import trio

DEFAULT_SERVER = "ws://127.0.0.1:9090"
SERVER_VARIABLE = "AIKI_SERVER"
TOKEN_VARIABLE = "AIKI_TOKEN"
ENV_PREFIX = "AIKI_"

log = logging.getLogger("aiki.cli")


class UsageError(Exception):
    """A command-line mistake: printed as one line, exit status 2."""


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    args = parser.parse_args(argv)
    _setup_logging(args.log_level, getattr(args, "log_format", "text"))
    name = " ".join(filter(None, [args.command, getattr(args, "runs_command", None)]))
    from aiki.errors import AikiError

    try:
        return int(args.run(args) or 0)
    except BaseException as exc:
        cause = root_cause(exc)
        if isinstance(cause, BrokenPipeError):  # e.g. `aiki runs show ID | head`
            os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
            return 141
        if isinstance(cause, UsageError):
            print(f"aiki {name}: {cause}", file=sys.stderr)
            return 2
        if isinstance(cause, (AikiError, OSError, TimeoutError, ValueError)):
            print(f"aiki {name}: error: {cause}", file=sys.stderr)
            return 1
        if isinstance(cause, KeyboardInterrupt):
            return 130
        raise


def root_cause(exc: BaseException) -> BaseException:
    """What went wrong, through Trio's one-exception groups and supervisor escalations."""
    from aiki.actors.supervisor import SupervisorEscalation

    while True:
        if isinstance(exc, BaseExceptionGroup) and len(exc.exceptions) == 1:
            exc = exc.exceptions[0]
        elif isinstance(exc, SupervisorEscalation):
            exc = exc.first_failure
        else:
            return exc


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="aiki", description="Durable workflows on Trio.")
    parser.add_argument("--version", action="version", version=f"aiki {_version()}")
    commands = parser.add_subparsers(dest="command", required=True, metavar="COMMAND")

    def command(name: str, help: str, run: Any, log_level: str = "warning",
                parent: Any = commands) -> argparse.ArgumentParser:
        sub: argparse.ArgumentParser = parent.add_parser(name, help=help, description=help)
        sub.set_defaults(run=run)
        sub.add_argument("--log-level", default=log_level,
                         choices=["debug", "info", "warning", "error"],
                         help=f"what to log on stderr (default: {log_level})")
        return sub

    demo = command("demo", "run the order-processing demo: a worker crashes, another resumes",
                   _demo)
    demo.add_argument("--store-path", help="SQLite file to use (default: a new temp file)")

    server = command("server", "run the Aiki server", _server, "info")
    server.add_argument("--listen", default="127.0.0.1:9090", metavar="HOST:PORT",
                        help="address to listen on; port 0 picks a free one; any address "
                             "but loopback needs a token (default: 127.0.0.1:9090)")
    server.add_argument("--store", default="sqlite:///aiki.db", metavar="URL",
                        help="sqlite:///path.db, sqlite:////abs/path.db or memory "
                             "(default: sqlite:///aiki.db)")
    _token_option(server)
    server.add_argument("--cert", metavar="PEM", help="TLS certificate (chain): serve wss://")
    server.add_argument("--key", metavar="PEM", help="the certificate's private key")
    server.add_argument("--lease-ttl", type=_seconds, default=30.0, metavar="S",
                        help="seconds a worker holds a run without heartbeating (default 30)")
    server.add_argument("--heartbeat-interval", type=_seconds, metavar="S",
                        help="how often workers heartbeat (default: a third of --lease-ttl)")
    server.add_argument("--poll-interval", type=_seconds, default=None, metavar="S",
                        help="with a store shared by several servers (PostgreSQL): how often "
                             "to look for work no notification told of (default 30)")
    server.add_argument("--retention", type=_seconds, default=None, metavar="S",
                        help="delete finished runs (and their history) this long after they "
                             "finished, in small batches (default: keep them for ever)")
    server.add_argument("--stranded-after", type=_seconds, default=60.0, metavar="S",
                        help="a run queued this long for a version no connected worker has "
                             "is stranded: listed and warned of (default 1m)")
    server.add_argument("--shutdown-grace", type=_seconds, default=10.0, metavar="S",
                        help="seconds to finish requests in flight on SIGTERM (default 10)")
    server.add_argument("--hello-timeout", type=_seconds, default=10.0, metavar="S",
                        help="drop a connection that has not handshaken and said hello "
                             "within S seconds (default 10)")
    _observability_options(server, 9464)
    _transport_options(server)
    _gc_option(server)

    worker = command("worker", "run a worker for the workflows of an app", _worker, "info")
    worker.add_argument("--app", required=True, metavar="MODULE:ATTR",
                        help="the workflows to run: an @aiki.workflow or a list of them, "
                             "e.g. myapp.workflows:workflows (imported from the current "
                             "directory too)")
    _client_options(worker)
    worker.add_argument("--concurrency", type=_positive_int, default=8, metavar="N",
                        help="runs at once (default 8)")
    worker.add_argument("--id", help="worker id (default: worker-<random>); unique per worker")
    worker.add_argument("--grace", type=_seconds, default=30.0, metavar="S",
                        help="on SIGTERM, seconds for tasks in flight to finish (default 30)")
    worker.add_argument("--inline-retry-max", type=_seconds, default=10.0, metavar="S",
                        help="retry delays up to this are waited in the worker (default 10)")
    worker.add_argument("--task-threads", type=_positive_int, default=16, metavar="N",
                        help="plain-def tasks run in threads, at most N at once (default 16)")
    worker.add_argument("--record-start-after", type=_seconds_or_zero, default=0.0,
                        metavar="S",
                        help="record a task attempt's start only once it has run S seconds: "
                             "one write less per short task, but a short task may run again "
                             "from a stale lease (default 0: every start recorded first)")
    _observability_options(worker, 9465)
    _transport_options(worker)
    _gc_option(worker)

    runs = commands.add_parser("runs", help="list runs or show one", description="runs")
    runs_commands = runs.add_subparsers(dest="runs_command", required=True, metavar="COMMAND")
    runs_list = command("list", "the newest runs", _runs_list, parent=runs_commands)
    _client_options(runs_list)
    runs_list.add_argument("--workflow", help="only runs of this workflow")
    runs_list.add_argument("--state", help="only runs in this state (queued, running, "
                                           "waiting, paused, completed, failed, cancelled)")
    runs_list.add_argument("--limit", type=_positive_int, default=50, metavar="N",
                           help="at most N runs, newest first (default 50, at most 1000)")
    runs_list.add_argument("--stranded", action="store_true",
                           help="only stranded runs: queued for a workflow version no "
                                "connected worker has registered, for over a minute")
    _read_options(runs_list)
    runs_show = command("show", "a run: state, result, tasks and history", _runs_show,
                        parent=runs_commands)
    _client_options(runs_show)
    runs_show.add_argument("run_id", metavar="ID")
    _read_options(runs_show)
    runs_purge = command("purge", "delete runs that finished before a date", _runs_purge,
                         parent=runs_commands)
    _client_options(runs_purge)
    runs_purge.add_argument("--before", required=True, type=_moment, metavar="DATE",
                            help="ISO 8601 date or time (local time unless it says its zone),"
                                 " e.g. 2026-11-01 or 2026-11-01T12:00+01:00")
    runs_wakeup = command("wakeup", "end a run's current sleep early", _runs_wakeup,
                          parent=runs_commands)
    _client_options(runs_wakeup)
    runs_wakeup.add_argument("run_id", metavar="ID")
    runs_cancel = command("cancel", "cancel a run (its workflow may compensate first)",
                          _runs_cancel, parent=runs_commands)
    _client_options(runs_cancel)
    runs_cancel.add_argument("run_id", metavar="ID")
    runs_cancel.add_argument("--reason", metavar="TEXT", help="why (kept with the run, and "
                             "raised to whoever waits for it)")
    runs_cancel.add_argument("--grace", type=_seconds_or_zero, default=60.0, metavar="S",
                             help="how long its workflow may compensate in run.shield() "
                                  "(e.g. 30s, 5m; default 60s; 0: none)")
    runs_send = command("send", "send an event to a run", _runs_send, parent=runs_commands)
    _client_options(runs_send)
    runs_send.add_argument("run_id", metavar="ID")
    runs_send.add_argument("event", metavar="EVENT", help="the event's name")
    runs_send.add_argument("--payload", default="null", metavar="JSON",
                           help="the event's value as JSON (default: null)")
    runs_send.add_argument("--key", metavar="KEY",
                           help="an idempotency key: a second send with KEY stores nothing")

    runs_retry = command("retry", "queue a failed run again, its completed steps kept",
                         _runs_retry, parent=runs_commands)
    _client_options(runs_retry)
    runs_retry.add_argument("run_id", metavar="ID")
    runs_retry.add_argument("--version", help="re-pin the run to this version of its "
                                              "workflow (a fix deployed as a new version)")
    runs_pause = command("pause", "pause a run at its next step boundary (a task in flight "
                                  "finishes; a waiting run keeps its waits)", _runs_pause,
                         parent=runs_commands)
    _client_options(runs_pause)
    runs_pause.add_argument("run_id", metavar="ID")
    runs_resume = command("resume", "resume a paused run", _runs_resume,
                          parent=runs_commands)
    _client_options(runs_resume)
    runs_resume.add_argument("run_id", metavar="ID")
    runs_fork = command("fork", "a new run whose first N steps are copied from a run; the "
                                "rest run fresh", _runs_fork, parent=runs_commands)
    _client_options(runs_fork)
    runs_fork.add_argument("run_id", metavar="ID")
    runs_fork.add_argument("--from-step", required=True, type=_whole, metavar="N",
                           help="how many of the run's steps to copy, in step order (as "
                                "`aiki runs show` lists them)")
    runs_fork.add_argument("--version", help="run the fork on this version of the workflow")
    _read_options(runs_fork)
    runs_export = command("export", "a run's history as JSON (format aiki.run/1), for "
                                    "aiki.testing.replay", _runs_export, parent=runs_commands)
    _client_options(runs_export)
    runs_export.add_argument("run_id", metavar="ID")

    replay = command("replay", "the deploy gate: replay the server's runs against new code, "
                               "running no task; exits 1 if any diverges", _replay)
    _client_options(replay)
    replay.add_argument("--app", required=True, metavar="MODULE:ATTR",
                        help="the new code's workflows, as for aiki worker")
    replay.add_argument("--limit", type=_positive_int, default=200, metavar="N",
                        help="at most N runs per workflow, newest first (default 200, at "
                             "most 1000); every unfinished one among them")
    replay.add_argument("--since", type=_seconds, default=7 * 86400.0, metavar="S",
                        help="finished runs only if they finished within S seconds "
                             "(default 7 days)")

    workers = command("workers", "the connected workers", _workers)
    _client_options(workers)
    _read_options(workers)

    enqueue = command("enqueue", "start a run of a workflow", _enqueue)
    _client_options(enqueue)
    enqueue.add_argument("workflow", metavar="NAME")
    enqueue.add_argument("--version", help="workflow version (default: the newest a "
                                           "connected worker registered)")
    enqueue.add_argument("--payload", default="null", metavar="JSON",
                         help="the run's input as JSON (default: null)")
    enqueue.add_argument("--idempotency-key", metavar="KEY",
                         help="enqueue at most once per (workflow, KEY)")
    enqueue.add_argument("--wait", action="store_true",
                         help="wait for the run to finish and print its result; the run id "
                              "comes first, progress goes to stderr")
    _read_options(enqueue)

    schedules = commands.add_parser("schedules", help="cron and interval schedules",
                                    description="schedules")
    sched_commands = schedules.add_subparsers(dest="schedules_command", required=True,
                                              metavar="COMMAND")
    sched_list = command("list", "every schedule, its spec and next fire time",
                         _schedules_list, parent=sched_commands)
    _client_options(sched_list)
    _read_options(sched_list)
    sched_show = command("show", "a schedule: its definition, next five fire times and what "
                                 "became of its latest occurrences", _schedules_show,
                         parent=sched_commands)
    _client_options(sched_show)
    sched_show.add_argument("schedule_id", metavar="ID")
    sched_show.add_argument("--last", type=_positive_int, default=10, metavar="N",
                            help="show the N latest occurrences (default 10, at most 1000)")
    _read_options(sched_show)
    sched_create = command("create", "define a schedule (the same definition again changes "
                                     "nothing)", _schedules_create, parent=sched_commands)
    _client_options(sched_create)
    sched_create.add_argument("schedule_id", metavar="ID")
    sched_create.add_argument("workflow", metavar="WORKFLOW")
    when = sched_create.add_mutually_exclusive_group(required=True)
    when.add_argument("--cron", metavar="EXPR", help="five cron fields, e.g. '0 3 * * *'")
    when.add_argument("--every", type=_seconds, metavar="S",
                      help="an interval, e.g. 15m (fires at its multiples since the epoch)")
    sched_create.add_argument("--timezone", default="UTC", metavar="TZ",
                              help="the cron's IANA time zone, e.g. Europe/Paris "
                                   "(default UTC)")
    sched_create.add_argument("--payload", default="null", metavar="JSON",
                              help="each run's input as JSON (default: null)")
    sched_create.add_argument("--version", help="workflow version (default: the newest a "
                                                "connected worker registered)")
    sched_create.add_argument("--overlap", default="skip",
                              choices=["skip", "buffer_one", "allow", "cancel_previous"],
                              help="an occurrence while the previous run is unfinished: skip "
                                   "it (default), buffer one, allow it alongside, or cancel "
                                   "the previous run (and its children) and start it")
    sched_create.add_argument("--catchup-window", type=_seconds_or_zero, default=60.0,
                              metavar="S", help="occurrences missed while no server was up "
                                                "fire if this recent (default 1m)")
    sched_create.add_argument("--update", action="store_true",
                              help="replace the definition of an existing schedule")
    for name, help, run in (("pause", "stop firing until resumed", _schedules_pause),
                            ("resume", "fire again, from the next occurrence",
                             _schedules_resume),
                            ("trigger", "fire once now, under the overlap policy",
                             _schedules_trigger),
                            ("delete", "delete a schedule (its runs stay)", _schedules_delete)):
        sub = command(name, help, run, parent=sched_commands)
        _client_options(sub)
        sub.add_argument("schedule_id", metavar="ID")
    backfill = command("backfill", "start every occurrence in a past range never handled",
                       _schedules_backfill, parent=sched_commands)
    _client_options(backfill)
    backfill.add_argument("schedule_id", metavar="ID")
    backfill.add_argument("--start", required=True, type=_moment, metavar="DATE",
                          help="ISO 8601 (local time unless it says its zone)")
    backfill.add_argument("--end", required=True, type=_moment, metavar="DATE",
                          help="ISO 8601 (local time unless it says its zone)")
    _from_environment(parser)
    return parser


def _version() -> str:
    from importlib.metadata import PackageNotFoundError, version

    try:
        return version("aiki")
    except PackageNotFoundError:  # run from a source tree that was never installed
        return "unknown"


def _read_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--output", choices=["table", "json"], default="table",
                        help="table (default) or json (times as epoch seconds)")
    parser.add_argument("--utc", action="store_true",
                        help="print times in UTC (default: the local timezone)")


def _from_environment(parser: argparse.ArgumentParser) -> None:
    """Every ``--flag`` of every command may be set from ``AIKI_FLAG``; ``--help`` says so.

    The command line wins over the environment. A value from the environment goes through
    the flag's own check when that command runs, and a bad one is an error naming the
    variable (a bad ``AIKI_GRACE`` does not stop ``aiki workers``).
    """
    for action in parser._actions:
        if isinstance(action, argparse._SubParsersAction):
            for sub in dict.fromkeys(action.choices.values()):
                _from_environment(sub)
            continue
        long = [o for o in action.option_strings if o.startswith("--")]
        if not long or isinstance(action, (argparse._HelpAction, argparse._VersionAction)):
            continue
        variable = ENV_PREFIX + long[0][2:].upper().replace("-", "_")
        action.help = f"{action.help or ''} [env {variable}]".strip()
        raw = os.environ.get(variable)
        if raw is not None:
            # A str default is converted by argparse with ``type`` only if the flag is not
            # given, and only for the command that runs.
            action.type = _EnvironmentType(action, variable)
            action.default = _FromEnvironment(raw)
            action.required = False


class _FromEnvironment(str):
    """A flag's default as read from its environment variable."""


@attrs.frozen
class _EnvironmentType:
    """A flag's ``type``, which also checks (and names) a value from the environment."""

    action: argparse.Action
    variable: str
    inner: Any = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        object.__setattr__(self, "inner", self.action.type)

    def __call__(self, text: str) -> Any:
        if not isinstance(text, _FromEnvironment):
            return self.inner(text) if callable(self.inner) else text
        try:
            return _environment_value(self.action, self.inner, text)
        except (argparse.ArgumentTypeError, ValueError) as exc:
            raise argparse.ArgumentTypeError(f"${self.variable}: {exc}") from None


def _environment_value(action: argparse.Action, convert: Any, raw: str) -> Any:
    if isinstance(action, argparse._StoreTrueAction):
        if raw.strip().lower() in ("1", "true", "yes", "on"):
            return True
        if raw.strip().lower() in ("", "0", "false", "no", "off"):
            return False
        raise ValueError(f"{raw!r} is not a yes/no value (1, true, yes, on, 0, false, no, "
                         "off)")
    value = convert(str(raw)) if callable(convert) else str(raw)
    if action.choices is not None and value not in action.choices:
        raise ValueError(f"{raw!r} is not one of {', '.join(map(str, action.choices))}")
    return value


def _token_option(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--token-file", metavar="PATH",
                        help=f"file holding the token (default: ${TOKEN_VARIABLE})")


def _client_options(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--server", default=DEFAULT_SERVER, metavar="URL",
                        help=f"the server (default: {DEFAULT_SERVER})")
    _token_option(parser)
    parser.add_argument("--cafile", metavar="PEM",
                        help="CA certificates to trust for wss:// (default: the system's)")
    parser.add_argument("--timeout", type=_seconds, default=30.0, metavar="S",
                        help="seconds to wait for the server to be up, and for each "
                             "reply (default 30)")


def _transport_options(parser: argparse.ArgumentParser) -> None:
    from aiki.transport.websocket import WebSocketSettings

    defaults = WebSocketSettings()
    parser.add_argument("--max-frame-bytes", type=_positive_int,
                        default=defaults.max_frame_bytes, metavar="N",
                        help=f"largest WebSocket frame (default {defaults.max_frame_bytes})")
    parser.add_argument("--ping-interval", type=_seconds, default=defaults.ping_interval,
                        metavar="S", help="seconds between keepalive pings "
                                          f"(default {defaults.ping_interval:g})")
    parser.add_argument("--ping-timeout", type=_seconds, default=defaults.ping_timeout,
                        metavar="S", help="drop a peer that does not answer a ping within S "
                                          f"(default {defaults.ping_timeout:g})")


def _seconds(text: str) -> float:
    return _number_of_seconds(text, zero=False)


def _seconds_or_zero(text: str) -> float:
    return _number_of_seconds(text, zero=True)


_UNITS = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
_DURATION_PART = re.compile(r"(\d+(?:\.\d*)?|\.\d+)(ms|s|m|h|d)")


def parse_duration(text: str) -> float:
    """Seconds from ``"30"``, ``"30s"``, ``"5m"``, ``"2h"``, ``"1d"``, ``"1h30m"`` or
    ``"250ms"``; ValueError naming the text otherwise."""
    compact = text.strip().lower().replace(" ", "")
    try:
        return float(compact)
    except ValueError:
        pass
    parts = _DURATION_PART.findall(compact)
    if not compact or "".join(n + u for n, u in parts) != compact:
        raise ValueError(f"{text!r} is not a number of seconds (e.g. 30, 30s, 5m, 2h, 1d)")
    return sum(float(n) * _UNITS[u] for n, u in parts)


def _number_of_seconds(text: str, *, zero: bool) -> float:
    try:
        value = parse_duration(text)
    except ValueError as exc:
        raise argparse.ArgumentTypeError(str(exc)) from None
    if not (value >= 0 if zero else value > 0) or value == float("inf"):
        wanted = "a number of seconds, 0 or more" if zero else "a positive number of seconds"
        raise argparse.ArgumentTypeError(f"{text!r}: give {wanted}")
    return value


def _moment(text: str) -> datetime.datetime:
    try:
        moment = datetime.datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is not an ISO 8601 date or time (e.g. 2026-11-01 or "
            "2026-11-01T12:00:00+01:00)") from None
    return moment if moment.tzinfo is not None else moment.astimezone()


def _whole(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 0:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of at least 0")
    return value


def _positive_int(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"{text!r}: give a number of at least 1")
    return value


def _gc_option(parser: argparse.ArgumentParser) -> None:
    """``--gc-threshold``, for the commands that own their process (aiki.gc_tuning)."""
    from aiki.gc_tuning import DEFAULT_GC_THRESHOLD

    parser.add_argument("--gc-threshold", type=_whole, default=DEFAULT_GC_THRESHOLD,
                        metavar="N",
                        help="collect the youngest generation of garbage every N allocations "
                             f"(default {DEFAULT_GC_THRESHOLD:,}; Python's own is 700, and 0 "
                             "leaves it): fewer collections of the objects of runs in flight")


def _setup_logging(level: str, fmt: str) -> None:
    from aiki import logs

    logs.setup(level, fmt)


def _observability_options(parser: argparse.ArgumentParser, default_port: int) -> None:
    """``--metrics-listen`` and ``--log-format``, for the long-running commands."""
    parser.add_argument("--metrics-listen", metavar="HOST:PORT",
                        help="serve /metrics (Prometheus), /health and /ready over plain HTTP "
                             f"there, e.g. 0.0.0.0:{default_port} (no token: bind it where "
                             "only your Prometheus reaches)")
    parser.add_argument("--log-format", choices=["text", "json", "auto"], default="auto",
                        help="log lines as text, or as one JSON object each with run_id, "
                             "workflow, version, attempt and worker_id on lines about a run "
                             "(default auto: text on a terminal, JSON lines otherwise)")


def read_token(path: str | None) -> str | None:
    """The token in ``path`` (surrounding whitespace removed), else ``$AIKI_TOKEN``."""
    if path is None:
        return os.environ.get(TOKEN_VARIABLE) or None
    try:
        token = Path(path).read_text().strip()
    except OSError as exc:
        raise UsageError(f"cannot read the token file: {exc}") from exc
    if not token:
        raise UsageError(f"the token file {path!r} is empty")
    return token


# -- aiki demo ----------------------------------------------------------------------------
def _demo(args: argparse.Namespace) -> int:
    from aiki import demo as demo_module

    trio.run(demo_module.main, args.store_path)
    return 0


# -- aiki server --------------------------------------------------------------------------
def _server(args: argparse.Namespace) -> int:
    from aiki.gc_tuning import tune_gc
    from aiki.server import ServerConfig, run_server

    config = ServerConfig(
        listen=args.listen, store=args.store, token=read_token(args.token_file),
        certfile=args.cert, keyfile=args.key, lease_ttl=args.lease_ttl,
        heartbeat_interval=args.heartbeat_interval, poll_interval=args.poll_interval,
        shutdown_grace=args.shutdown_grace, hello_timeout=args.hello_timeout,
        retention=args.retention, stranded_after=args.stranded_after,
        max_frame_bytes=args.max_frame_bytes,
        ping_interval=args.ping_interval, ping_timeout=args.ping_timeout,
        metrics_listen=args.metrics_listen,
    )
    config.endpoint()  # refuse a bad configuration before opening anything
    tune_gc(args.gc_threshold)

    async def serve() -> None:
        async with trio.open_nursery() as nursery:
            url = await nursery.start(partial(run_server, config))
            print(f"aiki server listening on {url}", flush=True)

    trio.run(serve)
    return 0


# -- aiki worker --------------------------------------------------------------------------
def load_app(spec: str) -> list[Any]:
    """The workflows ``module:attr`` names (an ``@aiki.workflow`` or a list/tuple of them)."""
    from aiki.sdk.definitions import Workflow

    module_name, sep, attr = spec.partition(":")
    if not sep or not module_name or not attr:
        raise UsageError(f"--app must be MODULE:ATTR (e.g. myapp.workflows:workflows), "
                         f"got {spec!r}")
    if os.getcwd() not in sys.path:
        sys.path.insert(0, os.getcwd())
    try:
        module = importlib.import_module(module_name)
    except Exception as exc:
        raise UsageError(f"cannot import {module_name!r} (from --app {spec}): "
                         f"{type(exc).__name__}: {exc}") from exc
    value: Any = module
    for part in attr.split("."):
        try:
            value = getattr(value, part)
        except AttributeError:
            raise UsageError(f"module {module_name!r} has no attribute {attr!r} "
                             f"(from --app {spec})") from None
    items = list(value) if isinstance(value, (list, tuple)) else [value]
    bad = [item for item in items if not isinstance(item, Workflow)]
    if bad or not items:
        raise UsageError(f"--app {spec} must name an @aiki.workflow or a list of them, "
                         f"got {type(bad[0] if bad else value).__name__}")
    return items


def _worker(args: argparse.Namespace) -> int:
    from aiki.actors.worker import Worker
    from aiki.gc_tuning import tune_gc
    from aiki.server import parse_http_listen, serve_metrics
    from aiki.sources import Sources
    from aiki.transport.websocket import (
        WebSocketSettings,
        WebSocketTransport,
        client_ssl_context,
        parse_address,
    )

    workflows = load_app(args.app)
    parse_address(args.server)  # a bad URL is a usage error now, not a reconnect loop later
    tune_gc(args.gc_threshold)
    if args.metrics_listen is not None:
        parse_http_listen(args.metrics_listen)
    settings = WebSocketSettings(
        token=read_token(args.token_file),
        ssl_context=client_ssl_context(args.cafile) if args.cafile else None,
        max_frame_bytes=args.max_frame_bytes, ping_interval=args.ping_interval,
        ping_timeout=args.ping_timeout,
    )

    async def work() -> None:
        sources = Sources.real()
        async with WebSocketTransport(settings) as transport:
            worker = Worker(
                transport, args.server, workflows, args.id or f"worker-{sources.short_id()}",
                sources, max_concurrent_runs=args.concurrency,
                inline_retry_max=args.inline_retry_max,
                record_start_after=args.record_start_after, token=settings.token,
                request_timeout=args.timeout, connect_timeout=args.timeout,
                task_threads=args.task_threads,
            )
            async with trio.open_nursery() as nursery:
                with trio.open_signal_receiver(signal.SIGINT, signal.SIGTERM) as signals:
                    if args.metrics_listen is not None:
                        await nursery.start(serve_metrics, worker.http_app(),
                                            args.metrics_listen)
                    await nursery.start(worker.run)
                    log.info("worker %s connected to %s: %s (%d at once)", worker.id,
                             args.server, ", ".join(f"{w.name}@{w.version}" for w in workflows),
                             args.concurrency)
                    nursery.start_soon(_warn_missing_versions, args, workflows)
                    async for signum in signals:
                        name = signal.Signals(signum).name
                        if not worker.draining.is_set():
                            log.info("%s: draining for up to %.1f s (again to stop at once)",
                                     name, args.grace)
                            nursery.start_soon(_drain_then_stop, worker, args.grace,
                                               nursery.cancel_scope)
                        else:
                            log.warning("%s again: stopping now", name)
                            nursery.cancel_scope.cancel()

    trio.run(work)
    return 0


async def _warn_missing_versions(args: argparse.Namespace, workflows: list[Any]) -> None:
    """Warn when the server holds unfinished runs of a version of these workflows that this
    app lacks: they wait for a worker that has it (after a deploy, usually the old one)."""
    import aiki
    from aiki.errors import AikiError

    mine = {(w.name, w.version) for w in workflows}
    try:
        async with aiki.connect(args.server, token=read_token(args.token_file),
                                cafile=args.cafile, request_timeout=args.timeout) as client:
            missing: dict[tuple[str, str], int] = {}
            for name in sorted({w.name for w in workflows}):
                for state in ("queued", "waiting", "running"):
                    for run in await client.list_runs(workflow=name, state=state, limit=1000):
                        if (run.workflow, run.version) not in mine:
                            key = (run.workflow, run.version)
                            missing[key] = missing.get(key, 0) + 1
    except (AikiError, OSError, TimeoutError) as exc:
        log.info("could not look for unfinished runs of other versions: %s", exc)
        return
    for (name, version), count in sorted(missing.items()):
        log.warning("the server has %d unfinished run(s) of %s version %s, which this app "
                    "does not have: they need a worker that does", count, name, version)


async def _drain_then_stop(worker: Any, grace: float, everything: trio.CancelScope) -> None:
    await worker.drain(grace)
    log.info("worker %s: drained; stopping", worker.id)
    everything.cancel()


# -- client commands ----------------------------------------------------------------------
def _client_call(args: argparse.Namespace, body: Any) -> tuple[Any, float]:
    """``await body(client)`` on a connection to the server, and the wall time it ended."""
    import aiki
    from aiki.sources import Sources

    async def call() -> tuple[Any, float]:
        async with aiki.connect(args.server, token=read_token(args.token_file),
                                cafile=args.cafile, request_timeout=args.timeout,
                                timeout=args.timeout) as client:
            return await body(client), Sources.real().clock.now()

    return trio.run(call)


def _runs_list(args: argparse.Namespace) -> int:
    async def body(client: Any) -> Any:
        return await client.list_runs(workflow=args.workflow, state=args.state,
                                      limit=min(args.limit, 1000), stranded=args.stranded)

    runs, now = _client_call(args, body)
    if args.output == "json":
        return _print_json([_plain(r) for r in runs])
    if not runs:
        print("no runs" + _filters(args))
        return 0
    times = Times(now, args.utc)
    _print_table(["ID", "WORKFLOW", "VERSION", "STATE", "ATTEMPTS", "WORKER", "CREATED",
                  "UPDATED"],
                 [[r.id, r.workflow, r.version, r.state, r.attempts, r.worker or "-",
                   times.at(r.created_at), times.ago(r.updated_at)] for r in runs])
    return 0


def _filters(args: argparse.Namespace) -> str:
    parts = [f"{name} {value}" for name, value in (("workflow", args.workflow),
                                                  ("state", args.state)) if value]
    if getattr(args, "stranded", False):
        parts.append("stranded")
    return f" ({', '.join(parts)})" if parts else ""


def _runs_show(args: argparse.Namespace) -> int:
    from aiki import protocol as p

    async def body(client: Any) -> Any:
        info = await client.link.request(lambda req: p.GetRun(req, args.run_id))
        history = await client.link.request(lambda req: p.GetHistory(req, args.run_id))
        tree = await _tree(client, info, 0, [MAX_TREE])
        return info, history.events, tree

    (info, events, tree), now = _client_call(args, body)
    run = info.run
    if args.output == "json":
        return _print_json({"run": _plain(run), "steps": [_plain(s) for s in info.steps],
                            "waits": [_plain(w) for w in info.waits],
                            "history": [_plain(e) for e in events]})
    times = Times(now, args.utc)
    fields: list[tuple[str, Any]] = [
        ("run", run.id), ("workflow", f"{run.workflow} (version {run.version})"),
        ("state", run.state), ("attempts", run.attempts),
        ("idempotency key", run.idempotency_key), ("created", times.at(run.created_at)),
        ("updated", times.at(run.updated_at)),
        ("finished", times.at(run.finished_at) if run.finished_at is not None else None),
        ("parent", run.parent_id),
        ("cancel", None if run.cancel_requested_at is None else (
            f"asked {times.at(run.cancel_requested_at)}"
            + (f": {run.cancel_reason}" if run.cancel_reason else "")
            + (f"; grace until {times.when(run.cancel_deadline)}"
               if run.cancel_deadline is not None and run.state not in
               ("completed", "failed", "cancelled") else ""))),
    ]
    if run.forked_from is not None:
        fields.append(("forked from", f"run {run.forked_from}, its first {run.forked_steps} "
                                      "step(s) copied"))
    if run.lease_owner is not None and run.state in ("running", "paused"):
        fields.append(("worker", f"{run.lease_owner} (lease epoch {run.lease_epoch}, "
                                 f"expires {times.when(run.lease_expires_at)})"
                       + (", giving it back" if run.state == "paused" else "")))
    for w in info.waits:
        what = {"sleep": "a sleep", "event": f"event {w.name!r}",
                "retry": f"the retry of task {w.name!r}"}.get(w.kind, w.kind)
        fields.append(("waits for", f"{what} at step {w.position}, since {times.at(w.since)}, "
                                    f"until {times.when(w.due_at) if w.due_at else 'it comes'}"))
    fields += [("payload", run.payload), ("result", run.result),
               ("error", f"{run.error_type}: {run.error_message}" if run.error_type else None)]
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        if value is not None:
            print(f"{name:<{width}}  {value}")
    steps = [s for s in info.steps]
    print()
    if steps:
        _print_table(["STEP", "KIND", "NAME", "STATE", "ATTEMPTS", "OUTPUT / ERROR"],
                     [[s.position, s.kind, s.name, s.state, s.attempts,
                       _short(s.output if s.error_type is None
                              else f"{s.error_type}: {s.error_message}")] for s in steps])
    else:
        print("no steps yet")
    print()
    if tree:
        print("children:")
        for line in tree:
            print(line)
        print()
    for s in steps:
        if s.error_traceback and s.state in ("failed", "retrying"):
            print(f"step {s.position} ({s.name}), attempt {s.attempts}, failed with "
                  "(traceback from the worker):")
            print(_indented(s.error_traceback))
            print()
    if run.error_traceback:
        print("the run failed with (traceback from the worker):")
        print(_indented(run.error_traceback))
        print()
    start = events[0].at if events else 0.0
    _print_table(["AT", "+", "EVENT", "NAME", "ATTEMPT", "WORKER", "DETAIL"],
                 [[times.at(e.at), f"+{e.at - start:.3f}s", e.event, e.name or "", e.attempt,
                   e.worker_id or "server", _short(times.in_text(e.detail), 90)]
                  for e in events])
    return 0


MAX_TREE = 200  # runs shown under a run by `aiki runs show`


async def _tree(client: Any, info: Any, depth: int, budget: list[int]) -> list[str]:
    """The lines of a run's tree of children: each child's id, workflow, state, and theirs
    beneath it (at most MAX_TREE runs)."""
    from aiki import protocol as p

    lines = []
    for child in info.children:
        if budget[0] <= 0:
            lines.append("  " * (depth + 1) + "...")
            break
        budget[0] -= 1
        detached = ", detached" if child.detached else ""
        lines.append(f"{'  ' * (depth + 1)}{child.id}  {child.workflow} (version "
                     f"{child.version}{detached})  {child.state}")
        sub = await client.link.request(lambda req, c=child.id: p.GetRun(req, c))
        lines += await _tree(client, sub, depth + 1, budget)
    return lines


def _indented(text: str) -> str:
    return "\n".join("    " + line for line in text.rstrip().splitlines())


def _runs_purge(args: argparse.Namespace) -> int:
    async def body(client: Any) -> int:
        return int(await client.purge_runs(before=args.before))

    count, _ = _client_call(args, body)
    print(f"deleted {count} run(s) that finished before {args.before.isoformat()}")
    return 0


def _runs_retry(args: argparse.Namespace) -> int:
    async def body(client: Any) -> None:
        await client.handle(args.run_id).retry(version=args.version)

    _client_call(args, body)
    print(f"run {args.run_id}: queued again"
          + (f" on version {args.version}" if args.version else ""))
    return 0


def _runs_pause(args: argparse.Namespace) -> int:
    async def body(client: Any) -> None:
        await client.handle(args.run_id).pause()

    _client_call(args, body)
    print(f"run {args.run_id}: paused (a task in flight finishes; no new step starts until "
          f"`aiki runs resume {args.run_id}`)")
    return 0


def _runs_resume(args: argparse.Namespace) -> int:
    async def body(client: Any) -> str:
        handle = client.handle(args.run_id)
        await handle.resume()
        return str((await handle.status()).state)

    state, _ = _client_call(args, body)
    print(f"run {args.run_id}: resumed ({state})")
    return 0


def _runs_fork(args: argparse.Namespace) -> int:
    async def body(client: Any) -> str:
        fork = await client.fork(args.run_id, from_step=args.from_step, version=args.version)
        return str(fork.id)

    new_id, _ = _client_call(args, body)
    if args.output == "json":
        return _print_json({"run_id": new_id, "forked_from": args.run_id,
                            "from_step": args.from_step})
    print(f"run {new_id}: forked from run {args.run_id} at step {args.from_step}"
          + (f" on version {args.version}" if args.version else ""))
    return 0


def _runs_export(args: argparse.Namespace) -> int:
    from aiki import protocol as p
    from aiki.testing.replay import export

    async def body(client: Any) -> Any:
        info = await client.link.request(lambda req: p.GetRun(req, args.run_id))
        history = await client.link.request(lambda req: p.GetHistory(req, args.run_id))
        return export(info.run, info.steps, history.events)

    exported, _ = _client_call(args, body)
    print(json.dumps(exported, indent=1, sort_keys=True))
    return 0


def _replay(args: argparse.Namespace) -> int:
    from aiki import protocol as p
    from aiki.actors.dispatcher import version_key
    from aiki.errors import NonDeterminismError
    from aiki.sources import Sources
    from aiki.testing.replay import export, replay

    definitions = {(wf.name, wf.version): wf for wf in load_app(args.app)}
    names = sorted({name for name, _ in definitions})
    newest = {name: max((wf for (n, _), wf in definitions.items() if n == name),
                        key=lambda wf: version_key(wf.version)) for name in names}

    async def body(client: Any) -> list[list[str]]:
        now = Sources.real().clock.now()
        rows = []
        for name in names:
            reply = await client.link.request(
                lambda req, name=name: p.ListRuns(req, name, None, min(args.limit, 1000)))
            for run in reply.runs:
                if run.finished_at is not None and run.finished_at < now - args.since:
                    continue
                # The same version if the app has it, else its newest of that name (a
                # deploy that moves the runs on, as `aiki runs retry --version` will).
                definition = definitions.get((run.workflow, run.version)) or newest[name]
                info = await client.link.request(lambda req, run=run: p.GetRun(req, run.id))
                try:
                    result = await replay(definition, export(info.run, info.steps, ()))
                except NonDeterminismError as exc:
                    rows.append([run.id, run.workflow, run.version, run.state, "DIVERGES",
                                 f"as version {definition.version}: {exc}"])
                else:
                    rows.append([run.id, run.workflow, run.version, run.state, "passes",
                                 f"as version {definition.version}: {result.steps} step(s) "
                                 "replayed" + (f"; {result.detail}" if result.detail else "")])
        return rows

    rows, _ = _client_call(args, body)
    if not rows:
        print(f"no runs of {', '.join(names)} to replay")
        return 0
    _print_table(["RUN", "WORKFLOW", "VERSION", "STATE", "REPLAY", "DETAIL"], rows)
    diverged = sum(row[4] == "DIVERGES" for row in rows)
    print(f"\n{len(rows) - diverged} pass, {diverged} diverge")
    return 1 if diverged else 0


def _runs_wakeup(args: argparse.Namespace) -> int:
    async def body(client: Any) -> bool:
        return bool(await client.handle(args.run_id).wakeup())

    woken, _ = _client_call(args, body)
    print(f"run {args.run_id}: " + ("woken up" if woken else "not sleeping; nothing changed"))
    return 0


def _runs_cancel(args: argparse.Namespace) -> int:
    async def body(client: Any) -> bool:
        return bool(await client.handle(args.run_id).cancel(args.reason, grace=args.grace))

    cancelled, _ = _client_call(args, body)
    print(f"run {args.run_id}: " + ("cancelled" if cancelled
                                     else "already finished; nothing changed"))
    return 0


def _json_payload(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError as exc:
        raise UsageError(f"--payload is not valid JSON: {exc}") from None


def _runs_send(args: argparse.Namespace) -> int:
    value = _json_payload(args.payload)

    async def body(client: Any) -> bool:
        return bool(await client.handle(args.run_id).send(args.event, value,
                                                          idempotency_key=args.key))

    delivered, _ = _client_call(args, body)
    print(f"run {args.run_id}: event {args.event!r} "
          + ("delivered to its wait" if delivered else "sent (buffered for its next wait)"))
    return 0


def _workers(args: argparse.Namespace) -> int:
    async def body(client: Any) -> Any:
        return await client.list_workers(), await client.stranded_versions()

    (workers, stranded), now = _client_call(args, body)
    if args.output == "json":  # (stranded runs: aiki runs list --stranded --output json)
        return _print_json([_plain(w) for w in workers])
    times = Times(now, args.utc)
    for s in stranded:
        print(f"stranded: {s.runs} run(s) of {s.workflow}@{s.version}, queued since "
              f"{times.at(s.since)} ({times.ago(s.since)}); no connected worker has that "
              "version", file=sys.stderr)
    if not workers:
        print("no workers connected")
        return 0

    def heartbeat(at: float | None) -> str:
        # A worker heartbeats a third of a lease after it connects: until then it is new.
        return "just connected" if at is None else times.ago(at)

    _print_table(["ID", "WORKFLOWS", "SLOTS", "IN USE", "CONNECTED", "LAST HEARTBEAT", "STATE"],
                 [[w.id, ", ".join(f"{r.name}@{r.version}" for r in w.workflows), w.slots,
                   w.in_use, f"{times.at(w.connected_at)} ({times.ago(w.connected_at)})",
                   heartbeat(w.last_heartbeat), "draining" if w.draining else "ready"]
                  for w in workers])
    return 0


def _schedules_list(args: argparse.Namespace) -> int:
    async def body(client: Any) -> Any:
        return await client.list_schedules()

    schedules, now = _client_call(args, body)
    if args.output == "json":
        return _print_json([_plain(s) for s in schedules])
    if not schedules:
        print("no schedules")
        return 0
    times = Times(now, args.utc)
    _print_table(["ID", "WORKFLOW", "VERSION", "SPEC", "OVERLAP", "STATE", "NEXT"],
                 [[s.id, s.workflow, s.version, s.spec, s.overlap,
                   "paused" if s.paused else "active",
                   "-" if s.paused else times.when(s.next_fire_at)] for s in schedules])
    return 0


def _schedules_show(args: argparse.Namespace) -> int:
    async def body(client: Any) -> Any:
        return await client.schedule_handle(args.schedule_id).describe(
            firings=min(args.last, 1000))

    d, now = _client_call(args, body)
    if args.output == "json":
        return _print_json(_plain(d))
    times = Times(now, args.utc)
    fields: list[tuple[str, Any]] = [
        ("schedule", d.id), ("workflow", f"{d.workflow} (version {d.version})"),
        ("spec", d.spec), ("overlap", d.overlap),
        ("catch-up window", human_duration(d.catchup_window)),
        ("state", "paused" if d.paused else "active"), ("payload", d.payload),
        ("created", times.at(d.created_at)), ("updated", times.at(d.updated_at)),
    ]
    width = max(len(name) for name, _ in fields)
    for name, value in fields:
        print(f"{name:<{width}}  {value}")
    print()
    print("next fire times" + (" (if resumed)" if d.paused else "") + ":")
    for at in d.next_fire_times:
        print(f"  {times.when(at)}")
    print()
    if not d.recent:
        print("no occurrences yet")
        return 0
    _print_table(["OCCURRENCE", "OUTCOME", "REASON", "RUN", "RUN STATE", "DETAIL"],
                 [[times.at(o.occurrence) if not o.key.startswith("trigger:")
                   else f"{times.at(o.occurrence)} (trigger)", o.outcome, o.reason,
                   o.run_id or "-", o.run_state or "-", _short(o.detail, 90)]
                  for o in d.recent])
    return 0


def _schedules_create(args: argparse.Namespace) -> int:
    import warnings

    payload = _json_payload(args.payload)

    async def body(client: Any) -> Any:
        with warnings.catch_warnings(record=True) as caught:
            warnings.simplefilter("always")
            sched = await client.schedule(
                args.workflow, payload, id=args.schedule_id, version=args.version,
                cron=args.cron, timezone=args.timezone, every=args.every,
                overlap=args.overlap, catchup_window=args.catchup_window, update=args.update)
        for warning in caught:
            print(f"aiki schedules create: warning: {warning.message}", file=sys.stderr)
        return sched, await sched.describe(firings=0)

    (sched, d), now = _client_call(args, body)
    what = "created" if sched.created else "updated" if sched.updated else \
        "exists with this definition (unchanged)"
    print(f"schedule {d.id}: {what}; {d.spec}, next at "
          f"{Times(now, False).when(d.next_fire_times[0])}")
    return 0


def _schedules_change(args: argparse.Namespace, action: str) -> int:
    async def body(client: Any) -> Any:
        return await getattr(client.schedule_handle(args.schedule_id), action)()

    _client_call(args, body)
    print(f"schedule {args.schedule_id}: {action}d")
    return 0


def _schedules_pause(args: argparse.Namespace) -> int:
    return _schedules_change(args, "pause")


def _schedules_resume(args: argparse.Namespace) -> int:
    return _schedules_change(args, "resume")


def _schedules_delete(args: argparse.Namespace) -> int:
    async def body(client: Any) -> bool:
        return bool(await client.schedule_handle(args.schedule_id).delete())

    existed, _ = _client_call(args, body)
    if not existed:
        print(f"aiki schedules delete: error: no schedule with id {args.schedule_id!r}",
              file=sys.stderr)
        return 1
    print(f"schedule {args.schedule_id}: deleted (its runs stay)")
    return 0


def _schedules_trigger(args: argparse.Namespace) -> int:
    async def body(client: Any) -> Any:
        return await client.schedule_handle(args.schedule_id).trigger()

    fired, _ = _client_call(args, body)
    if fired.outcome == "fired":
        print(f"schedule {args.schedule_id}: started run {fired.run_id}")
    else:
        print(f"schedule {args.schedule_id}: {fired.outcome}: {fired.detail}")
    return 0


def _schedules_backfill(args: argparse.Namespace) -> int:
    async def body(client: Any) -> Any:
        return await client.schedule_handle(args.schedule_id).backfill(args.start, args.end)

    done, now = _client_call(args, body)
    times = Times(now, False)
    fired = [o for o in done if o.outcome == "fired"]
    print(f"schedule {args.schedule_id}: {len(fired)} run(s) started, "
          f"{len(done) - len(fired)} occurrence(s) not (by the overlap policy)")
    for o in done:
        print(f"  {times.at(o.occurrence)}  {o.outcome}  {o.run_id or o.detail or ''}")
    return 0


def _enqueue(args: argparse.Namespace) -> int:
    payload = _json_payload(args.payload)
    as_json = args.output == "json"

    async def body(client: Any) -> Any:
        handle = await client.enqueue(args.workflow, payload, version=args.version,
                                      idempotency_key=args.idempotency_key)
        # At once, before any wait: a wait cut short (SIGTERM, Ctrl-C) still leaves the id.
        if as_json:
            _print_json({"run_id": handle.id, "created": handle.created}, indent=None)
        else:
            print(f"{'enqueued' if handle.created else 'already enqueued'} run {handle.id}",
                  flush=True)
        if not args.wait:
            return None
        with Progress(handle.id) as progress:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(_watch_progress, client, handle.id, progress)
                result = await handle.wait_for_completion(timeout=None)
                nursery.cancel_scope.cancel()
        return result

    result, _ = _client_call(args, body)
    if args.wait:
        if as_json:
            _print_json({"result": result}, indent=None)
        else:
            print(json.dumps(result))
    return 0


PROGRESS_INTERVAL = 1.0  # seconds between looks at a run being waited for


async def _watch_progress(client: Any, run_id: str, progress: Progress) -> None:
    """Report the run's current step whenever it changes, looking every second."""
    from aiki import protocol as p
    from aiki.errors import AikiError

    while True:
        try:
            info = await client.link.request(lambda req: p.GetRun(req, run_id))
        except (AikiError, TimeoutError):
            pass  # progress is a courtesy: the wait itself reports what matters
        else:
            progress.show(describe_progress(info.run, info.steps))
        await trio.sleep(PROGRESS_INTERVAL)


def describe_progress(run: Any, steps: Sequence[Any]) -> str:
    """One line on where a run is: its state and its latest step."""
    text = f"{run.state}"
    if run.state == "running" and run.lease_owner:
        text += f" on {run.lease_owner}"
    if steps:
        last = max(steps, key=lambda s: tuple(int(x) for x in s.position.split(".")))
        attempt = f", attempt {last.attempts}" if last.attempts > 1 else ""
        text += f"; step {last.position}: {last.kind} {last.name!r} {last.state}{attempt}"
    else:
        text += "; no step yet"
    return text


@attrs.define(eq=False)
class Progress:
    """Where a waited-for run is, on stderr: a spinner on a terminal, else one line for each
    change (so a log or CI output shows each step once)."""

    run_id: str
    tty: bool = attrs.field(factory=lambda: sys.stderr.isatty())
    last: str | None = None
    _status: Any = None

    def __enter__(self) -> Progress:
        if self.tty:
            from rich.console import Console

            self._status = Console(stderr=True).status(f"run {self.run_id}: waiting")
            self._status.start()
        return self

    def __exit__(self, *exc: object) -> None:
        if self._status is not None:
            self._status.stop()

    def show(self, text: str) -> None:
        if text == self.last:
            return
        self.last = text
        if self._status is not None:
            self._status.update(f"run {self.run_id}: {text}")
        else:
            print(f"run {self.run_id}: {text}", file=sys.stderr, flush=True)


# -- output --------------------------------------------------------------------------------
_STATE_STYLES = {"completed": "green", "failed": "red", "cancelled": "magenta",
                 "paused": "yellow",
                 "running": "cyan", "retrying": "yellow", "sleeping": "blue",
                 "draining": "yellow", "ready": "green"}


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], *, color: bool = False
          ) -> str:
    """A table drawn by ``rich``: with colour and a rule under the header for a terminal
    (``color=True``); otherwise plain text, a header line then one line per row, columns two
    spaces apart, never wrapped, for pipes and scripts."""
    from rich import box
    from rich.console import Console
    from rich.table import Table
    from rich.text import Text

    grid = Table(box=box.SIMPLE_HEAD if color else None, show_edge=False, pad_edge=False,
                 header_style="bold" if color else "", padding=(0, 1))
    for header in headers:
        # Never cut or fold a cell (a run id must stay whole to be copied): a terminal
        # narrower than the table wraps its lines instead.
        grid.add_column(str(header), no_wrap=True, overflow="ignore")
    for row in rows:
        grid.add_row(*[Text("" if c is None else str(c),
                            style=_STATE_STYLES.get(str(c), "") if color else "")
                       for c in row])
    out = io.StringIO()
    console = Console(file=out, force_terminal=color, color_system="standard" if color else None,
                      width=1 << 16, highlight=False, emoji=False, markup=False)
    console.print(grid)
    return "\n".join(line.rstrip() for line in out.getvalue().splitlines())


def _print_table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> None:
    color = sys.stdout.isatty() and "NO_COLOR" not in os.environ
    print(table(headers, rows, color=color))


def _plain(value: Any) -> Any:
    from aiki.protocol import converter

    return converter.unstructure(value)


def _print_json(value: Any, indent: int | None = 2) -> int:
    print(json.dumps(value, indent=indent), flush=True)
    return 0


@attrs.frozen
class Times:
    """How the CLI shows times: ISO 8601 with a timezone (local, or UTC), and durations as
    people say them, relative to ``now`` (epoch seconds)."""

    now: float
    utc: bool = False

    def at(self, at: float) -> str:
        moment = datetime.datetime.fromtimestamp(at, datetime.UTC)
        if not self.utc:
            moment = moment.astimezone()
        return moment.isoformat(timespec="seconds")

    def ago(self, at: float) -> str:
        return relative(at - self.now)

    def when(self, at: float | None) -> str:
        """``2026-12-01T10:00:00+01:00 (in 2h 3m)``, or ``-``."""
        return "-" if at is None else f"{self.at(at)} ({self.ago(at)})"

    def in_text(self, text: str | None) -> str | None:
        """``text`` with the epoch times the server writes in history details ("next
        attempt at 1796132101.97") shown as times."""
        if text is None:
            return None
        return _EPOCH_IN_TEXT.sub(lambda m: f"{m.group(1)} {self.when(float(m.group(2)))}",
                                  text)


_EPOCH_IN_TEXT = re.compile(r"\b(at) (\d{9,11}(?:\.\d+)?)\b")


def human_duration(seconds: float) -> str:
    """``0s``, ``45s``, ``2m 5s``, ``2h 3m``, ``3d 4h``: the two largest units."""
    seconds = abs(seconds)
    if seconds < 10 and seconds != int(seconds):
        return f"{seconds:.1f}s"
    whole = int(round(seconds))
    parts = [(whole // 86400, "d"), (whole % 86400 // 3600, "h"), (whole % 3600 // 60, "m"),
             (whole % 60, "s")]
    while len(parts) > 1 and parts[0][0] == 0:
        parts.pop(0)
    shown = [f"{n}{unit}" for n, unit in parts[:2] if n or unit == parts[0][1]]
    return " ".join(shown)


def relative(delta: float) -> str:
    """``in 2h 3m`` for a time ahead, ``5m 2s ago`` for one past, ``now`` within a second."""
    if abs(delta) < 1:
        return "now"
    return f"in {human_duration(delta)}" if delta > 0 else f"{human_duration(delta)} ago"


def _short(text: str | None, limit: int = 60) -> str:
    if text is None:
        return ""
    return text if len(text) <= limit else text[: limit - 3] + "..."


if __name__ == "__main__":
    sys.exit(main())
