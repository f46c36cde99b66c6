"""A failure you can debug: the worker's traceback is stored (bounded), carried by
TaskFailed and WorkflowFailed, and logged by the worker at WARNING for every attempt."""

from __future__ import annotations

import logging

import pytest
import trio

import aiki
from aiki.store import Store


def parse_amount(text: str) -> int:
    return int(text)  # the line the traceback must point at


@aiki.task(name="parse", retry=aiki.Retry.fixed(2, 0.5))
async def parse(text: str) -> int:
    return parse_amount(text)


caught: list[aiki.TaskFailed] = []


@aiki.workflow(name="parser", version="1")
async def parser(run: aiki.WorkflowRun, text: str) -> int:
    try:
        return await parse.run(run, text)
    except aiki.TaskFailed as exc:
        caught.append(exc)
        raise


async def test_the_worker_traceback_is_stored_carried_and_logged(
    autojump_clock: trio.abc.Clock, engine_store: Store, sources: aiki.Sources,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caught.clear()
    caplog.set_level(logging.WARNING, logger="aiki.run")
    async with aiki.embedded(engine_store, sources=sources) as client:
        async with aiki.worker(client, workflows=[parser]):
            handle = await parser.enqueue(client, "12x")
            with pytest.raises(aiki.WorkflowFailed) as failed:
                await handle.wait_for_completion(timeout=60)
            steps = await engine_store.get_steps(handle.id)
    remote = failed.value.remote_traceback
    assert remote is not None
    assert "in parse_amount" in remote and "return int(text)" in remote
    assert "ValueError: invalid literal for int()" in remote
    assert "in parser" in remote  # and where the workflow was when it gave up
    task_trace = caught[0].remote_traceback
    assert task_trace is not None and "in parse_amount" in task_trace
    [step] = steps
    assert step.state == "failed" and step.error_traceback is not None
    assert "in parse_amount" in step.error_traceback
    attempts = [r for r in caplog.records if "task 'parse' attempt" in r.getMessage()]
    assert len(attempts) == 2  # every attempt's failure, not only the last
    assert handle.id in attempts[0].getMessage() and "retrying in 0.5 s" in attempts[0].getMessage()
    assert "in parse_amount" in attempts[1].getMessage()
    assert any(f"run {handle.id} (parser): failed" in r.getMessage() for r in caplog.records)


async def test_a_huge_traceback_is_cut_to_its_last_16_kib(
    autojump_clock: trio.abc.Clock, sources: aiki.Sources,
) -> None:
    @aiki.workflow(name="deep", version="1")
    async def deep(run: aiki.WorkflowRun, n: int) -> int:
        def down(i: int) -> int:
            if i == 0:
                raise RuntimeError("bottom " + "x" * 40_000)
            return down(i - 1)

        return down(n)

    async with aiki.embedded("memory", sources=sources) as client:
        async with aiki.worker(client, workflows=[deep]):
            handle = await deep.enqueue(client, 200)
            with pytest.raises(aiki.WorkflowFailed) as failed:
                await handle.wait_for_completion(timeout=60)
    remote = failed.value.remote_traceback
    assert remote is not None and remote.startswith("... (cut)")
    assert len(remote) <= 16 * 1024 + 20
    assert remote.rstrip().endswith("x")  # the end (where it failed) is kept
