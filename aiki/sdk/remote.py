"""``aiki.connect()``: a client of an ``aiki server`` over WebSocket.

It is an async context manager, like ``aiki.embedded()``: the connection has a reader and a
keepalive task, and in Trio a task lives inside a block, so a client does too::

    async with aiki.connect("ws://127.0.0.1:9090", token=token) as client:
        handle = await checkout.enqueue(client, order)
        async with aiki.worker(client, workflows=[checkout]):   # a worker in this process
            print(await handle.wait_for_completion(timeout=60))
"""

from __future__ import annotations

import os
import random
from collections.abc import AsyncIterator, Generator
from contextlib import AsyncExitStack, asynccontextmanager
from types import TracebackType
from typing import Any

from aiki.actors.link import open_when_reachable
from aiki.sdk.client import Client
from aiki.sources import Sources
from aiki.transport.websocket import WebSocketSettings, WebSocketTransport, client_ssl_context

TOKEN_VARIABLE = "AIKI_TOKEN"


class Connecting:
    """What ``aiki.connect()`` returns: use it with ``async with``."""

    def __init__(self, url: str, **options: Any) -> None:
        self._cm = _connect(url, **options)

    async def __aenter__(self) -> Client:
        return await self._cm.__aenter__()

    async def __aexit__(self, exc_type: type[BaseException] | None,
                        exc: BaseException | None, tb: TracebackType | None) -> bool | None:
        return await self._cm.__aexit__(exc_type, exc, tb)

    def __await__(self) -> Generator[Any, None, Client]:
        raise TypeError(
            "aiki.connect() is an async context manager: write "
            "`async with aiki.connect(url, token=...) as client:` (the connection's tasks "
            "live inside that block)"
        )


def connect(
    url: str, *, token: str | None = None, cafile: str | None = None,
    request_timeout: float = 30.0, max_frame_bytes: int | None = None,
    ping_interval: float | None = None, ping_timeout: float | None = None,
    sources: Sources | None = None, timeout: float = 30.0,
) -> Connecting:
    """Connect to the Aiki server at ``url`` (``ws://host:port`` or ``wss://host:port``).

    ``token``: the server's token (default: the ``AIKI_TOKEN`` environment variable).
    ``cafile``: a PEM file of CA certificates to trust for ``wss://`` (default: the
    system's). The client has the same API as ``aiki.embedded()``'s; it reconnects by itself
    after a lost connection, and requests wait for it (within ``request_timeout``).
    ``timeout``: seconds to keep trying, with backoff, while the server cannot be reached at
    first (it may start after its clients); 0 fails at once.

    Raises :class:`aiki.AuthenticationFailed` if the server refuses the token and
    :class:`aiki.ConnectionLost` if it cannot be reached within ``timeout``.
    """
    return Connecting(url, token=token, cafile=cafile, request_timeout=request_timeout,
                      max_frame_bytes=max_frame_bytes, ping_interval=ping_interval,
                      ping_timeout=ping_timeout, sources=sources, timeout=timeout)


@asynccontextmanager
async def _connect(
    url: str, *, token: str | None, cafile: str | None, request_timeout: float,
    max_frame_bytes: int | None, ping_interval: float | None, ping_timeout: float | None,
    sources: Sources | None, timeout: float,
) -> AsyncIterator[Client]:
    if token is None:
        token = os.environ.get(TOKEN_VARIABLE) or None
    options: dict[str, Any] = {
        name: value for name, value in (("max_frame_bytes", max_frame_bytes),
                                        ("ping_interval", ping_interval),
                                        ("ping_timeout", ping_timeout))
        if value is not None
    }
    settings = WebSocketSettings(
        token=token, ssl_context=client_ssl_context(cafile) if cafile else None, **options,
    )
    sources = sources or Sources.real()
    async with WebSocketTransport(settings) as transport, AsyncExitStack() as stack:
        yield await open_when_reachable(
            stack, lambda: Client.open(transport, url, sources, token,
                                       request_timeout=request_timeout),
            url, timeout, rng=random.Random(sources.rng.getrandbits(64)))
