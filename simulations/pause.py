"""Process pauses: every Trio task of one simulated process frozen, its clock going on.

A real process stops as a whole (a GC pause, SIGSTOP, a VM migration, a laptop lid) and
then continues exactly where it stood, its deadlines long past. Here all processes share one
``trio.run``, so a pause freezes the tasks that belong to one process: those whose context
carries :data:`PROCESS` = its name (set once in the process's root task, inherited by every
task it spawns). While the process is paused, a wake-up of one of its tasks (a message that
arrives, a timeout that fires, a cancellation) is held instead of scheduled, and tasks that
were already runnable are taken out of the run queue; on resume they are all scheduled at
once, in the order their wake-ups came. So nothing of the process runs during the pause, and
after it every timer that expired meanwhile fires together, as after a real one.

This wraps ``Runner.reschedule``, the one call through which Trio makes a blocked task
runnable, and edits ``runq``: private names of Trio (pinned in pyproject, as the
deterministic-scheduling hook is; a canary test fails loudly if they change).
"""

from __future__ import annotations

import contextlib
import contextvars
import math
from collections.abc import Iterator
from typing import Any

import attrs
import trio
from trio._core import _run

# The simulated process a task belongs to (None: the world itself: network, injector).
PROCESS: contextvars.ContextVar[str | None] = contextvars.ContextVar("sim_process",
                                                                    default=None)


def process_of(task: Any) -> str | None:
    return task.context.get(PROCESS)  # type: ignore[no-any-return]


@attrs.define(eq=False)
class Freezer:
    """Pauses and resumes simulated processes inside the running ``trio.run``."""

    paused: set[str] = attrs.field(factory=set)
    held: dict[str, list[Any]] = attrs.field(factory=dict)  # process -> its frozen tasks
    pauses: int = 0
    count: dict[str, int] = attrs.field(factory=dict)  # process -> pauses so far
    spans: dict[str, list[list[float]]] = attrs.field(factory=dict)  # -> [from, to] each

    @contextlib.contextmanager
    def installed(self) -> Iterator[Freezer]:
        """Route Trio's reschedule through this freezer while the block runs."""
        real = _run.Runner.reschedule
        freezer = self

        def reschedule(runner: Any, task: Any, next_send: Any = _run._NO_SEND) -> None:
            real(runner, task, next_send)
            if freezer.paused:
                node = process_of(task)
                if node in freezer.paused and runner.runq and runner.runq[-1] is task:
                    runner.runq.pop()  # runnable, with its value: scheduled on resume
                    freezer.held[node].append(task)

        _run.Runner.reschedule = reschedule  # type: ignore[method-assign]
        try:
            yield self
        finally:
            _run.Runner.reschedule = real  # type: ignore[method-assign]

    def pause(self, node: str) -> None:
        if node in self.paused:
            return
        self.spans.setdefault(node, []).append([trio.current_time(), math.inf])
        self.pauses += 1
        self.count[node] = self.count.get(node, 0) + 1
        self.paused.add(node)
        held = self.held.setdefault(node, [])
        runq = _run.GLOBAL_RUN_CONTEXT.runner.runq
        keep = [t for t in runq if process_of(t) != node]
        held += [t for t in runq if process_of(t) == node]
        runq.clear()
        runq.extend(keep)

    def resume(self, node: str) -> None:
        if node not in self.paused:
            return
        self.paused.discard(node)
        self.spans[node][-1][1] = trio.current_time()
        _run.GLOBAL_RUN_CONTEXT.runner.runq.extend(self.held.pop(node, []))

    def resume_all(self) -> None:
        for node in sorted(self.paused):
            self.resume(node)

    def pauses_of(self, node: str | None) -> int:
        return self.count.get(node, 0) if node is not None else 0

    def is_paused(self, node: str) -> bool:
        return node in self.paused


async def freeze_here(freezer: Freezer, node: str) -> None:
    """Pause ``node`` from one of its own tasks: this task stops at once, with the rest."""
    freezer.pause(node)
    await trio.lowlevel.checkpoint()


__all__ = ["PROCESS", "Freezer", "freeze_here", "process_of"]
