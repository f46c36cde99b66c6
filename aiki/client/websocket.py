"""What the asyncio and the blocking client share about their WebSocket: the settings, the
options of the ``websockets`` library (which has an asyncio and a threading client over one
sans-IO protocol, see docs/architecture.md), and its errors as :mod:`aiki.errors`.

Both speak to ``aiki server`` exactly as the Trio transport does: the token in the handshake
(``Authorization: Bearer``), frames of at most ``max_frame_bytes`` both ways, pings every
``ping_interval`` seconds (a peer silent for ``ping_timeout`` more is dropped), ``wss://``
with the system's CAs or ``cafile``'s.
"""

from __future__ import annotations

import os
import random
import ssl
from typing import Any

import attrs
from websockets.exceptions import ConnectionClosed, InvalidStatus

from aiki.client.core import (
    DEFAULT_MAX_FRAME_BYTES,
    DEFAULT_REQUEST_TIMEOUT,
    Backoff,
    ClientProtocol,
    client_hello,
)
from aiki.errors import AikiError, AuthenticationFailed, ConfigError, ConnectionLost
from aiki.sources import Sources
from aiki.transport.websocket import client_ssl_context, parse_address

TOKEN_VARIABLE = "AIKI_TOKEN"


@attrs.frozen
class Settings:
    """One client's connection settings (see ``aiki.asyncio.connect``)."""

    url: str
    token: str | None = None
    ssl_context: ssl.SSLContext | None = None
    request_timeout: float = DEFAULT_REQUEST_TIMEOUT
    max_frame_bytes: int = DEFAULT_MAX_FRAME_BYTES
    ping_interval: float = 20.0
    ping_timeout: float = 20.0
    open_timeout: float = 10.0
    close_timeout: float = 5.0
    reconnect: Backoff = Backoff()

    @classmethod
    def of(cls, url: str, *, token: str | None = None, cafile: str | None = None,
           request_timeout: float = DEFAULT_REQUEST_TIMEOUT,
           max_frame_bytes: int | None = None, ping_interval: float | None = None,
           ping_timeout: float | None = None) -> Settings:
        """Settings for ``url`` (``ws://host:port`` or ``wss://...``); the token defaults to
        ``$AIKI_TOKEN``. Raises :class:`aiki.ConfigError` for a URL or value that cannot work."""
        endpoint = parse_address(url)
        if token is None:
            token = os.environ.get(TOKEN_VARIABLE) or None
        if token is not None and not token:
            raise ConfigError("the token is empty; give a non-empty token or none")
        if not request_timeout > 0:
            raise ConfigError(f"request_timeout must be a positive number of seconds, "
                              f"got {request_timeout!r}")
        context = None
        if endpoint.secure:
            context = client_ssl_context(cafile)
        options: dict[str, Any] = {
            name: value for name, value in (("max_frame_bytes", max_frame_bytes),
                                            ("ping_interval", ping_interval),
                                            ("ping_timeout", ping_timeout))
            if value is not None
        }
        return cls(endpoint.url, token, context, request_timeout, **options)

    def protocol(self, sources: Sources) -> ClientProtocol:
        """The sans-IO state of a new client with these settings."""
        node = f"client-{sources.short_id()}"
        return ClientProtocol(client_hello(node, self.token), self.url, self.request_timeout,
                              self.reconnect, random.Random(f"aiki-link:{node}"),
                              self.max_frame_bytes)

    def connect_options(self, open_timeout: float | None = None) -> dict[str, Any]:
        """Keyword arguments for ``websockets``' ``connect`` (asyncio or threading)."""
        headers = [] if self.token is None else [("Authorization", f"Bearer {self.token}")]
        return {
            "additional_headers": headers, "ssl": self.ssl_context,
            "open_timeout": self.open_timeout if open_timeout is None else open_timeout,
            "ping_interval": self.ping_interval, "ping_timeout": self.ping_timeout,
            "close_timeout": self.close_timeout, "max_size": self.max_frame_bytes,
            # The server (trio-websocket) negotiates no compression; no proxy from the
            # environment either, as the Trio client.
            "compression": None, "proxy": None, "user_agent_header": "aiki",
        }


def connect_failure(url: str, exc: BaseException) -> AikiError:
    """Why a connection attempt failed, as an aiki error: a refused token is
    :class:`AuthenticationFailed` (never retried); anything else :class:`ConnectionLost`."""
    if isinstance(exc, AikiError):
        return exc
    if isinstance(exc, InvalidStatus):
        response = exc.response
        body = bytes(response.body or b"").decode("utf-8", "replace").strip()
        cls = AuthenticationFailed if response.status_code in (401, 403) else ConnectionLost
        return cls(f"{url} refused the connection: HTTP {response.status_code}"
                   + (f": {body}" if body else ""))
    return ConnectionLost(f"cannot connect to {url}: {exc or type(exc).__name__}")


def lost_reason(url: str, exc: BaseException) -> ConnectionLost:
    """A connection that closed under us."""
    if isinstance(exc, ConnectionClosed):
        return ConnectionLost(f"connection to {url} closed: {exc}")
    return ConnectionLost(f"connection to {url} lost: {exc or type(exc).__name__}")
