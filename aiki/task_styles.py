"""How a task body runs: as a Trio coroutine (the default, and the fastest), as a plain
``def`` in a worker thread, or as an asyncio coroutine through trio-asyncio.

The engine sees no difference: :meth:`aiki.Task.call` awaits :func:`run_body` whatever the
style, so retries, idempotency keys, checkpoints and timeouts are the same for all three.

- **Threads** come from Trio's thread pool (``trio.to_thread.run_sync``), at most
  ``task_threads`` at once per worker (a :class:`trio.CapacityLimiter` the worker lends its
  runs). Cancelling the run (a lost lease, a crash, a task timeout) *abandons* the thread:
  Trio stops waiting at once and the function's eventual result or exception is thrown
  away; Python cannot stop a running thread, so the function runs to its end, and its
  thread counts against ``task_threads`` until it does. A plain-``def`` task should
  therefore bound its own blocking calls (a request timeout, say).
- **asyncio** coroutines run on one trio-asyncio event loop per worker
  (:mod:`aiki.asyncio_bridge`), opened when the first asyncio task runs and closed when the
  worker stops, so asyncio libraries that keep a pool or a session between calls work.
  Cancelling the run cancels the asyncio task, and the call returns once it unwound.
"""

from __future__ import annotations

import contextvars
from collections.abc import AsyncIterator, Awaitable, Callable
from contextlib import asynccontextmanager
from typing import TYPE_CHECKING, Any, Literal

import attrs
import trio

if TYPE_CHECKING:
    from aiki.asyncio_bridge import AsyncioBridge

Style = Literal["trio", "thread", "asyncio"]
DEFAULT_TASK_THREADS = 16


@attrs.define(eq=False)
class TaskRuntime:
    """What a worker lends the task bodies of its runs: its thread limiter, and its asyncio
    loop (opened on first use)."""

    threads: trio.CapacityLimiter
    _bridge: AsyncioBridge | None = None
    _close: Callable[[], Awaitable[None]] | None = None
    _opening: trio.Lock = attrs.field(factory=trio.Lock)

    async def asyncio_bridge(self) -> AsyncioBridge:
        async with self._opening:
            if self._bridge is None:
                from aiki.asyncio_bridge import AsyncioBridge

                self._bridge, self._close = await AsyncioBridge.start_detached()
        return self._bridge

    async def aclose(self) -> None:
        close, self._close, self._bridge = self._close, None, None
        if close is not None:
            await close()


_RUNTIME: contextvars.ContextVar[TaskRuntime | None] = contextvars.ContextVar(
    "aiki_task_runtime", default=None)
# Checked immediately before a task body starts (the engine sets it for each attempt): it
# raises if the attempt must not start any more, e.g. because its lease's local deadline
# passed while the worker was paused (a GC pause, SIGSTOP, a VM migration) after the start
# record was acknowledged.
BODY_GATE: contextvars.ContextVar[Callable[[], None] | None] = contextvars.ContextVar(
    "aiki_body_gate", default=None)


def _pass_gate() -> None:
    gate = BODY_GATE.get()
    if gate is not None:
        gate()


@asynccontextmanager
async def task_runtime(threads: int = DEFAULT_TASK_THREADS) -> AsyncIterator[TaskRuntime]:
    """Lend the Trio tasks started inside the block (a worker's runs) a thread limiter of
    ``threads`` and an asyncio loop; the loop, if one was opened, is closed at the end."""
    if threads < 1:
        raise ValueError(f"task_threads must be >= 1, got {threads}")
    runtime = TaskRuntime(trio.CapacityLimiter(threads))
    token = _RUNTIME.set(runtime)
    try:
        yield runtime
    finally:
        _RUNTIME.reset(token)
        # The loop's asyncio tasks are cancelled and awaited: bounded, and done also when the
        # worker itself was cancelled (a crash).
        with trio.CancelScope(shield=True), trio.move_on_after(10):
            await runtime.aclose()


async def run_body(style: Style, fn: Callable[[Any], Any], payload: Any) -> Any:
    """Run one task body in its style and return its result (or raise its exception).

    The :data:`BODY_GATE` is passed with no await between it and the body's start (a thread
    body asks it from its thread, once it has a thread), so a pause anywhere before is seen.
    """
    if style == "trio":
        _pass_gate()
        return await fn(payload)
    runtime = _RUNTIME.get()
    if style == "thread":
        gate = BODY_GATE.get()

        def in_thread(payload: Any) -> Any:
            if gate is not None:
                trio.from_thread.run_sync(gate)
            return fn(payload)

        return await trio.to_thread.run_sync(
            in_thread, payload, abandon_on_cancel=True,
            limiter=runtime.threads if runtime is not None else None)
    if runtime is not None:
        bridge = await runtime.asyncio_bridge()
        _pass_gate()
        return await bridge.run(fn, payload)
    from aiki.asyncio_bridge import AsyncioBridge

    async with AsyncioBridge.open() as own:  # outside a worker: a loop for this call only
        _pass_gate()
        return await own.run(fn, payload)
