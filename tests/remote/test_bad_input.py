"""Bad input against a live server on 127.0.0.1 (real sockets, the real clock, short
timeouts): each case gets a clear refusal or a close with a reason, is logged, and never
disturbs another connection or a stored run."""

from __future__ import annotations

import json
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from functools import partial
from pathlib import Path
from typing import Any

import pytest
import trio
import trio_websocket as tw

import aiki
from aiki import protocol as p
from aiki.server import ServerConfig, run_server

TOKEN = "s3cret"
AUTH = [(b"authorization", f"Bearer {TOKEN}".encode())]
LIMIT = 64 * 1024


@asynccontextmanager
async def live_server(tmp_path: Path) -> AsyncIterator[tuple[str, aiki.Client, str]]:
    """A server (token required, 0.5 s to say hello, 64 KiB frames) with one healthy client
    connected and one run stored, both checked by ``still_fine``."""
    config = ServerConfig(listen="127.0.0.1:0", store=f"sqlite:///{tmp_path / 'aiki.db'}",
                          token=TOKEN, hello_timeout=0.5, max_frame_bytes=LIMIT)
    async with trio.open_nursery() as nursery:
        url = await nursery.start(partial(run_server, config, handle_signals=False))
        async with aiki.connect(url, token=TOKEN) as bystander:
            run = await bystander.enqueue("nobody-runs-this", {"n": 1}, version="1")
            yield url, bystander, run.id
            await still_fine(bystander, run.id)
        nursery.cancel_scope.cancel()


async def still_fine(bystander: aiki.Client, run_id: str) -> None:
    [run] = await bystander.list_runs()
    assert (run.id, run.workflow, run.state) == (run_id, "nobody-runs-this", "queued")


@asynccontextmanager
async def raw(url: str, headers: Any = AUTH, hello: bool = True
              ) -> AsyncIterator[tw.WebSocketConnection]:
    async with tw.open_websocket_url(url, extra_headers=list(headers)) as ws:
        if hello:
            await ws.send_message(p.encode(p.Hello(1, "client", "raw", token=TOKEN)))
            assert isinstance(await next_message(ws), p.Welcome)
        yield ws


_pending: dict[int, list[Any]] = {}


async def next_message(ws: tw.WebSocketConnection) -> Any:
    """The next message, however the server batched its frames."""
    pending = _pending.setdefault(id(ws), [])
    with trio.fail_after(5):
        while not pending:
            pending.extend(p.decode_frame(await ws.get_message()))
    return pending.pop(0)


@pytest.fixture(autouse=True)
def logs(caplog: pytest.LogCaptureFixture) -> pytest.LogCaptureFixture:
    caplog.set_level(logging.INFO, "aiki")
    return caplog


async def test_a_malformed_frame_is_refused_and_the_connection_keeps_serving(
    tmp_path: Path, logs: pytest.LogCaptureFixture,
) -> None:
    async with live_server(tmp_path) as (url, bystander, run_id), raw(url) as ws:
        for frame, expected in [("{not json", "not valid JSON"),
                                (b"\xff\xfe binary", "not valid JSON"),
                                ('{"type": "get_run", "req": 2}', "run_id"),
                                ("[]", "empty batch")]:
            await ws.send_message(frame)
            refused = await next_message(ws)
            assert isinstance(refused, p.Refused) and refused.error_type == "ProtocolError"
            assert expected in refused.message
            assert expected in logs.text
        await ws.send_message(p.encode(p.GetRun(3, run_id)))
        info = await next_message(ws)
        assert isinstance(info, p.RunInfo) and info.run.id == run_id


async def test_an_unknown_message_type_is_refused_by_name(
    tmp_path: Path, logs: pytest.LogCaptureFixture,
) -> None:
    async with live_server(tmp_path) as (url, bystander, run_id), raw(url) as ws:
        await ws.send_message(json.dumps({"type": "launch_missiles", "req": 2}))
        refused = await next_message(ws)
        assert isinstance(refused, p.Refused)
        assert "unknown message type 'launch_missiles'" in refused.message
        assert "unknown message type 'launch_missiles'" in logs.text
        await still_fine(bystander, run_id)


