"""The places where Trio meets asyncio: every use of trio-asyncio, and every asyncio loop of
Aiki's own, is in this module.

Two bridges, for two kinds of asyncio code:

- :class:`AsyncioThread`, an asyncio loop (uvloop's when installed) in a thread of its own:
  what the PostgreSQL store drives asyncpg on. The store's code on that loop is Aiki's own and
  touches nothing of Trio's, and a real loop in a thread is several times faster than a loop
  Trio schedules (measured below).
- :class:`AsyncioBridge`, one trio-asyncio loop inside Trio: what asyncio-style task bodies
  (``@aiki.task(loop="asyncio")``) run on, in the worker's own thread as before (moving
  user code to another thread changes what it may share, and is a decision of its own).
  Only this one needs
  trio-asyncio (``pip install 'aiki[asyncio-tasks]'``), imported when it is first opened, so
  ``import aiki`` never loads it.

Both run a coroutine with ``await bridge.run(fn, *args)``, once per store operation (the
whole transaction inside the coroutine), never once per statement. Measured here (2 cores):
a crossing costs about 30 µs through the thread and 75 µs through trio-asyncio; a
5-statement asyncpg transaction takes 0.33 ms on uvloop in a thread, 0.85 ms on asyncio's
own loop in a thread and 0.97 ms on trio-asyncio.

Cancellation: cancelling the Trio caller of ``run`` cancels the asyncio task (one
``asyncio.CancelledError`` thrown into the coroutine), and ``run`` returns (raising
``trio.Cancelled``) only once that task has finished unwinding, so the coroutine's cleanup
(``finally`` blocks, giving a connection back to its pool) has always run by then.
"""

from __future__ import annotations

import asyncio
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Coroutine
from contextlib import asynccontextmanager
from typing import Any, ParamSpec, TypeVar

import outcome
import trio

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
        try:
            import trio_asyncio  # type: ignore[import-untyped]  # (only for this kind of loop)
        except ImportError as exc:
            raise ImportError(f"asyncio task bodies run through trio-asyncio ({exc}); install "
                              "it with pip install 'aiki[asyncio-tasks]'") from exc

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


class AsyncioThread:
    """An asyncio event loop (uvloop's when it is installed) running in a thread of its own,
    and the way to run coroutines on it from Trio: what the PostgreSQL store drives asyncpg
    with.

    Why not :class:`AsyncioBridge`: under trio-asyncio every asyncio loop iteration is a
    round of Trio's scheduler, on the thread that also runs the engine (see the module's
    figures). A crossing here is one ``call_soon_threadsafe`` there and one
    ``run_sync_soon`` back. The loop's clock is the
    real one (asyncpg's timeouts are wall-clock timeouts, whatever clock Trio runs on).

    Open it with ``async with AsyncioThread.open() as loop:`` (or :meth:`start_detached`);
    :meth:`run` may be called from any task of the Trio run that opened it. Code running on
    the loop must not touch Trio objects, and Trio code must not touch objects the loop owns
    (an asyncpg connection) except through :meth:`run` or :meth:`call_soon`. Leaving cancels
    whatever still runs on the loop, waits for it, and joins the thread.
    """

    def __init__(self, loop: asyncio.AbstractEventLoop, thread: threading.Thread) -> None:
        self._loop = loop
        self._thread = thread

    @classmethod
    @asynccontextmanager
    async def open(cls) -> AsyncIterator[AsyncioThread]:
        bridge, close = await cls.start_detached()
        try:
            yield bridge
        finally:
            with trio.CancelScope(shield=True):
                await close()

    @classmethod
    async def start_detached(cls) -> tuple[AsyncioThread, Callable[[], Awaitable[None]]]:
        """Start the loop's thread; the bridge and its ``close`` (callable from any task and
        inside any cancel scope: the loop holds no Trio scope)."""
        token = trio.lowlevel.current_trio_token()
        started = trio.Event()
        made: list[asyncio.AbstractEventLoop] = []

        def host() -> None:
            loop = _new_loop()
            made.append(loop)
            token.run_sync_soon(started.set)
            try:
                loop.run_forever()
            finally:
                loop.close()

        thread = threading.Thread(target=host, name="aiki asyncio loop", daemon=True)
        thread.start()
        with trio.CancelScope(shield=True):  # the thread exists: never leave it unowned
            await started.wait()
        bridge = cls(made[0], thread)
        return bridge, bridge._close

    async def _close(self) -> None:
        loop = self._loop
        if loop.is_closed() or not self._thread.is_alive():
            await trio.lowlevel.checkpoint()
            return

        async def cancel_the_rest() -> None:
            rest = [t for t in asyncio.all_tasks() if t is not asyncio.current_task()]
            for task in rest:
                task.cancel()
            await asyncio.gather(*rest, return_exceptions=True)

        with trio.CancelScope(shield=True):
            try:
                await self.run(cancel_the_rest)
            finally:
                loop.call_soon_threadsafe(loop.stop)
                await trio.to_thread.run_sync(self._thread.join)

    def call_soon(self, fn: Callable[[], object]) -> None:
        """Call ``fn()`` on the loop's thread, soon; it must not raise."""
        self._loop.call_soon_threadsafe(fn)

    async def run(
        self, fn: Callable[P, Coroutine[Any, Any, T]], *args: P.args, **kwargs: P.kwargs
    ) -> T:
        """``await fn(*args, **kwargs)`` as an asyncio task on the loop; its result or error.

        Cancelling the caller cancels the asyncio task, and this returns (raising
        ``trio.Cancelled``) only once the task has finished unwinding. If the task finished
        anyway (the cancel came too late), its result is returned, or its error raised.
        """
        token = trio.lowlevel.current_trio_token()
        caller = trio.lowlevel.current_task()
        task: list[asyncio.Future[T]] = []
        cancelled = False

        def finished(fut: asyncio.Future[T]) -> None:
            token.run_sync_soon(trio.lowlevel.reschedule, caller, outcome.Value(fut))

        def submit() -> None:
            fut = self._loop.create_task(fn(*args, **kwargs))
            task.append(fut)
            if cancelled:
                fut.cancel()
            fut.add_done_callback(finished)

        def cancel() -> None:
            nonlocal cancelled
            cancelled = True
            if task:
                task[0].cancel()

        def abort(raise_cancel: Any) -> trio.lowlevel.Abort:
            self._loop.call_soon_threadsafe(cancel)
            return trio.lowlevel.Abort.FAILED  # rescheduled once the task has unwound

        self._loop.call_soon_threadsafe(submit)
        fut: asyncio.Future[T] = await trio.lowlevel.wait_task_rescheduled(abort)
        if fut.cancelled():
            if cancelled:
                await trio.lowlevel.checkpoint()  # raises Cancelled: our scope was cancelled
            raise RuntimeError("the asyncio loop was closed while a call on it was running")
        return fut.result()


def _new_loop() -> asyncio.AbstractEventLoop:
    try:
        import uvloop
    except ImportError:  # (Windows, or not installed: the standard loop)
        return asyncio.SelectorEventLoop()
    loop: asyncio.AbstractEventLoop = uvloop.new_event_loop()
    return loop
