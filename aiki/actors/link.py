"""Link: a client's or worker's connection to the server, with request/reply correlation.

It owns the connection and a reader task that routes each reply to the request waiting for
it (by ``req``) and every push (``Assign``) to ``on_push``. When the connection ends, every
waiting request fails with :class:`ConnectionLost`; nothing durable lives here.
"""

from __future__ import annotations

import logging
from collections.abc import AsyncIterator, Callable
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio

from aiki import errors
from aiki import protocol as p
from aiki.transport.base import Connection, Transport

log = logging.getLogger("aiki.link")

_REFUSALS: dict[str, type[errors.AikiError]] = {
    cls.__name__: cls
    for cls in (
        errors.StaleLease, errors.StepConflict, errors.RunNotFound, errors.UnknownWorkflow,
        errors.ProtocolError, errors.StoreUnavailable, errors.PayloadError,
    )
}


def refusal_error(msg: p.Refused) -> errors.AikiError:
    """The local exception for a server's ``Refused`` reply."""
    cls = _REFUSALS.get(msg.error_type, errors.AikiError)
    return cls(msg.message) if cls is not errors.AikiError else cls(
        f"{msg.error_type}: {msg.message}"
    )


@attrs.define(eq=False)
class _Waiter:
    done: trio.Event = attrs.field(factory=trio.Event)
    value: Any = None
    error: BaseException | None = None


@attrs.define(eq=False)
class Link:
    conn: Connection
    on_push: Callable[[Any], None]
    request_timeout: float = 30.0
    welcome: p.Welcome | None = None
    _req: int = 0
    _waiting: dict[int, _Waiter] = attrs.field(factory=dict)
    _lost: errors.ConnectionLost | None = None

    @classmethod
    @asynccontextmanager
    async def open(
        cls, transport: Transport, address: str, hello: Callable[[int], p.Hello],
        on_push: Callable[[Any], None] = lambda msg: None, request_timeout: float = 30.0,
    ) -> AsyncIterator[Link]:
        """Connect, say hello, and keep the reader running until the block ends."""
        conn = await transport.connect(address)
        link = cls(conn, on_push, request_timeout)
        failure: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                nursery.start_soon(link._read)
                try:
                    welcome = await link.request(hello)
                    if not isinstance(welcome, p.Welcome):
                        raise errors.ProtocolError(f"expected 'welcome', got {welcome!r}")
                    link.welcome = welcome
                    yield link
                except BaseException as exc:
                    failure = exc  # re-raised as itself, not wrapped in the nursery's group
                nursery.cancel_scope.cancel()
            if failure is not None:
                raise failure
        finally:
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await conn.aclose()

    def next_req(self) -> int:
        self._req += 1
        return self._req

    async def request(self, make: Callable[[int], Any], timeout: float | None = None) -> Any:
        """Send ``make(req)`` and return the reply; a ``Refused`` reply is raised as its error."""
        if self._lost is not None:
            raise self._lost
        req = self.next_req()
        waiter = self._waiting[req] = _Waiter()
        try:
            await self.conn.send(make(req))
            limit = self.request_timeout if timeout is None else timeout
            with trio.fail_after(limit):
                await waiter.done.wait()
        except trio.TooSlowError:
            raise TimeoutError(f"no reply from the server within {limit} s") from None
        finally:
            self._waiting.pop(req, None)
        if waiter.error is not None:
            raise waiter.error
        if isinstance(waiter.value, p.Refused):
            raise refusal_error(waiter.value)
        return waiter.value

    async def _read(self) -> None:
        try:
            while True:
                msg = await self.conn.receive()
                req = getattr(msg, "req", None)
                if isinstance(msg, p.Goodbye):
                    raise errors.ConnectionLost(f"the server closed the connection: {msg.reason}")
                if req is not None and req in self._waiting:
                    waiter = self._waiting[req]
                    waiter.value = msg
                    waiter.done.set()
                elif isinstance(msg, p.Refused):
                    log.warning("server refused a message: %s: %s", msg.error_type, msg.message)
                else:
                    self.on_push(msg)
        except errors.ConnectionLost as exc:
            self._lost = exc
        except errors.ProtocolError as exc:
            self._lost = errors.ConnectionLost(f"undecodable message from the server: {exc}")
        for waiter in self._waiting.values():
            waiter.error = self._lost
            waiter.done.set()
