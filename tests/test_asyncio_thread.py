"""The asyncio loop in a thread that the PostgreSQL store drives asyncpg on
(:class:`aiki.asyncio_bridge.AsyncioThread`): results, errors, cancellation and closing."""

from __future__ import annotations

import asyncio
import threading

import pytest
import trio

from aiki.asyncio_bridge import AsyncioThread


async def test_a_coroutine_runs_on_the_loop_thread_and_its_result_or_error_comes_back() -> None:
    async def where(x: int) -> tuple[int, str, bool]:
        await asyncio.sleep(0)
        return x + 1, threading.current_thread().name, asyncio.get_running_loop().is_running()

    async def fails() -> None:
        await asyncio.sleep(0)
        raise KeyError("no such row")

    async with AsyncioThread.open() as loop:
        value, thread, running = await loop.run(where, 41)
        assert (value, running) == (42, True)
        assert thread != threading.current_thread().name
        with pytest.raises(KeyError, match="no such row"):
            await loop.run(fails)
        results = []  # many callers at once, from many Trio tasks
        async with trio.open_nursery() as nursery:
            for i in range(20):
                async def call(i: int = i) -> None:
                    results.append((await loop.run(where, i))[0])
                nursery.start_soon(call)
        assert sorted(results) == list(range(1, 21))


async def test_a_cancelled_caller_returns_only_after_the_asyncio_task_unwound() -> None:
    unwound = threading.Event()
    entered = trio.Event()
    token = trio.lowlevel.current_trio_token()
    returned: list[bool] = []

    async def blocks() -> None:
        try:
            token.run_sync_soon(entered.set)
            await asyncio.sleep(3600)
        finally:
            await asyncio.sleep(0.01)  # cleanup that itself awaits
            unwound.set()

    async with AsyncioThread.open() as loop:
        with trio.move_on_after(10) as outer:
            async with trio.open_nursery() as nursery:
                cancel_scope = trio.CancelScope()

                async def caller() -> None:
                    with cancel_scope:
                        await loop.run(blocks)
                        returned.append(True)
                    assert cancel_scope.cancelled_caught

                async def cancel_once_entered() -> None:
                    await entered.wait()
                    cancel_scope.cancel()

                nursery.start_soon(caller)
                nursery.start_soon(cancel_once_entered)
                # caller exits its scope (Cancelled caught there) before the nursery ends
        assert not outer.cancelled_caught and not returned
        assert unwound.is_set()  # the finally block ran before run() gave up


async def test_a_caller_cancelled_before_its_coroutine_started_does_not_start_it() -> None:
    started = threading.Event()

    async def body() -> None:
        started.set()

    async with AsyncioThread.open() as loop:
        with trio.CancelScope() as scope:
            scope.cancel()
            await loop.run(body)
        assert scope.cancelled_caught
        assert not started.is_set()


async def test_closing_cancels_what_still_runs_and_joins_the_thread() -> None:
    cleaned = threading.Event()

    async def forever() -> None:
        try:
            await asyncio.sleep(3600)
        finally:
            cleaned.set()

    loop, close = await AsyncioThread.start_detached()
    threads = {t for t in threading.enumerate() if t.name == "aiki asyncio loop"}
    assert threads
    ran: list[str] = []
    loop.call_soon(lambda: ran.append(threading.current_thread().name))
    async with trio.open_nursery() as nursery:
        async def runs_forever() -> None:
            with pytest.raises(RuntimeError, match="loop was closed"):
                await loop.run(forever)
        nursery.start_soon(runs_forever)
        await trio.sleep(0.05)
        with trio.CancelScope(shield=True):  # closing works inside any scope
            await close()
    assert cleaned.is_set()
    assert ran == ["aiki asyncio loop"]
    assert not any(t.is_alive() for t in threads)
    await close()  # a second close is a no-op
