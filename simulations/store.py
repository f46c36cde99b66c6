"""The simulated store: the memory reference store behind injected faults, and the ledger.

The inner MemoryStore is "the database": it survives server crashes. The wrapper injects
errors before commit, errors after commit with the reply lost (an ambiguous commit),
unavailable windows, slow calls and driver bugs (a plain exception, which crashes the
StoreWriter so its supervisor restarts it). Every committed outcome is checked against the
ledger as it happens, so a violation is caught at the moment it is made.
"""

from __future__ import annotations

import random
from collections import Counter
from collections.abc import Sequence
from typing import Any

import attrs
import trio

from aiki.errors import AikiError, StoreUnavailable
from aiki.records import (
    FINAL_STEP_STATES,
    EventRecord,
    HistoryEvent,
    RunRecord,
    StepRecord,
    WaitRecord,
)
from aiki.store import ops as o
from aiki.store.memory import MemoryStore


@attrs.define
class StoreFaults:
    before_commit: float = 0.0
    after_commit: float = 0.0
    driver_bug: float = 0.0
    slow: float = 0.0
    unavailable_until: float = -1.0  # trio time


@attrs.define(eq=False)
class Ledger:
    """What really happened, kept outside every node so it survives their crashes."""

    violations: list[str] = attrs.field(factory=list)
    max_epoch: dict[str, int] = attrs.field(factory=dict)
    final_steps: dict[tuple[str, str], tuple[StepRecord, float]] = attrs.field(factory=dict)
    acked: dict[str, str] = attrs.field(factory=dict)  # logical run key -> run id
    issued: set[str] = attrs.field(factory=set)  # logical run keys clients tried to enqueue
    # (time, run key, step label, task name, worker id)
    executions: list[tuple[float, str, str, str, str]] = attrs.field(factory=list)
    # Workers that record a task's start only once it runs a while: a short attempt from a
    # lease gone stale unseen may run again after its result was committed (at-least-once).
    deferred_starts: set[str] = attrs.field(factory=set)
    sometimes: Counter[str] = attrs.field(factory=Counter)
    live_workers: set[str] = attrs.field(factory=set)

    def violation(self, text: str) -> None:
        try:
            when = f"t={trio.current_time():.3f}"
        except RuntimeError:  # reported after the run (the watchdog)
            when = "after the run"
        self.violations.append(f"{when}: {text}")


@attrs.define(eq=False)
class SimStore:
    inner: MemoryStore
    rng: random.Random
    ledger: Ledger
    trace: list[str]
    faults: StoreFaults = attrs.field(factory=StoreFaults)
    stats: Counter[str] = attrs.field(factory=Counter)

    async def apply(self, ops: Sequence[o.Op[Any]]) -> list[Any]:
        f, r = self.faults, self.rng
        if r.random() < f.slow:
            self.stats["slow"] += 1
            await trio.sleep(r.uniform(0.05, 2.0))
        else:
            await trio.lowlevel.checkpoint()
        if trio.current_time() < f.unavailable_until:
            self.stats["unavailable"] += 1
            raise StoreUnavailable("simulated: the database is unavailable")
        if r.random() < f.driver_bug:
            self.stats["driver_bug"] += 1
            raise RuntimeError("simulated: bug in the store driver")
        if r.random() < f.before_commit:
            self.stats["before_commit"] += 1
            raise StoreUnavailable("simulated: error before commit")
        outcomes = await self.inner.apply(ops)
        now = trio.current_time()
        for op, outcome in zip(ops, outcomes, strict=True):
            if not isinstance(outcome, AikiError):
                self._check(op, outcome, now)
        self.trace.append(f"{now:.6f} store {','.join(type(op).__name__ for op in ops)}")
        if r.random() < f.after_commit:
            self.stats["after_commit"] += 1
            self.ledger.sometimes["ambiguous commit"] += 1
            raise StoreUnavailable("simulated: connection lost after commit")
        return outcomes

    def _check(self, op: o.Op[Any], outcome: Any, now: float) -> None:
        led = self.ledger
        if isinstance(op, o.Claim):
            for claimed in outcome:
                run = claimed.run
                if run.lease_epoch <= led.max_epoch.get(run.id, 0):
                    led.violation(f"run {run.id} leased again at epoch {run.lease_epoch}")
                led.max_epoch[run.id] = run.lease_epoch
            return
        if isinstance(op, o.ExpireLeases):
            for run_id in outcome:
                history = self.inner.contents().history[run_id]
                owner = next((e.worker_id for e in reversed(history)
                              if e.event == "run.queued"), None)
                if owner in led.live_workers:
                    led.sometimes["lease expiry on a live worker"] += 1
            return
        lease = getattr(op, "lease", None)
        if lease is not None and lease.epoch != led.max_epoch.get(lease.run_id):
            led.violation(
                f"{type(op).__name__} for run {lease.run_id} accepted from epoch {lease.epoch}; "
                f"the current lease is epoch {led.max_epoch.get(lease.run_id)}")
        if isinstance(op, o.SaveStep) and op.step.state in FINAL_STEP_STATES:
            key = (lease.run_id, op.step.position)
            known = led.final_steps.get(key)
            if known is None:
                led.final_steps[key] = (op.step, now)
            elif known[0] != op.step:
                led.violation(f"run {key[0]} step {key[1]}: committed result {known[0].output!r}"
                              f" was changed to {op.step.output!r}")

    # -- reads pass through -------------------------------------------------------------
    async def get_run(self, run_id: str) -> RunRecord | None:
        return await self.inner.get_run(run_id)

    async def get_steps(self, run_id: str) -> tuple[StepRecord, ...]:
        return await self.inner.get_steps(run_id)

    async def get_history(self, run_id: str) -> tuple[HistoryEvent, ...]:
        return await self.inner.get_history(run_id)

    async def list_runs(self, *, workflow: str | None = None, state: str | None = None,
                        limit: int = 100) -> tuple[RunRecord, ...]:
        return await self.inner.list_runs(workflow=workflow, state=state, limit=limit)

    async def get_waits(self, run_id: str) -> tuple[WaitRecord, ...]:
        return await self.inner.get_waits(run_id)

    async def get_events(self, run_id: str) -> tuple[EventRecord, ...]:
        return await self.inner.get_events(run_id)

    async def next_due(self) -> float | None:
        return await self.inner.next_due()

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()
