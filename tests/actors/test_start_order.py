"""Workers and clients may start before their server (issue 16): they keep trying, with
backoff and one log line, for up to their timeout. In virtual time over the memory transport."""

from __future__ import annotations

from contextlib import AsyncExitStack

import pytest
import trio

from aiki import protocol as p
from aiki.actors.link import Link, open_when_reachable
from aiki.errors import AuthenticationFailed, ConnectionLost
from aiki.sdk.client import Client
from aiki.server import Server
from aiki.sources import Sources
from aiki.store import MemoryStore
from tests.actors.test_link_and_worker import Severable, two_steps, worker


async def up_after(transport: Severable, seconds: float) -> None:
    await trio.sleep(seconds)
    transport.down = False


async def test_a_client_started_before_its_server_connects_once_it_is_up(
    autojump_clock: trio.abc.Clock, caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level("INFO", "aiki.link")
    transport = Severable(down=True)
    server = Server(MemoryStore(), Sources.seeded(1))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, transport, "srv")
        nursery.start_soon(up_after, transport, 7)
        start = trio.current_time()
        async with AsyncExitStack() as stack:
            client = await open_when_reachable(
                stack, lambda: Client.open(transport, "srv", Sources.seeded(2)), "srv", 30)
            assert 7 <= trio.current_time() - start < 30
            assert await client.list_workers() == []
        assert transport.connects > 2, "it tried again, with backoff"
        waiting = [r for r in caplog.records if "cannot reach the server" in r.message]
        assert len(waiting) == 1 and waiting[0].levelname == "WARNING"
        assert "trying again for up to 30 s" in waiting[0].message
        nursery.cancel_scope.cancel()


async def test_a_worker_started_before_its_server_registers_once_it_is_up(
    autojump_clock: trio.abc.Clock,
) -> None:
    transport = Severable(down=True)
    server = Server(MemoryStore(), Sources.seeded(1))
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, transport, "srv")
        w1 = worker(transport, [two_steps], "w1")
        w1.connect_timeout = 60
        nursery.start_soon(up_after, transport, 20)
        await nursery.start(w1.run)
        assert trio.current_time() >= 20
        assert [s.worker_id for s in server.ctx.dispatcher.seats.values()] == ["w1"]
        nursery.cancel_scope.cancel()


async def test_waiting_for_a_server_that_never_comes_ends_saying_how_long(
    autojump_clock: trio.abc.Clock,
) -> None:
    transport = Severable(down=True)
    start = trio.current_time()
    with pytest.raises(ConnectionLost, match=r"the server is down\) \(waited 10 s for the "
                                             r"server\)"):
        async with AsyncExitStack() as stack:
            await open_when_reachable(
                stack, lambda: Client.open(transport, "srv", Sources.seeded(2)), "srv", 10)
    assert trio.current_time() - start == pytest.approx(10)
    assert transport.connects > 3


async def test_a_refusal_is_not_waited_out(autojump_clock: trio.abc.Clock) -> None:
    transport = Severable()
    server = Server(MemoryStore(), Sources.seeded(1), token="right")
    async with trio.open_nursery() as nursery:
        await nursery.start(server.serve, transport, "srv")
        with pytest.raises(AuthenticationFailed):
            async with AsyncExitStack() as stack:
                await open_when_reachable(stack, lambda: Link.open(
                    transport, "srv", lambda req: p.Hello(req, "client", "c", token="no"),
                ), "srv", 60)
        assert transport.connects == 1
        nursery.cancel_scope.cancel()
