"""The server: its supervision tree (StoreWriter, Dispatcher, Timer, listener with one Session
per connection) assembled from a configuration. The server never imports user code."""

from __future__ import annotations

import attrs
import trio

from aiki.actors.dispatcher import Dispatcher
from aiki.actors.session import ServerContext, Session
from aiki.actors.store_writer import StoreWriter
from aiki.actors.supervisor import ChildSpec, Supervisor
from aiki.actors.timer import Timer
from aiki.actors.watchers import RunWatchers
from aiki.sources import Sources
from aiki.store.base import Store
from aiki.transport.base import Connection, Transport


@attrs.define(eq=False)
class Server:
    """One Aiki server over ``store``. ``await nursery.start(server.serve, transport, address)``
    returns once it accepts connections, with the address it listens on."""

    store: Store
    sources: Sources
    lease_ttl: float = 30.0
    heartbeat_interval: float | None = None
    token: str | None = None
    poll_interval: float = 1.0
    supervisor: Supervisor = attrs.field(
        factory=lambda: Supervisor("server", max_restarts=5, within=10.0)
    )
    ctx: ServerContext = attrs.field(init=False)

    def __attrs_post_init__(self) -> None:
        writer = StoreWriter(self.store)
        dispatcher = Dispatcher(writer, self.sources, self.lease_ttl, self.poll_interval)
        timer = Timer(self.store, writer, self.sources, dispatcher.poke,
                      poll_interval=max(self.poll_interval, 1.0))
        self.ctx = ServerContext(
            store=self.store, writer=writer, dispatcher=dispatcher, timer=timer,
            watchers=RunWatchers(), sources=self.sources, server_id=self.sources.new_id(),
            lease_ttl=self.lease_ttl,
            heartbeat_interval=self.heartbeat_interval or self.lease_ttl / 3,
            token=self.token,
        )

    async def serve(
        self, transport: Transport, address: str, *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        bound: list[str] = []

        async def listen(*, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
            async def handle(conn: Connection) -> None:
                await Session.serve(self.ctx, conn)

            async with trio.open_nursery() as nursery:
                bound.append(await nursery.start(transport.serve, address, handle))
                task_status.started()

        children = [
            ChildSpec("store-writer", self.ctx.writer.run),
            ChildSpec("dispatcher", self.ctx.dispatcher.run),
            ChildSpec("timer", self.ctx.timer.run),
            ChildSpec("listener", listen),
        ]
        async with trio.open_nursery() as nursery:
            await nursery.start(self.supervisor.run, children)
            task_status.started(bound[-1])
