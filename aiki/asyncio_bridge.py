"""The one place where Trio meets asyncio: every use of trio-asyncio in Aiki is in this module.

asyncpg is an asyncio library, and a task may be an asyncio coroutine function
(``@aiki.task(loop="asyncio")``); Aiki runs on Trio. :class:`AsyncioBridge` opens one
trio-asyncio event loop (``trio_asyncio.open_loop()``) for the lifetime of whatever owns it (a
PostgreSQL store, or a worker that ran an asyncio task), and runs asyncio coroutines on it
with :meth:`run`. Everything else in ``aiki.store.postgres`` and :mod:`aiki.task_styles` is
either plain asyncio code (what runs on the loop) or plain Trio code (what calls
:meth:`run`), so replacing trio-asyncio (for example by an
asyncio loop in a thread, once trio-asyncio stops supporting a Python version: 0.16 subclasses
``asyncio.AbstractChildWatcher``, which Python 3.14 removes) means rewriting this module only.

Crossing costs about 40 µs, so callers cross once per store operation with the whole
transaction inside the coroutine, never once per statement.

Cancellation: cancelling the Trio caller of :meth:`run` cancels the asyncio task (one
``asyncio.CancelledError`` thrown into the coroutine), and :meth:`run` returns (raising
``trio.Cancelled``) only once that task has finished unwinding, so the coroutine's cleanup
(``finally`` blocks, giving a connection back to its pool) has always run by then.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, ParamSpec, TypeVar

import trio
import trio_asyncio  # type: ignore[import-untyped]

T = TypeVar("T")
P = ParamSpec("P")


class AsyncioBridge:
    """An asyncio event loop running inside Trio, and the way to run coroutines on it.

    Open it with ``async with AsyncioBridge.open() as bridge:``. :meth:`run` may then be
    called from any Trio task (not only the one that opened it) until the block ends.
    """

    def __init__(self, loop: Any) -> None:
        self._loop = loop

    @classmethod
    @asynccontextmanager
    async def open(cls) -> AsyncIterator[AsyncioBridge]:
        """Run an asyncio loop in this Trio task's nursery context for the block's duration.

        Leaving the block cancels whatever asyncio tasks are still running on the loop and
        waits for them, then closes the loop.
        """
        async with trio_asyncio.open_loop() as loop:
            yield cls(loop)

    @classmethod
    async def start_detached(cls) -> tuple[AsyncioBridge, Callable[[], Awaitable[None]]]:
        """Open the loop in a Trio system task of its own; the bridge and its ``close``.

        For owners that are opened with ``await`` and closed with ``aclose()``: a loop opened
        in the caller's task would hold cancel scopes there, and closing it from inside any
        scope opened since (a shielded cleanup block, say) would break Trio's nesting. The
        system task lives until ``close()`` is awaited, or until ``trio.run`` ends.
        """
        ready, stop, stopped = trio.Event(), trio.Event(), trio.Event()
        opened: list[AsyncioBridge] = []
        failed: list[Exception] = []

        async def host() -> None:
            try:
                async with cls.open() as bridge:
                    opened.append(bridge)
                    ready.set()
                    await stop.wait()
            except Exception as exc:  # a system task must not raise: hand it to the opener
                failed.append(exc)
            finally:
                ready.set()
                stopped.set()

        trio.lowlevel.spawn_system_task(host, name="aiki.store.postgres asyncio loop")
        try:
            await ready.wait()
        except BaseException:
            stop.set()
            raise
        if not opened:
            raise failed[0] if failed else RuntimeError("the asyncio loop did not start")

        async def close() -> None:
            stop.set()
            await stopped.wait()
            if failed:
                raise failed[0]

        return opened[0], close

    async def run(
        self, fn: Callable[P, Coroutine[Any, Any, T]], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """``await fn(*args, **kwargs)`` as an asyncio task on the loop; its result or error.

        The coroutine is created here but starts running on the asyncio loop, where asyncio
        APIs (``asyncio.get_running_loop()``, asyncio timeouts) work as usual.
        """
        result: T = await self._loop.run_aio_coroutine(fn(*args, **kwargs))
        return result
