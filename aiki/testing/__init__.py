"""Test your workflows in milliseconds: an in-memory engine on a virtual clock, task mocks,
and crashes on demand.

With pytest (pytest-trio, ``trio_mode = true``), the ``aiki_env`` fixture comes with aiki::

    async def test_expense_escalates(aiki_env, autojump_clock):
        env = await aiki_env(workflows=[expense])
        env.mock_task(notify, returns="sent")
        handle = await expense.enqueue(env.client, claim)
        await env.advance(timedelta(days=3))       # sleeps and timeouts fire
        assert await handle.wait_for_completion() == "escalated"
        assert env.task_calls(notify)[-1].to == "finance"

Without pytest, run under a mock clock::

    async def main():
        async with aiki.testing.environment([expense]) as env:
            ...

    trio.run(main, clock=aiki.testing.clock())

The clock jumps ahead whenever every task is blocked, so a workflow that sleeps for a week
finishes at once; ``env.advance(d)`` moves time on by hand (for a run that should still be
waiting afterwards). The engine is the real one (server, worker, store, codec): only the
store lives in memory and the task bodies you mock are replaced.
"""

from __future__ import annotations

import datetime
import inspect
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from contextlib import asynccontextmanager
from typing import Any

import attrs
import trio
import trio.testing

from aiki.actors.run import TaskDefinition, check_duration
from aiki.actors.scopes import serving_nursery
from aiki.actors.worker import Worker
from aiki.sdk.client import Client
from aiki.sdk.definitions import Task, Workflow
from aiki.sdk.embedded import embedded
from aiki.sources import Sources
from aiki.store import MemoryStore, Store
from aiki.testing.replay import ReplayResult, export, load, replay

__all__ = ["ReplayResult", "TestEnvironment", "clock", "environment", "export", "load",
           "replay"]

_UNSET: Any = object()
# Long enough that an idle test worker costs next to nothing in virtual time (it heartbeats
# every third of it), short enough that a crashed worker's runs move on within a test.
LEASE_TTL = 600.0


def clock() -> trio.testing.MockClock:
    """The clock to run an environment under without pytest: ``trio.run(main,
    clock=aiki.testing.clock())``. It jumps to the next deadline whenever all tasks wait."""
    return trio.testing.MockClock(autojump_threshold=0)


@attrs.define(eq=False)
class _Mock:
    returns: Any = _UNSET
    raises: BaseException | None = None
    side_effect: Callable[[Any], Any] | None = None

    async def __call__(self, payload: Any) -> Any:
        if self.side_effect is not None:
            value = self.side_effect(payload)
            return await value if inspect.isawaitable(value) else value
        if self.raises is not None:
            raise self.raises
        return self.returns


@attrs.define(eq=False)
class TestEnvironment:
    """An embedded engine for tests. ``client`` is its client; ``store`` its memory store."""

    __test__ = False  # not a test class, whatever pytest thinks of the name

    client: Client
    store: Store
    workflows: Sequence[Workflow[Any, Any]]
    _nursery: trio.Nursery
    _mocks: dict[str, _Mock] = attrs.field(factory=dict)
    _calls: dict[str, list[Any]] = attrs.field(factory=dict)
    _worker: tuple[Worker, trio.CancelScope] | None = None
    _workers_started: int = 0

    # -- tasks ---------------------------------------------------------------------------
    def mock_task(self, task: Task[Any, Any], *, returns: Any = _UNSET,
                  raises: BaseException | None = None,
                  side_effect: Callable[[Any], Any] | None = None) -> None:
        """From now on, ``task``'s body is not run: each attempt returns ``returns``, raises
        ``raises`` (retried per the task's policy, like a real failure), or returns what
        ``side_effect(payload)`` returns (a function or coroutine function). Results still
        go through the codec and the store, as real ones do."""
        if not isinstance(task, Task):
            raise TypeError(f"mock_task takes an @aiki.task definition, got {task!r}")
        given = sum(x is not _UNSET and x is not None for x in (returns, raises, side_effect))
        if given != 1:
            raise ValueError("give exactly one of returns=, raises= or side_effect=")
        self._mocks[task.name] = _Mock(returns, raises, side_effect)

    def task_calls(self, task: Task[Any, Any]) -> list[Any]:
        """The payloads ``task`` was called with, one per attempt, in order (mocked or
        not). A replayed result is not a call."""
        return list(self._calls.get(task.name, []))

    async def _run_task(self, task: TaskDefinition, payload: Any) -> Any:
        self._calls.setdefault(task.name, []).append(payload)
        mock = self._mocks.get(task.name)
        if mock is None:
            return await task.call(payload)
        return await mock(payload)

    # -- time and crashes ----------------------------------------------------------------
    async def advance(self, duration: float | datetime.timedelta) -> None:
        """Let ``duration`` of virtual time pass (sleeps, timeouts and retries due meanwhile
        fire). Needs the mock clock (the fixture's, or ``aiki.testing.clock()``)."""
        seconds = check_duration(duration, "env.advance()")
        if not isinstance(trio.lowlevel.current_clock(), trio.testing.MockClock):
            raise RuntimeError(
                "env.advance() needs Trio's MockClock: use the aiki_env fixture (it brings "
                "pytest-trio's autojump_clock), or trio.run(main, clock=aiki.testing.clock())")
        await trio.sleep(seconds)

    async def crash_worker(self) -> None:
        """Kill the worker at once, mid-run (it says nothing to the server, as a crashed
        process would not), and start another. Its runs resume on the new worker once their
        leases expire, from their checkpoints."""
        if self._worker is not None:
            self._worker[1].cancel()
            self._worker = None
        await self._start_worker()

    async def _start_worker(self) -> None:
        self._workers_started += 1
        worker = Worker(
            self.client.transport, self.client.address, list(self.workflows),
            f"test-worker-{self._workers_started}", self.client.sources,
            run_task=self._run_task,
        )
        scope: trio.CancelScope = await self._nursery.start(_run_in_scope, worker)
        self._worker = (worker, scope)

    @property
    def worker(self) -> Worker:
        """The worker running now."""
        assert self._worker is not None
        return self._worker[0]


async def _run_in_scope(worker: Worker, *,
                        task_status: trio.TaskStatus[trio.CancelScope]) -> None:
    """Run ``worker`` inside a cancel scope of its own, handed back once it is connected:
    cancelling it is the worker's crash."""
    with trio.CancelScope() as scope:
        async with trio.open_nursery() as nursery:
            await nursery.start(worker.run)
            task_status.started(scope)


@asynccontextmanager
async def environment(
    workflows: Sequence[Workflow[Any, Any]], *, store: Store | None = None,
    sources: Sources | None = None, lease_ttl: float = LEASE_TTL,
) -> AsyncIterator[TestEnvironment]:
    """An embedded engine (memory store unless ``store`` is given) with one worker for
    ``workflows``, for the block. See the module docstring."""
    for wf in workflows:
        if not isinstance(wf, Workflow):
            raise TypeError(f"workflows must be @aiki.workflow definitions, got {wf!r}")
    store = store if store is not None else MemoryStore()
    # Every message through the wire codec, as over a network: a test proves what a
    # deployment would accept, not only what a process talking to itself would.
    async with embedded(store, lease_ttl=lease_ttl, sources=sources or Sources.seeded(0),
                        check_wire=True) as client:
        async with serving_nursery() as nursery:
            env = TestEnvironment(client, store, list(workflows), nursery)
            await env._start_worker()
            yield env


Factory = Callable[..., Awaitable[TestEnvironment]]
