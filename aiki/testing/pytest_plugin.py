"""The pytest plugin of ``aiki.testing`` (registered as a ``pytest11`` entry point): the
``aiki_env`` fixture. It needs pytest-trio, and the test must take pytest-trio's
``autojump_clock`` too (pytest-trio hands ``trio.run`` only a clock the test itself asks
for): ``async def test_x(aiki_env, autojump_clock): ...``."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import AsyncExitStack
from typing import Any

import pytest
import trio
import trio.testing

from aiki.testing import Factory, TestEnvironment, environment


@pytest.fixture
async def aiki_env() -> AsyncIterator[Factory]:
    """``env = await aiki_env(workflows=[...], store=None, lease_ttl=600.0)``: a test
    environment open for the rest of the test (see :mod:`aiki.testing`). Call it more than
    once for several environments. The test takes ``autojump_clock`` as well."""
    if not isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock):
        pytest.fail("the aiki_env fixture runs in virtual time: let the test take "
                    "pytest-trio's autojump_clock fixture too, as in "
                    "`async def test_x(aiki_env, autojump_clock)`", pytrace=False)
    requests_send, requests = trio.open_memory_channel[tuple[dict[str, Any], Any]](0)

    async def serve() -> None:
        # Environments hold nurseries, which one task must enter and leave: this one. The
        # test's calls are carried here; when the test is over the channel closes, and the
        # environments close in this same task.
        async with AsyncExitStack() as stack:
            async for kwargs, reply in requests:
                try:
                    env = await stack.enter_async_context(environment(**kwargs))
                except Exception as exc:
                    reply.send_nowait(exc)
                    continue
                reply.send_nowait(env)

    async def make(**kwargs: Any) -> TestEnvironment:
        reply_send, reply = trio.open_memory_channel[Any](1)
        await requests_send.send((kwargs, reply_send))
        got = await reply.receive()
        if isinstance(got, BaseException):
            raise got
        return got  # type: ignore[no-any-return]

    async with trio.open_nursery() as nursery:
        nursery.start_soon(serve)
        yield make
        await requests_send.aclose()
