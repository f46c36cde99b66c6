"""The ``aiki`` command's pieces, without processes: apps, tokens, tables, configuration
checks, and its one-line errors."""

from __future__ import annotations

from pathlib import Path

import pytest

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
