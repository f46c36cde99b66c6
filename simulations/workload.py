"""Random workflows from a seeded grammar, interpreted by one generic workflow definition.

A *program* (part of the run's payload) is a list of steps; each step calls one task or a
``run.gather`` of several. Tasks differ by retry policy; a step may fail transiently (fewer
times than its policy allows, so the fault-free run succeeds too), fail permanently, reuse an
idempotency key, or catch the failure. Each task execution is recorded by the simulated
service in the ledger, so the checkers can see every external effect.
"""

from __future__ import annotations

import contextvars
import random
import zlib
from typing import Any

import attrs
import trio

import aiki
from simulations.store import Ledger

_LEDGER: list[Ledger] = []  # the world currently running (one per process at a time)
# The worker whose task is running: set by each worker node, inherited by its Trio tasks.
NODE: contextvars.ContextVar[str] = contextvars.ContextVar("sim_node", default="?")
_CALLS: dict[tuple[str, str], int] = {}

RETRIES: dict[str, aiki.Retry] = {
    "t-none": aiki.Retry.none(),
    "t-fixed": aiki.Retry.fixed(3, 0.5),
    "t-exp": aiki.Retry.exponential(4, 0.2, max_delay=2.0),
    "t-jit": aiki.Retry.jittered(4, 0.2, max_delay=2.0),
    "t-long": aiki.Retry.fixed(2, 30.0),  # longer than inline_retry_max: the run sleeps
}


def bind(ledger: Ledger) -> None:
    _LEDGER[:] = [ledger]
    _CALLS.clear()


def _make_task(name: str, retry: aiki.Retry) -> aiki.Task[dict[str, Any], int]:
    async def body(spec: dict[str, Any]) -> int:
        key = (spec["rk"], spec["label"])
        _CALLS[key] = _CALLS.get(key, 0) + 1
        if _LEDGER:
            _LEDGER[0].executions.append(
                (trio.current_time(), spec["rk"], spec["label"], name, NODE.get()))
        await trio.sleep(spec["work"])
        fail = spec["fail"]
        if fail == -1:
            raise aiki.NonRetryableError(f"{spec['label']} is refused for good")
        if fail == -2:
            raise RuntimeError(f"{spec['label']} always breaks")
        if _CALLS[key] <= fail:
            raise ConnectionError(f"{spec['label']} transient failure {_CALLS[key]}")
        return (spec["x"] * 31 + zlib.crc32(spec["label"].encode())) % 1_000_003

    body.__name__ = name.replace("-", "_")
    return aiki.task(name=name, retry=retry)(body)


TASKS = {name: _make_task(name, retry) for name, retry in RETRIES.items()}


async def _interpret(run: aiki.WorkflowRun, program: dict[str, Any]) -> list[int]:
    acc = int(program["x"])
    out: list[int] = []
    for step in program["steps"]:
        if "gather" in step:
            values = await run.gather(*[
                TASKS[s["task"]].run(run, {**s, "x": acc, "rk": program["rk"]},
                                     idempotency_key=s.get("key"))
                for s in step["gather"]
            ])
            acc = sum(values) % 1_000_003
        else:
            s = step["call"]
            try:
                acc = await TASKS[s["task"]].run(run, {**s, "x": acc, "rk": program["rk"]},
                                                 idempotency_key=s.get("key"))
            except aiki.TaskFailed:
                if not s.get("catch"):
                    raise
                acc = -1
        out.append(acc)
    return out


def _workflow(version: str) -> aiki.Workflow[dict[str, Any], list[int]]:
    async def sim_workflow(run: aiki.WorkflowRun, program: dict[str, Any]) -> list[int]:
        return await _interpret(run, program)

    return aiki.workflow(name="sim", version=version)(sim_workflow)


WORKFLOWS = {v: _workflow(v) for v in ("1", "2")}
UNSERVED_VERSION = "3"  # enqueued sometimes; no worker has it: the run must stay queued


@attrs.frozen
class PlannedRun:
    """One logical enqueue a client makes (retried until acknowledged)."""

    item: str  # unique per enqueue
    run_id: str  # chosen by the client once, reused on every retry
    at: float
    version: str
    key: str | None
    program: dict[str, Any]


def _task_spec(r: random.Random, label: str, keys: list[str]) -> dict[str, Any]:
    task = r.choice(list(RETRIES))
    attempts = RETRIES[task].max_attempts
    roll = r.random()
    if roll < 0.08:
        fail = -1  # non-retryable
    elif roll < 0.12:
        fail = -2  # fails every attempt: retries exhausted
    elif roll < 0.5 and attempts > 1:
        fail = r.randrange(1, attempts)  # transient, succeeds within the policy
    else:
        fail = 0
    spec: dict[str, Any] = {"task": task, "label": label, "fail": fail,
                            "work": r.choice([0.0, 0.01, 0.5, 3.0])}
    if r.random() < 0.15:
        spec["key"] = r.choice(keys) if keys and r.random() < 0.5 else f"k-{label}"
        keys.append(spec["key"])
    if fail < 0 and r.random() < 0.5:
        spec["catch"] = True
    return spec


def plan(seed: int, n_runs: int, duration: float) -> list[PlannedRun]:
    r = random.Random(f"{seed}:workload")
    planned: list[PlannedRun] = []
    run_keys: list[str] = []
    for i in range(n_runs):
        rk = f"r{i}"
        keys: list[str] = []
        steps: list[dict[str, Any]] = []
        for j in range(r.randint(1, 5)):
            if r.random() < 0.25:
                width = r.randint(2, 4)
                specs = [_task_spec(r, f"{rk}.{j}.{b}", []) for b in range(width)]
                for s in specs:  # a failing branch would cancel its siblings mid-task
                    s.pop("catch", None)
                steps.append({"gather": specs})
            else:
                steps.append({"call": _task_spec(r, f"{rk}.{j}", keys)})
        version = r.choice(["1", "1", "2", "2", "2", UNSERVED_VERSION] if r.random() < 0.3
                           else ["1", "2"])
        key = None
        if r.random() < 0.3:
            key = r.choice(run_keys) if run_keys and r.random() < 0.4 else f"order-{i}"
            run_keys.append(key)
        run_id = f"run-{seed}-{i}-{r.getrandbits(32):08x}"
        program = {"rk": rk, "x": r.randint(0, 1000), "steps": steps}
        planned.append(PlannedRun(f"e{i}", run_id, r.uniform(0, duration * 0.7), version, key,
                                  program))
    return planned
