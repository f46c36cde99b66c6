"""aiki.testing.replay: a run's exported history against the code, running no task."""

from __future__ import annotations

import json

import pytest
import trio

import aiki
import aiki.testing
from aiki.testing import Factory

ran: list[str] = []
variant = {"v": "same"}


@aiki.task(name="step")
async def step(x: int) -> int:
    ran.append(f"step {x}")
    return x + 1


@aiki.workflow(name="evolving", version="1")
async def evolving(run: aiki.WorkflowRun, x: int) -> int:
    a = await step.run(run, x)
    if variant["v"] == "changed":
        a = await step.run(run, a + 100)
    b, c = await run.gather(step.run(run, a), step.run(run, a * 2))
    await run.sleep(0)
    return b + c


async def exported_run(env: aiki.testing.TestEnvironment, x: int) -> dict[str, object]:
    handle = await evolving.enqueue(env.client, x)
    await handle.wait_for_completion()
    store = env.store
    run = await store.get_run(handle.id)
    assert run is not None
    data = aiki.testing.export(run, await store.get_steps(handle.id),
                               await store.get_history(handle.id))
    return json.loads(json.dumps(data))  # as it is written to a file


async def test_a_compatible_version_replays_and_an_incompatible_one_names_the_step(
    aiki_env: Factory, autojump_clock: trio.abc.Clock,
) -> None:
    variant["v"] = "same"
    env = await aiki_env(workflows=[evolving])
    data = await exported_run(env, 1)
    ran.clear()
    result = await aiki.testing.replay(evolving, data)
    assert (result.outcome, result.steps) == ("completed", 4)
    assert ran == []  # no task ran
    variant["v"] = "changed"
    try:
        with pytest.raises(aiki.NonDeterminismError,
                           match=r"the code now calls a new StartStep at step 1 \(task 'step'\), "
                                 r"but the history has recorded steps it never reached "
                                 r"\(1.0.0, 1.1.0, 2\)"):
            await aiki.testing.replay(evolving, data)
    finally:
        variant["v"] = "same"
    assert ran == []


async def test_a_run_in_progress_replays_up_to_where_it_stands(
    aiki_env: Factory, autojump_clock: trio.abc.Clock,
) -> None:
    variant["v"] = "same"
    env = await aiki_env(workflows=[evolving])
    data = await exported_run(env, 2)
    data["steps"] = data["steps"][:1]  # as if exported after its first step
    data["run"]["state"] = "running"  # type: ignore[index]
    result = await aiki.testing.replay(evolving, data)
    assert result.outcome == "in progress" and result.steps == 1


def test_a_file_that_is_not_an_export_is_refused(tmp_path: object) -> None:
    with pytest.raises(ValueError, match="not an exported Aiki run"):
        aiki.testing.load({"format": "something else"})
    with pytest.raises(ValueError, match="malformed exported run"):
        aiki.testing.load({"format": "aiki.run/1", "run": {"id": 3}, "steps": []})