async def test_a_frame_over_the_limit_closes_that_connection_with_the_limit(
    tmp_path: Path, logs: pytest.LogCaptureFixture,
) -> None:
    async with live_server(tmp_path) as (url, bystander, run_id), raw(url) as ws:
        await ws.send_message(json.dumps({"type": "get_run", "req": 2, "run_id": "x" * LIMIT}))
        with pytest.raises(tw.ConnectionClosed) as closed, trio.fail_after(5):
            await ws.get_message()
        assert closed.value.reason is not None and closed.value.reason.code == 1009
        assert str(LIMIT) in (closed.value.reason.reason or "")
        assert f"code 1009 (MESSAGE_TOO_BIG): Exceeded maximum message size: {LIMIT}" in (
            logs.text)
        await still_fine(bystander, run_id)


@pytest.mark.parametrize("token,expected", [("guess", "wrong token"), (None, "no token")])
async def test_a_wrong_or_missing_token_is_refused_in_the_handshake(
    tmp_path: Path, logs: pytest.LogCaptureFixture, token: str | None, expected: str,
) -> None:
    async with live_server(tmp_path) as (url, bystander, run_id):
        with pytest.raises(aiki.AuthenticationFailed,
                           match=f"refused the connection: HTTP 401: authentication failed: "
                                 f"{expected}"):
            async with aiki.connect(url, token=token):
                pass  # pragma: no cover
        assert f"authentication failed: {expected}" in logs.text
        await still_fine(bystander, run_id)


async def test_a_client_that_never_handshakes_is_disconnected(
    tmp_path: Path, logs: pytest.LogCaptureFixture,
) -> None:
    async with live_server(tmp_path) as (url, bystander, run_id):
        host, port = url.removeprefix("ws://").rsplit(":", 1)
        stream = await trio.open_tcp_stream(host, int(port))
        async with stream:
            with trio.fail_after(5):
                assert await stream.receive_some() == b""  # closed by the server
        assert "no WebSocket handshake within 0.5 s" in logs.text
        await still_fine(bystander, run_id)


async def test_a_client_that_connects_and_says_nothing_is_closed_with_a_reason(
    tmp_path: Path, logs: pytest.LogCaptureFixture,
) -> None:
    async with live_server(tmp_path) as (url, bystander, run_id):
        async with raw(url, hello=False) as ws:
            goodbye = await next_message(ws)
            assert goodbye == p.Goodbye("no hello within 0.5 s")
            with pytest.raises(tw.ConnectionClosed), trio.fail_after(5):
                await ws.get_message()
        assert "no hello within 0.5 s" in logs.text
        await still_fine(bystander, run_id)


async def test_a_first_message_that_is_not_hello_is_a_protocol_error(
    tmp_path: Path, logs: pytest.LogCaptureFixture,
) -> None:
    async with live_server(tmp_path) as (url, bystander, run_id):
        async with raw(url, hello=False) as ws:
            await ws.send_message(p.encode(p.GetRun(1, run_id)))
            goodbye = await next_message(ws)
            assert goodbye == p.Goodbye("the first message must be 'hello', got 'get_run'",
                                        "ProtocolError")
        await still_fine(bystander, run_id)


async def test_a_stream_of_garbage_is_cut_off_after_a_limit(
    tmp_path: Path, logs: pytest.LogCaptureFixture,
) -> None:
    async with live_server(tmp_path) as (url, bystander, run_id), raw(url) as ws:
        for _ in range(16):
            await ws.send_message("garbage")
        replies = []
        with trio.fail_after(5):
            while True:
                try:
                    replies.append(await next_message(ws))
                except tw.ConnectionClosed:
                    break
        assert len(replies) == 16
        assert all(isinstance(r, p.Refused) for r in replies[:-1])
        assert isinstance(replies[-1], p.Goodbye)
        assert replies[-1].reason.startswith("too many malformed messages")
        assert "too many malformed messages" in logs.text
        await still_fine(bystander, run_id)
