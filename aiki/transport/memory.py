"""The memory transport: connections between Trio tasks of one process.

Every message goes through the wire codec on its way (encoded by the sender, decoded by the
receiver), so embedded mode refuses exactly what the network would.
"""

from __future__ import annotations

import math
from typing import Any

import attrs
import trio

from aiki import protocol
from aiki.errors import ConnectionLost
from aiki.transport.base import Connection, Handler

CONNECTION_BUFFER = 256


@attrs.define(eq=False)
class MemoryConnection:
    """One end of an in-process connection. Bounded: a slow reader slows its writer."""

    peer: str
    _send: trio.MemorySendChannel[str]
    _receive: trio.MemoryReceiveChannel[str]
    sent: int = 0

    async def send(self, msg: Any) -> None:
        text = protocol.encode(msg)
        try:
            await self._send.send(text)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionLost(f"connection to {self.peer} is closed") from exc
        self.sent += 1

    async def send_raw(self, text: str) -> None:
        """Send text as it is, bypassing the encoder (for tests and fault injection)."""
        try:
            await self._send.send(text)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionLost(f"connection to {self.peer} is closed") from exc

    async def receive(self) -> Any:
        try:
            text = await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            raise ConnectionLost(f"connection to {self.peer} is closed") from exc
        return protocol.decode(text)

    async def aclose(self) -> None:
        await self._send.aclose()
        await self._receive.aclose()


def connection_pair(a: str, b: str, buffer: int = CONNECTION_BUFFER) -> tuple[
    MemoryConnection, MemoryConnection
]:
    """Two connected ends: the first is ``a``'s (its peer is ``b``), the second ``b``'s."""
    a_to_b_send, a_to_b_receive = trio.open_memory_channel[str](buffer)
    b_to_a_send, b_to_a_receive = trio.open_memory_channel[str](buffer)
    return (
        MemoryConnection(b, a_to_b_send, b_to_a_receive),
        MemoryConnection(a, b_to_a_send, a_to_b_receive),
    )


@attrs.define(eq=False)
class MemoryTransport:
    """Addresses are plain names within one transport object."""

    _listeners: dict[str, trio.MemorySendChannel[Connection]] = attrs.field(factory=dict)
    _connections: int = 0

    async def connect(self, address: str) -> Connection:
        listener = self._listeners.get(address)
        if listener is None:
            raise ConnectionLost(f"nothing listens on memory address {address!r}")
        self._connections += 1
        client_end, server_end = connection_pair(
            f"client-{self._connections}", address
        )
        try:
            await listener.send(server_end)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionLost(f"memory address {address!r} stopped listening") from exc
        return client_end

    async def serve(
        self,
        address: str,
        handler: Handler,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        if address in self._listeners:
            raise OSError(f"memory address {address!r} is already in use")
        accept_send, accept_receive = trio.open_memory_channel[Connection](math.inf)
        self._listeners[address] = accept_send
        try:
            async with trio.open_nursery() as nursery:
                task_status.started(address)
                async for conn in accept_receive:
                    nursery.start_soon(_handle, handler, conn)
        finally:
            del self._listeners[address]
            accept_send.close()
            # Connections accepted but never handled are closed, so their clients see
            # ConnectionLost instead of waiting forever.
            while True:
                try:
                    queued = accept_receive.receive_nowait()
                except (trio.WouldBlock, trio.EndOfChannel):
                    break
                with trio.CancelScope(shield=True):
                    await queued.aclose()


async def _handle(handler: Handler, conn: Connection) -> None:
    try:
        await handler(conn)
    finally:
        with trio.CancelScope(shield=True), trio.move_on_after(1):
            await conn.aclose()
