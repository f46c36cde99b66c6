"""The memory transport: connections between Trio tasks of one process.

Messages are frozen attrs objects whose user payloads are already JSON text (encoded once, at
the call site, by :func:`aiki.protocol.encode_value`), so by default the memory transport
hands the objects over as they are: the wire codec costs a fifth of embedded mode's CPU and
adds nothing a process talking to itself needs. ``check_wire=True`` (or the environment
variable ``AIKI_CHECK_WIRE=1``, which the test suite sets) still encodes every message on its
way and decodes it on arrival, so the tests prove that everything the engine sends survives
the network's codec. Text sent with :meth:`MemoryConnection.send_raw` is always decoded, as a
network peer's would be.

A request need not travel at all: while the server's session reads a connection, it offers
to answer its peer's requests in the peer's own task (:meth:`MemoryConnection.direct`), so a
request and its reply cost no message through the channels, no task woken to read them and
none spawned to answer. Pushes (a run assigned, a control) still come as messages.
"""

from __future__ import annotations

import math
import os
from collections.abc import Awaitable, Callable
from typing import Any

import attrs
import trio

from aiki import protocol
from aiki.errors import ConnectionLost, ProtocolError
from aiki.transport.base import Connection, Handler

CONNECTION_BUFFER = 256
CHECK_WIRE_VARIABLE = "AIKI_CHECK_WIRE"


def check_wire_default() -> bool:
    """Whether new memory transports round-trip messages through the codec: ``AIKI_CHECK_WIRE``."""
    return os.environ.get(CHECK_WIRE_VARIABLE, "") not in ("", "0")


Answer = Callable[[Any], Awaitable[Any]]


@attrs.define(eq=False)
class _Direct:
    """Shared by a connection's two ends: how the serving end answers a request in the
    requesting end's task, while it does."""

    answer: Answer | None = None
    closed: bool = False  # either end closed: what is answered after that is lost
    # The answers running now, each in its asker's task, shielded from that task's
    # cancellation: closing the connection cancels them, as it ends a session's requests.
    running: set[trio.CancelScope] = attrs.field(factory=set)
    # Request types answered without that shield (the serving end names them).
    unshielded: frozenset[type] = frozenset()


