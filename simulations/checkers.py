"""Invariant checkers over one seed's outcome, its ledger, and the same seed's fault-free run."""

from __future__ import annotations

import json
from typing import Any

from aiki.store.machine import RUN_TRANSITIONS, STEP_TRANSITIONS, UNSTARTED_TASK_TRANSITIONS
from simulations import workload
from simulations.world import Outcome


def check(outcome: Outcome, reference: Outcome | None) -> list[str]:
    """Every violation found, each a sentence naming the run and what went wrong."""
    v = list(outcome.violations)
    contents = outcome.store.inner.contents()
    ledger = outcome.ledger
    runs = contents.runs
    planned = {i.item: i for i in workload.plan(outcome.seed, outcome.runs_planned, 1.0)}

    # Acknowledged enqueues are never lost; nothing exists that no client asked for.
    for item, run_id in ledger.acked.items():
        if run_id not in runs:
            v.append(f"enqueue {item} was acknowledged as run {run_id}, which is not stored")
    for run_id in runs:
        if run_id not in ledger.issued:
            v.append(f"phantom run {run_id}: no client enqueued it")
    # One run per idempotency key.
    by_key: dict[str, set[str]] = {}
    for run in runs.values():
        if run.idempotency_key is not None:
            by_key.setdefault(run.idempotency_key, set()).add(run.id)
    for item, run_id in ledger.acked.items():
        key = planned[item].key
        if key is not None:
            by_key.setdefault(key, set()).add(run_id)
    for key, ids in sorted(by_key.items()):
        if len(ids) > 1:
            v.append(f"idempotency key {key!r} has {len(ids)} runs: {sorted(ids)}")

    for run in runs.values():
        history = contents.history[run.id]
        v += _transitions(run.id, history, ledger.deferred_starts)
        for event in history:
            if event.event == "task.running" and event.name in workload.RETRIES:
                limit = workload.RETRIES[event.name].max_attempts
                if event.attempt > limit:
                    v.append(f"run {run.id}: task {event.name} ran attempt {event.attempt} "
                             f"of a policy allowing {limit}")
        steps = contents.steps[run.id]
        if run.state == "completed":
            for step in steps:
                if step.state not in ("completed", "failed"):
                    v.append(f"run {run.id} completed with step {step.position} "
                             f"({step.name}) still {step.state}: a result it used was "
                             "never committed")
        # Quiescence: after the liveness phase everything servable has finished.
        if run.version != workload.UNSERVED_VERSION and run.state not in (
                "completed", "failed"):
            v.append(f"run {run.id} is still {run.state} after the liveness phase")
        if run.version == workload.UNSERVED_VERSION and (run.state, run.attempts) != (
                "queued", 0):
            v.append(f"run {run.id} of an unregistered version became {run.state}")
        if run.lease_owner is not None:
            v.append(f"run {run.id} still holds a lease of {run.lease_owner} at the end")

    # A committed task result is never executed again (replay returns it), by a worker that
    # records each start before the task runs (the default).
    committed_at: dict[tuple[str, str], float] = {}
    for step, at in ledger.final_steps.values():
        if step.kind == "task":
            spec = json.loads(step.input)
            committed_at[(spec["rk"], spec["label"])] = at
    for at, rk, label, task, worker in ledger.executions:
        done = committed_at.get((rk, label))
        if done is not None and at > done and worker not in ledger.deferred_starts:
            v.append(f"task {task} of {rk} step {label} executed at t={at:.3f}, after its "
                     f"result was committed at t={done:.3f}")

    # Results equal the fault-free run's, run by run.
    if reference is not None:
        for run_id, (state, payload, result) in outcome.runs.items():
            ref = reference.runs.get(run_id)
            if ref is None or ref[1] != payload or state not in ("completed", "failed"):
                continue
            if (state, result) != (ref[0], ref[2]):
                v.append(f"run {run_id} ended {state} with {result}; without faults it ended "
                         f"{ref[0]} with {ref[2]}")
    return v


def _transitions(run_id: str, history: list[Any], deferred_starts: set[str]) -> list[str]:
    out = []
    state: str | None = None
    released_by: set[str] = set()
    tasks: dict[str, str | None] = {}
    attempts: dict[str, int] = {}
    for e in history:
        kind, _, new = e.event.partition(".")
        if kind == "run":
            if (state, new) not in RUN_TRANSITIONS:
                out.append(f"run {run_id}: illegal transition {state} -> {new} at seq {e.seq}")
            state = new
            # A worker gives a run back when it stops: handing the run to it again strands
            # the run until its lease expires.
            if new == "queued" and e.detail == "released by its worker" and e.worker_id:
                released_by.add(e.worker_id)
            elif new == "running" and e.worker_id in released_by:
                out.append(f"run {run_id}: leased again at seq {e.seq} to worker "
                           f"{e.worker_id}, which had given it back")
        elif kind in STEP_TRANSITIONS and e.position is not None:  # (not an event's send)
            old = tasks.get(e.position or "")
            if (old, new) not in STEP_TRANSITIONS[kind] and not (kind == "task" and (
                    (old, new) in UNSTARTED_TASK_TRANSITIONS and e.worker_id in deferred_starts)):
                out.append(f"run {run_id}: task at step {e.position} went {old} -> {new}")
            # After `retrying` comes the next attempt; otherwise the same one goes on.
            expected = attempts.get(e.position or "", 0) + (old in (None, "retrying"))
            if e.attempt != expected:
                out.append(f"run {run_id}: task at step {e.position} went {old} -> {new} "
                           f"at attempt {e.attempt}, expected attempt {expected}")
            tasks[e.position or ""] = new
            attempts[e.position or ""] = e.attempt
    return out
