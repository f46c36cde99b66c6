"""The workflows the real-process tests run in ``aiki worker --app tests.remote.app:workflows``.

Every task execution appends ``<worker> start|end <key>`` to the file ``$AIKI_TEST_LOG`` (one
``write`` in append mode per line, so the lines of several processes do not mix), so a test
can count executions across processes. ``$AIKI_TEST_WORKER`` names the worker and
``$AIKI_TEST_TASK_SECONDS`` is how long each task takes.
"""

from __future__ import annotations

import os

import attrs
import trio

import aiki

WORKER = os.environ.get("AIKI_TEST_WORKER", "?")
TASK_SECONDS = float(os.environ.get("AIKI_TEST_TASK_SECONDS", "0.05"))


def record(event: str) -> None:
    path = os.environ.get("AIKI_TEST_LOG")
    if path:
        fd = os.open(path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            os.write(fd, f"{WORKER} {event}\n".encode())
        finally:
            os.close(fd)


@attrs.frozen
class Part:
    run: int
    step: int


@aiki.task(name="work")
async def work(part: Part) -> int:
    record(f"start {part.run}.{part.step}")
    await trio.sleep(TASK_SECONDS)
    record(f"end {part.run}.{part.step}")
    return part.run * 10 + part.step


@aiki.workflow(name="remote-sum", version="1")
async def remote_sum(run: aiki.WorkflowRun, n: int) -> int:
    """Three tasks in a row; the result is 30 n + 3."""
    total = 0
    for step in range(3):
        total += await work.run(run, Part(n, step))
    return total


@aiki.task(name="who")
async def who(n: int) -> str:
    record(f"start who.{n}")
    await trio.sleep(TASK_SECONDS)
    record(f"end who.{n}")
    return WORKER


@aiki.workflow(name="remote-who", version="1")
async def remote_who(run: aiki.WorkflowRun, n: int) -> str:
    """The name of the worker whose task result was recorded."""
    return await who.run(run, n)


workflows = [remote_sum, remote_who]


@aiki.task(name="gate")
async def gate(path: str) -> str:
    """Waits until the file ``path`` exists: a test opens the gate when it has looked."""
    while not os.path.exists(path):
        await trio.sleep(0.05)
    return "opened"


@aiki.workflow(name="remote-gated", version="1")
async def remote_gated(run: aiki.WorkflowRun, path: str) -> str:
    return await gate.run(run, path)


with_gate = [*workflows, remote_gated]


@aiki.workflow(name="remote-tree", version="1")
async def remote_tree(run: aiki.WorkflowRun, depth: int) -> int:
    """A tree of child runs ``depth`` levels below this one, two children each; each leaf
    runs one ``work`` task."""
    if depth == 0:
        return await work.run(run, Part(0, 0))
    return sum(await run.gather(*(remote_tree.call(run, depth - 1) for _ in range(2))))


with_tree = [*workflows, remote_tree]
