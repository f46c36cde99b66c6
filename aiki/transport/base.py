"""The Transport / Connection interface: all a server, worker or client needs from a network."""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Any, Protocol

import trio


class Connection(Protocol):
    """One bidirectional message stream.

    ``receive`` raises :class:`~aiki.errors.ConnectionLost` once the peer is gone and
    :class:`~aiki.errors.ProtocolError` for a message that does not decode (the connection
    stays usable). ``send`` raises ConnectionLost when the stream is closed.
    ``try_send`` sends as ``send`` does where that needs no wait, and otherwise sends nothing
    and returns False (a full send queue); it raises what ``send`` raises.
    """

    peer: str

    async def send(self, msg: Any) -> None: ...

    def try_send(self, msg: Any) -> bool: ...

    async def receive(self) -> Any: ...

    async def aclose(self) -> None: ...


Handler = Callable[[Connection], Awaitable[None]]


class Transport(Protocol):
    async def connect(self, address: str) -> Connection: ...

    async def serve(
        self,
        address: str,
        handler: Handler,
        *,
        task_status: trio.TaskStatus[str] = trio.TASK_STATUS_IGNORED,
    ) -> None:
        """Accept connections on ``address`` and run ``handler`` for each in a nursery this
        call owns, until cancelled. ``task_status.started`` gets the bound address."""
        ...
