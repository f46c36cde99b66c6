"""The ``aiki`` command's pieces, without processes: apps, tokens, tables, configuration
checks, and its one-line errors."""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import trio

import aiki
from aiki import cli
from aiki.cli import UsageError, load_app, main, read_token, table
from aiki.server import ServerConfig
from tests.remote import app


def test_load_app_accepts_a_workflow_or_a_list_of_them() -> None:
    assert load_app("tests.remote.app:workflows") == app.workflows
    assert load_app("tests.remote.app:remote_sum") == [app.remote_sum]


@pytest.mark.parametrize("spec,message", [
    ("tests.remote.app", "must be MODULE:ATTR"),
    (":workflows", "must be MODULE:ATTR"),
    ("no_such_module_here:x", "cannot import 'no_such_module_here'"),
    ("tests.remote.app:nothing", "has no attribute 'nothing'"),
    ("tests.remote.app:WORKER", "must name an @aiki.workflow or a list of them, got str"),
    ("tests.remote.app:work", "got Task"),
])
def test_load_app_names_what_is_wrong(spec: str, message: str) -> None:
    with pytest.raises(UsageError, match=message):
        load_app(spec)


def test_tokens_come_from_a_file_or_the_environment(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.delenv("AIKI_TOKEN", raising=False)
    assert read_token(None) is None
    monkeypatch.setenv("AIKI_TOKEN", "from-env")
    assert read_token(None) == "from-env"
    (tmp_path / "token").write_text("  from-file\n")
    assert read_token(str(tmp_path / "token")) == "from-file"
    (tmp_path / "empty").write_text("\n")
    with pytest.raises(UsageError, match="is empty"):
        read_token(str(tmp_path / "empty"))
    with pytest.raises(UsageError, match="cannot read the token file"):
        read_token(str(tmp_path / "missing"))


def test_tables_line_up() -> None:
    assert table(["ID", "STATE"], [["a", "completed"], ["bbbb", None]]).splitlines() == [
        "ID    STATE",
        "a     completed",
        "bbbb",
    ]


@pytest.mark.parametrize("listen", ["127.0.0.1:9090", "localhost:1", "[::1]:9090",
                                    "127.0.0.2:0"])
def test_loopback_needs_no_token(listen: str) -> None:
    assert ServerConfig(listen=listen).endpoint().is_loopback


@pytest.mark.parametrize("listen", ["0.0.0.0:9090", "[::]:9090", "10.1.2.3:9090",
                                    "example.com:9090"])
def test_anything_but_loopback_needs_a_token(listen: str) -> None:
    with pytest.raises(aiki.ConfigError, match="refusing to listen on .* without a token"):
        ServerConfig(listen=listen).endpoint()
    assert ServerConfig(listen=listen, token="t").endpoint().port == 9090


def test_server_settings_are_checked() -> None:
    with pytest.raises(aiki.ConfigError, match="lease_ttl must be a positive"):
        ServerConfig(lease_ttl=0).endpoint()
    with pytest.raises(aiki.ConfigError, match="has no path"):
        ServerConfig(listen="ws://127.0.0.1:1/x").endpoint()


@pytest.mark.parametrize("address", ["nonsense", "127.0.0.1", ":9464", "127.0.0.1:99999",
                                     "127.0.0.1:http"])
def test_a_bad_metrics_address_is_refused_before_anything_starts(
    address: str, capsys: pytest.CaptureFixture[str],
) -> None:
    with pytest.raises(aiki.ConfigError, match="--metrics-listen wants HOST:PORT"):
        ServerConfig(metrics_listen=address).endpoint()
    assert main(["server", "--store", "memory", "--metrics-listen", address]) == 1
    assert main(["worker", "--app", "examples.quickstart:workflows",
                 "--metrics-listen", address]) == 1
    err = capsys.readouterr().err.splitlines()
    assert [line.split(":")[0] for line in err] == ["aiki server", "aiki worker"]
    assert all(f"got {address!r}" in line for line in err)
    assert ServerConfig(metrics_listen="[::1]:9464").metrics_endpoint() == ("::1", 9464)


def test_errors_are_one_line_with_the_command(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["server", "--listen", "0.0.0.0:9090"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("aiki server: error: refusing to listen on 0.0.0.0 without a token")
    assert err.count("\n") == 1
    assert main(["server", "--store", "oracle://x", "--listen", "127.0.0.1:0"]) == 1
    assert "unsupported store URL 'oracle://x'" in capsys.readouterr().err
    assert main(["worker", "--app", "nope"]) == 2
    assert capsys.readouterr().err.startswith("aiki worker: --app must be MODULE:ATTR")
    assert main(["enqueue", "x", "--payload", "{bad"]) == 2
    assert "--payload is not valid JSON" in capsys.readouterr().err
    assert main(["workers", "--server", "ws://127.0.0.1:1", "--timeout", "0.5"]) == 1
    assert "cannot connect to ws://127.0.0.1:1" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        main(["server", "--lease-ttl", "-1"])
    assert "give a positive number of seconds" in capsys.readouterr().err


async def test_awaiting_connect_says_how_to_use_it() -> None:
    with pytest.raises(TypeError, match="async with aiki.connect"):
        await aiki.connect("ws://127.0.0.1:1")  # type: ignore[misc]


async def test_the_server_log_hides_the_store_password(
    monkeypatch: pytest.MonkeyPatch, caplog: pytest.LogCaptureFixture,
) -> None:
    import trio

    import aiki.server
    from aiki.store import MemoryStore

    async def fake_open_store(url: str) -> MemoryStore:
        return MemoryStore()

    monkeypatch.setattr(aiki.server, "open_store", fake_open_store)
    caplog.set_level("INFO", "aiki.server")
    config = ServerConfig(listen="127.0.0.1:0", store="postgresql://aiki:hunter2@db/aiki")
    async with trio.open_nursery() as nursery:
        await nursery.start(lambda task_status: aiki.server.run_server(
            config, handle_signals=False, task_status=task_status))
        nursery.cancel_scope.cancel()
    assert "postgresql://aiki:***@db/aiki" in caplog.text
    assert "hunter2" not in caplog.text


def test_output_piped_into_a_reader_that_stops_exits_quietly() -> None:
    """`aiki runs show ID | head` used to end with 'error: [Errno 32] Broken pipe'."""
    import subprocess
    import sys

    code = (
        "import sys, aiki.cli as cli\n"
        "def big(args):\n"
        "    for i in range(200000):\n"
        "        print('x' * 100)\n"
        "cli._runs_list = big\n"
        "sys.exit(cli.main(['runs', 'list']))\n"
    )
    reader = subprocess.Popen([sys.executable, "-c", code], stdout=subprocess.PIPE,
                              stderr=subprocess.PIPE)
    assert reader.stdout is not None and reader.stderr is not None
    reader.stdout.read(10)
    reader.stdout.close()
    assert reader.wait(timeout=30) == 141
    assert reader.stderr.read() == b""
    reader.stderr.close()


def test_record_start_after_takes_zero_but_not_less(capsys: pytest.CaptureFixture[str]) -> None:
    args = cli._parser().parse_args(["worker", "--app", "m:a", "--record-start-after", "0"])
    assert args.record_start_after == 0.0
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["worker", "--app", "m:a", "--record-start-after", "-0.5"])
    assert "'-0.5': give a number of seconds, 0 or more" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["server", "--lease-ttl", "0"])
    assert "'0': give a positive number of seconds" in capsys.readouterr().err


def test_fork_takes_a_whole_number_of_steps(capsys: pytest.CaptureFixture[str]) -> None:
    args = cli._parser().parse_args(["runs", "fork", "r1", "--from-step", "0", "--version", "2"])
    assert (args.run_id, args.from_step, args.version) == ("r1", 0, "2")
    for bad, said in (("-1", "'-1': give a number of at least 0"),
                      ("two", "'two' is not a whole number")):
        with pytest.raises(SystemExit):
            cli._parser().parse_args(["runs", "fork", "r1", "--from-step", bad])
        assert said in capsys.readouterr().err
    with pytest.raises(SystemExit):  # how many steps to copy is not optional
        cli._parser().parse_args(["runs", "fork", "r1"])
    assert "--from-step" in capsys.readouterr().err
    assert cli._parser().parse_args(["runs", "pause", "r1"]).run_id == "r1"
    assert cli._parser().parse_args(["runs", "resume", "r1"]).run_id == "r1"


# -- issue 16: a friendlier CLI ------------------------------------------------------------
def test_version(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as info:
        main(["--version"])
    assert info.value.code == 0
    assert capsys.readouterr().out.strip() == f"aiki {cli._version()}"
    assert cli._version() == "0.1.0"


@pytest.mark.parametrize("text,seconds", [
    ("30", 30.0), ("1.5", 1.5), ("30s", 30.0), ("5m", 300.0), ("2h", 7200.0),
    ("1d", 86400.0), ("1h30m", 5400.0), ("250ms", 0.25), (" 2H ", 7200.0), (".5s", 0.5),
])
def test_seconds_take_units(text: str, seconds: float) -> None:
    assert cli.parse_duration(text) == seconds
    args = cli._parser().parse_args(["server", "--lease-ttl", text])
    assert args.lease_ttl == seconds


@pytest.mark.parametrize("text", ["", "5x", "m", "1h30", "h1", "-5m", "1.2.3s"])
def test_bad_seconds_name_the_text(text: str, capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(ValueError, match="is not a number of seconds"):
        cli.parse_duration(text)
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["server", f"--lease-ttl={text}"])
    assert f"{text!r} is not a number of seconds" in capsys.readouterr().err


def test_every_flag_comes_from_the_environment_and_help_says_so(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("AIKI_APP", "tests.remote.app:workflows")
    monkeypatch.setenv("AIKI_CONCURRENCY", "3")
    monkeypatch.setenv("AIKI_GRACE", "2m")
    monkeypatch.setenv("AIKI_SERVER", "ws://127.0.0.1:7777")
    monkeypatch.setenv("AIKI_LOG_LEVEL", "debug")
    args = cli._parser().parse_args(["worker"])  # --app is required, but set
    assert (args.app, args.concurrency, args.grace, args.server, args.log_level) == (
        "tests.remote.app:workflows", 3, 120.0, "ws://127.0.0.1:7777", "debug")
    args = cli._parser().parse_args(["worker", "--concurrency", "5"])
    assert args.concurrency == 5, "the command line wins"
    monkeypatch.setenv("AIKI_WAIT", "yes")
    monkeypatch.setenv("AIKI_OUTPUT", "json")
    args = cli._parser().parse_args(["enqueue", "wf"])
    assert args.wait is True and args.output == "json"
    for command in (["server"], ["worker"], ["runs", "list"], ["runs", "show"], ["workers"],
                    ["enqueue"], ["demo"]):
        with pytest.raises(SystemExit):
            cli._parser().parse_args([*command, "--help"])
        text = " ".join(capsys.readouterr().out.split())
        usage = text.split("options:")[0]
        flags = set(re.findall(r"(--[a-z][a-z-]*)", usage)) - {"--help"}
        assert flags, f"{command} has flags"
        for flag in flags:
            variable = "AIKI_" + flag[2:].upper().replace("-", "_")
            assert f"[env {variable}]" in text, f"{command} --help does not list {variable}"


def test_a_bad_environment_value_names_its_variable_only_for_its_command(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    monkeypatch.setenv("AIKI_GRACE", "soon")  # a worker flag: `aiki workers` ignores it
    monkeypatch.setenv("AIKI_WAIT", "maybe")
    assert cli._parser().parse_args(["workers"]).command == "workers"
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["worker", "--app", "m:a"])
    assert "argument --grace: $AIKI_GRACE: 'soon' is not a number of seconds" in (
        capsys.readouterr().err)
    with pytest.raises(SystemExit):
        cli._parser().parse_args(["enqueue", "wf"])
    assert "$AIKI_WAIT: 'maybe' is not a yes/no value" in capsys.readouterr().err


def test_times_are_iso_8601_with_a_timezone() -> None:
    times = cli.Times(now=1_764_600_000.0, utc=True)
    assert times.at(1_764_600_000.0) == "2025-12-01T14:40:00+00:00"
    local = cli.Times(now=0.0).at(1_764_600_000.0)
    assert local[19] in "+-" and local[:4] == "2025", "local time, with its offset"
    assert times.when(1_764_600_000.0 + 7380) == "2025-12-01T16:43:00+00:00 (in 2h 3m)"
    assert times.ago(1_764_600_000.0 - 302) == "5m 2s ago"
    assert times.when(None) == "-"


@pytest.mark.parametrize("seconds,text", [
    (0.4, "0.4s"), (45, "45s"), (60, "1m"), (125, "2m 5s"), (7380, "2h 3m"), (7200, "2h"),
    (90061, "1d 1h"), (3 * 86400 + 59, "3d"),
])
def test_durations_read_as_people_say_them(seconds: float, text: str) -> None:
    assert cli.human_duration(seconds) == text


def test_history_details_show_times_not_epochs() -> None:
    times = cli.Times(now=1_796_125_000.0, utc=True)
    assert times.in_text("Flaky: boom; next attempt at 1796132101.97") == (
        "Flaky: boom; next attempt at 2026-12-01T13:35:01+00:00 (in 1h 58m)")
    assert times.in_text("waits; wakes at 1796125060") == (
        "waits; wakes at 2026-12-01T11:37:40+00:00 (in 1m)")
    assert times.in_text("retried at attempt 3") == "retried at attempt 3"


def test_tables_have_colour_on_a_terminal_and_none_when_piped() -> None:
    rows = [["a", "completed"], ["b", "failed"]]
    plain = table(["ID", "STATE"], rows)
    assert "\x1b[" not in plain and plain.splitlines()[0] == "ID  STATE"
    coloured = table(["ID", "STATE"], rows, color=True)
    assert "\x1b[32mcompleted" in coloured and "\x1b[31mfailed" in coloured
    assert "\x1b[1m" in coloured, "a bold header"


def test_workers_show_a_new_worker_as_just_connected(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    info = aiki.WorkerInfo("w1", (), 8, 0, connected_at=1_764_600_000.0, last_heartbeat=None)
    seen = aiki.WorkerInfo("w2", (), 8, 1, connected_at=1_764_590_000.0,
                           last_heartbeat=1_764_599_997.0)
    monkeypatch.setattr(cli, "_client_call",
                        lambda args, body: (([info, seen], []), 1_764_600_002.0))
    assert main(["workers", "--utc"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert "never" not in "\n".join(lines)
    assert "2025-12-01T14:40:00+00:00 (2s ago)" in lines[1] and "just connected" in lines[1]
    assert "5s ago  " in lines[2]
    assert main(["workers", "--output", "json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [(w["id"], w["last_heartbeat"]) for w in listed] == [
        ("w1", None), ("w2", 1_764_599_997.0)]


def test_describe_progress_names_the_current_step() -> None:
    from types import SimpleNamespace as Record

    run = Record(state="running", lease_owner="w1")
    steps = (Record(position="0", kind="task", name="charge", state="completed", attempts=1),
             Record(position="10", kind="task", name="ship", state="retrying", attempts=2),
             Record(position="2", kind="task", name="email", state="completed", attempts=1))
    assert cli.describe_progress(run, steps) == (
        "running on w1; step 10: task 'ship' retrying, attempt 2")
    assert cli.describe_progress(run, ()) == "running on w1; no step yet"


def test_enqueue_prints_the_id_first_then_the_result_as_json_lines(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str],
) -> None:
    """`--output json`: one JSON line with the id at once, one with the result at the end;
    progress (one line per change, stderr not being a terminal) on stderr."""
    import trio.testing

    from tests.remote import app

    printed_before_the_end: list[str] = []
    progress_lines: list[str] = []

    def embedded_call(args: Any, body: Any) -> tuple[Any, float]:
        async def call() -> Any:
            async with aiki.embedded("memory") as client:
                async with aiki.worker(client, workflows=app.workflows):
                    result = await body(client)
                    so_far = capsys.readouterr()
                    printed_before_the_end.append(so_far.out)
                    progress_lines.extend(so_far.err.splitlines())
                    return result, 0.0

        return trio.run(call, clock=trio.testing.MockClock(autojump_threshold=0))

    monkeypatch.setattr(cli, "_client_call", embedded_call)
    assert main(["enqueue", "remote-sum", "--payload", "2", "--wait", "--output", "json"]) == 0
    [first] = [json.loads(line) for line in printed_before_the_end[0].splitlines()]
    assert first["created"] is True and first["run_id"]
    assert json.loads(capsys.readouterr().out) == {"result": 63}
    progress = progress_lines
    assert progress and all(line.startswith(f"run {first['run_id']}: ") for line in progress)
    assert len(progress) == len(set(progress)), "one line per change, not one per look"


@pytest.mark.parametrize("command", [["server", "--store", "memory"],
                                     ["worker", "--app", "examples.quickstart:workflows"]])
@pytest.mark.parametrize(("given", "expected"), [([], 10_000), (["--gc-threshold", "2500"], 2500),
                                                 (["--gc-threshold", "0"], 700)])
def test_the_long_running_commands_set_their_processes_collector(
    command: list[str], given: list[str], expected: int, monkeypatch: pytest.MonkeyPatch,
) -> None:
    import gc

    before = gc.get_threshold()
    monkeypatch.setattr(trio, "run", lambda *args, **kwargs: None)  # (it would serve here)
    try:
        gc.set_threshold(700, 10, 10)
        assert main([*command, *given]) == 0
        assert gc.get_threshold() == (expected, 10, 10)
    finally:
        gc.set_threshold(*before)


def test_a_negative_gc_threshold_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        main(["server", "--gc-threshold", "-1"])
    assert "'-1': give a number of at least 0" in capsys.readouterr().err
    with pytest.raises(ValueError, match="0 .Python's own. or more, got -1"):
        aiki.tune_gc(-1)