@attrs.define(eq=False)
class MemoryConnection:
    """One end of an in-process connection. Bounded: a slow reader slows its writer."""

    peer: str
    _send: trio.MemorySendChannel[Any]
    _receive: trio.MemoryReceiveChannel[Any]
    check_wire: bool = False
    sent: int = 0
    _direct: _Direct = attrs.field(factory=_Direct)

    def answer_directly(self, answer: Answer | None,
                        unshielded: frozenset[type] = frozenset()) -> None:
        """The serving end: from now on, a request of the peer's may be answered by
        awaiting ``answer(request)`` in the peer's own task (None: no more).

        That answer is shielded from the asking task's cancellation (what the server was
        sent, it finishes, as it would a message that left), except for the request types
        in ``unshielded``: those the serving end can leave half-answered, because nothing
        is left to do once the asker is gone (a write handed to the store's writer commits
        all the same). A shield costs the answer a cancel scope."""
        self._direct.answer = answer
        self._direct.unshielded = unshielded

    def direct(self) -> Answer | None:
        """The requesting end: how to have the other end answer a request in this task, if
        it answers that way now; else None (send the request as a message).

        Messages are checked as ``send`` checks them (``check_wire``: through the codec,
        both the request and its reply)."""
        return None if self._direct.answer is None else self._call

    async def _call(self, msg: Any) -> Any:
        direct = self._direct
        answer = direct.answer
        if answer is None or direct.closed:
            raise ConnectionLost(f"{self.peer} stopped answering requests")
        item = self._item(msg)
        request = protocol.decode(item) if isinstance(item, str) else item
        if type(msg) in direct.unshielded:
            reply = await answer(request)
        else:
            scope = trio.CancelScope(shield=True)
            direct.running.add(scope)
            try:
                with scope:
                    reply = await answer(request)
            finally:
                direct.running.discard(scope)
        if direct.closed:  # as a reply on its way when the connection closes
            raise ConnectionLost(f"connection to {self.peer} is closed")
        if self.check_wire and reply is not None:
            try:
                reply = protocol.decode(protocol.encode(reply))
            except ProtocolError as exc:  # as the session's outbox answers one it cannot send
                reply = protocol.Refused(getattr(msg, "req", -1), "ProtocolError",
                                         f"the reply could not be sent: {exc}")
        return reply

    def _item(self, msg: Any) -> Any:
        # Unchecked, a message still has to be one the protocol knows: what the network
        # would refuse as unencodable is refused here too, by type.
        if self.check_wire:
            return protocol.encode(msg)
        if type(msg) in _KNOWN:
            return msg
        return protocol.encode(msg)  # raises the codec's own error for a stranger

    async def send(self, msg: Any) -> None:
        try:
            await self._send.send(self._item(msg))
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionLost(f"connection to {self.peer} is closed") from exc
        self.sent += 1

    def try_send(self, msg: Any) -> bool:
        try:
            self._send.send_nowait(self._item(msg))
        except trio.WouldBlock:
            return False
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionLost(f"connection to {self.peer} is closed") from exc
        self.sent += 1
        return True

    async def send_raw(self, text: str) -> None:
        """Send text as it is, bypassing the encoder (for tests and fault injection)."""
        try:
            await self._send.send(text)
        except (trio.BrokenResourceError, trio.ClosedResourceError) as exc:
            raise ConnectionLost(f"connection to {self.peer} is closed") from exc

    async def receive(self) -> Any:
        try:
            item = await self._receive.receive()
        except (trio.EndOfChannel, trio.ClosedResourceError, trio.BrokenResourceError) as exc:
            raise ConnectionLost(f"connection to {self.peer} is closed") from exc
        return protocol.decode(item) if isinstance(item, str) else item

    async def aclose(self) -> None:
        direct = self._direct
        direct.answer, direct.closed = None, True
        for scope in direct.running:
            scope.cancel()
        await self._send.aclose()
        await self._receive.aclose()


def connection_pair(
    a: str, b: str, buffer: int = CONNECTION_BUFFER, *, check_wire: bool | None = None,
) -> tuple[MemoryConnection, MemoryConnection]:
    """Two connected ends: the first is ``a``'s (its peer is ``b``), the second ``b``'s.
    ``check_wire``: round-trip every message through the codec (default: ``AIKI_CHECK_WIRE``)."""
    check = check_wire_default() if check_wire is None else check_wire
    a_to_b_send, a_to_b_receive = trio.open_memory_channel[Any](buffer)
    b_to_a_send, b_to_a_receive = trio.open_memory_channel[Any](buffer)
    direct = _Direct()
    return (
        MemoryConnection(b, a_to_b_send, b_to_a_receive, check, direct=direct),
        MemoryConnection(a, b_to_a_send, a_to_b_receive, check, direct=direct),
    )


@attrs.define(eq=False)
class MemoryTransport:
    """Addresses are plain names within one transport object. ``check_wire``: round-trip
    every message through the wire codec (default: the ``AIKI_CHECK_WIRE`` variable)."""

    check_wire: bool = attrs.field(factory=check_wire_default)
    _listeners: dict[str, trio.MemorySendChannel[Connection]] = attrs.field(factory=dict)
    _connections: int = 0

    async def connect(self, address: str) -> Connection:
        listener = self._listeners.get(address)
        if listener is None:
            raise ConnectionLost(f"nothing listens on memory address {address!r}")
        self._connections += 1
        client_end, server_end = connection_pair(
            f"client-{self._connections}", address, check_wire=self.check_wire
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


_KNOWN = frozenset(protocol.message_types().values())
