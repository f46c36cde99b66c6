"""``aiki.asyncio.connect()``: the client for asyncio code (FastAPI, aiohttp, Django async).

::

    async with aiki.asyncio.connect("ws://127.0.0.1:9090", token=token) as client:
        handle = await checkout.enqueue(client, order, idempotency_key="order-42")
        print(await handle.wait_for_completion(timeout=30))

The same operations, errors and handles as the Trio client (``handle.status()``,
``.history()``, ``.wait_for_completion(timeout)``, ``client.enqueue(name, payload)``,
``client.handle(id)``, ``list_runs``, ``list_workers``): the protocol logic is
:mod:`aiki.client.core`'s; this module only moves its frames over a ``websockets`` asyncio
connection. No Trio runs here: one asyncio task (started by the block, ended with it) reads
replies and reconnects after a lost connection with jittered backoff; a request waiting for
its reply then goes out again on the new connection, within its timeout. Use one client from
any number of asyncio tasks of its event loop.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator
from contextlib import AbstractAsyncContextManager, asynccontextmanager
from typing import Any, TypeVar

from websockets.asyncio.client import ClientConnection
from websockets.asyncio.client import connect as ws_connect
from websockets.exceptions import ConnectionClosed

from aiki.client.core import Call, Closing, Event, Failed, Replied, Welcomed
from aiki.client.websocket import Settings, connect_failure, lost_reason
from aiki.errors import ConnectionLost
from aiki.sdk.client import Operations, RunHandle
from aiki.sources import Sources

T = TypeVar("T")
log = logging.getLogger("aiki.asyncio")


class Client(Operations):
    """A client of one Aiki server, for asyncio. Get one from :func:`connect`."""

    def __init__(self, settings: Settings, sources: Sources) -> None:
        self.settings = settings
        self.sources = sources
        self._core = settings.protocol(sources)
        self._waiting: dict[int, asyncio.Future[Any]] = {}
        self._ws: ClientConnection | None = None
        self._first = asyncio.Event()  # the first connection was welcomed, or failed for good

    @property
    def connections(self) -> int:
        """How many connections were opened (welcomed) so far: above 1 after a reconnect."""
        return self._core.connections

    # -- the operations: one line each, the Call says the rest ----------------------------
    async def call(self, call: Call[T]) -> T:
        """Send one :class:`~aiki.client.core.Call` and return what its reply means."""
        req, frame = self._core.request(call)
        future = asyncio.get_running_loop().create_future()
        self._waiting[req] = future
        try:
            async with asyncio.timeout(call.limit(self.settings.request_timeout)) as deadline:
                if frame is not None and self._ws is not None:
                    await self._send(self._ws, frame)
                return await future  # type: ignore[no-any-return]
        except TimeoutError:
            if deadline.expired():
                raise call.timed_out(self.settings.request_timeout) from None
            raise
        finally:
            del self._waiting[req]
            self._core.abandon(req)

    async def _send(self, ws: ClientConnection, frame: str) -> None:
        try:
            await ws.send(frame)
        except ConnectionClosed:
            pass  # the reader sees it too; the request goes out again after the next welcome

    async def _maintain(self) -> None:
        """Connect, serve, reconnect, until the client closes or is refused for good."""
        url = self.settings.url
        try:
            while self._core.ended is None:
                try:
                    ws = await ws_connect(url, **self.settings.connect_options())
                except Exception as exc:  # OSError, TimeoutError, a refused handshake, ...
                    self._deliver(self._core.lost(connect_failure(url, exc)))
                else:
                    self._deliver(self._core.lost(await self._serve(ws)))
                if self._core.ended is not None:
                    break
                await asyncio.sleep(self._core.next_delay())
        except Exception as exc:  # a bug here: every call fails with it, none hangs
            log.exception("the connection to %s failed", url)
            self._deliver(self._core.end(exc))
        finally:
            self._first.set()

    async def _serve(self, ws: ClientConnection) -> BaseException:
        """One connection, from hello to loss; returns why it ended."""
        try:
            await ws.send(self._core.opened())
            async for frame in ws:
                for event in self._core.receive(frame):
                    if isinstance(event, Welcomed):
                        self._ws = ws
                        self._first.set()
                        if event.resend is not None:
                            await self._send(ws, event.resend)
                    elif isinstance(event, Closing):
                        return event.error
                    else:
                        self._deliver([event])
            return ConnectionLost(f"the server closed the connection to {self.settings.url}")
        except ConnectionClosed as exc:
            return lost_reason(self.settings.url, exc)
        finally:
            self._ws = None
            await ws.close()

    def _deliver(self, events: list[Event]) -> None:
        for event in events:
            assert isinstance(event, (Replied, Failed))
            future = self._waiting.get(event.req)
            if future is None or future.done():
                continue
            if isinstance(event, Replied):
                future.set_result(event.value)
            else:
                future.set_exception(event.error)

    @classmethod
    @asynccontextmanager
    async def open(cls, settings: Settings, sources: Sources) -> AsyncIterator[Client]:
        client = cls(settings, sources)
        task = asyncio.create_task(client._maintain(), name=f"aiki client of {settings.url}")
        try:
            await client._first.wait()
            if client._core.ended is not None:
                raise client._core.ended
            yield client
        finally:
            client._deliver(client._core.end(ConnectionLost("the client is closed")))
            task.cancel()
            await asyncio.wait({task})  # its connection closed; never raises


def connect(
    url: str, *, token: str | None = None, cafile: str | None = None,
    request_timeout: float = 30.0, max_frame_bytes: int | None = None,
    ping_interval: float | None = None, ping_timeout: float | None = None,
    sources: Sources | None = None,
) -> AbstractAsyncContextManager[Client]:
    """Connect to the Aiki server at ``url`` (``ws://host:port`` or ``wss://host:port``);
    use it with ``async with``. The options are ``aiki.connect``'s.

    Raises :class:`aiki.AuthenticationFailed` if the server refuses the token and
    :class:`aiki.ConnectionLost` if it cannot be reached.
    """
    settings = Settings.of(url, token=token, cafile=cafile, request_timeout=request_timeout,
                           max_frame_bytes=max_frame_bytes, ping_interval=ping_interval,
                           ping_timeout=ping_timeout)
    return Client.open(settings, sources or Sources.system())


__all__ = ["Client", "RunHandle", "connect"]
