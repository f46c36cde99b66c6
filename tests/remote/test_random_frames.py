"""Hypothesis throws random frames at a live ``aiki server`` process; after each example a
fresh client must still be served and the stored run must still be there."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from typing import Any

import pytest
import trio
import trio_websocket as tw
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiki import protocol as p
from tests.remote.processes import REPO

TOKEN = "fuzz-token"
AUTH = [(b"authorization", f"Bearer {TOKEN}".encode())]

json_values = st.recursive(
    st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False)
    | st.text(max_size=20),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(max_size=8), inner,
                                                                max_size=4),
    max_leaves=12,
)
field_names = st.sampled_from(["req", "run_id", "lease", "step", "workflow", "payload",
                               "version", "leases", "role", "node_id", "limit", "state",
                               "result", "reason", "epoch", "worker_id"])
message_like = st.builds(
    lambda tag, fields: {"type": tag, **fields},
    st.sampled_from([*p.message_types(), "nope", ""]),
    st.dictionaries(field_names, json_values, max_size=5),
)
frames = st.one_of(
    st.text(max_size=300),
    st.binary(max_size=300),
    json_values.map(json.dumps),
    message_like.map(json.dumps),
    st.lists(message_like | json_values, min_size=1, max_size=5).map(json.dumps),
)


@pytest.fixture(scope="module")
def live(tmp_path_factory: pytest.TempPathFactory) -> Iterator[tuple[str, str]]:
    """A server process for the whole module, with one run stored; killed at the end."""
    tmp = tmp_path_factory.mktemp("fuzz")
    env = dict(os.environ, PYTHONPATH=str(REPO))
    env["AIKI_TOKEN"] = TOKEN
    with open(tmp / "server.log", "wb") as log:
        server = subprocess.Popen(
            [sys.executable, "-m", "aiki", "server", "--listen", "127.0.0.1:0", "--store",
             f"sqlite:///{tmp / 'aiki.db'}", "--hello-timeout", "1"],
            stdout=subprocess.PIPE, stderr=log, stdin=subprocess.DEVNULL, cwd=REPO, env=env,
        )
    try:
        assert server.stdout is not None
        line = server.stdout.readline().decode()
        assert line.startswith("aiki server listening on "), (tmp / "server.log").read_text()
        url = line.split()[-1]
        run_id = trio.run(enqueue_one, url)
        yield url, run_id
        assert server.poll() is None, "the server died:\n" + (tmp / "server.log").read_text()
    finally:
        server.kill()
        server.wait(timeout=10)
        if server.stdout is not None:
            server.stdout.close()


async def enqueue_one(url: str) -> str:
    async with tw.open_websocket_url(url, extra_headers=AUTH) as ws:
        await ws.send_message(p.encode(p.Hello(1, "client", "seed", token=TOKEN)))
        await ws.send_message(p.encode(p.Enqueue(2, "canary", '{"x":1}', "1", None, "canary-1")))
        replies: list[Any] = []
        while len(replies) < 2:
            replies.extend(p.decode_frame(await ws.get_message()))
        assert isinstance(replies[1], p.Enqueued)
        return replies[1].run_id  # type: ignore[no-any-return]


async def throw(url: str, hello: bool, frames: list[str | bytes]) -> None:
    with trio.fail_after(10):
        async with tw.open_websocket_url(url, extra_headers=AUTH) as ws:
            if hello:
                await ws.send_message(p.encode(p.Hello(1, "client", "fuzz", token=TOKEN)))
            for frame in frames:
                try:
                    await ws.send_message(frame)
                except tw.ConnectionClosed:
                    return  # closed with a reason (e.g. a first message that is no hello)


async def still_serving(url: str, run_id: str) -> None:
    with trio.fail_after(10):
        async with tw.open_websocket_url(url, extra_headers=AUTH) as ws:
            await ws.send_message(p.encode(p.Hello(1, "client", "check", token=TOKEN)))
            await ws.send_message(p.encode(p.GetRun(2, run_id)))
            replies: list[Any] = []
            while len(replies) < 2:
                replies.extend(p.decode_frame(await ws.get_message()))
    assert isinstance(replies[0], p.Welcome)
    info = replies[1]
    assert isinstance(info, p.RunInfo) and info.run.id == run_id
    assert info.run.workflow == "canary" and info.run.payload == '{"x":1}'


@settings(max_examples=60, deadline=None,
          suppress_health_check=[HealthCheck.too_slow, HealthCheck.function_scoped_fixture])
@given(hello=st.booleans(), thrown=st.lists(frames, min_size=1, max_size=4))
def test_random_frames_never_stop_the_server_or_touch_stored_runs(
    live: tuple[str, str], hello: bool, thrown: list[str | bytes],
) -> None:
    url, run_id = live
    trio.run(throw, url, hello, thrown)
    trio.run(still_serving, url, run_id)
