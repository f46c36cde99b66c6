"""Invariant checkers over one seed's outcome, its ledger, and the same seed's fault-free run."""

from __future__ import annotations

import json
from typing import Any

import attrs

from aiki import schedules as sch
from aiki.metrics import RUNS
from aiki.records import TERMINAL_RUN_STATES, StepRecord, deadline_expiry
from aiki.store.machine import (
    CUT_TASK_TRANSITIONS,
    DEADLINE_EXCEEDED,
    RUN_TRANSITIONS,
    STEP_TRANSITIONS,
    UNSTARTED_TASK_TRANSITIONS,
    scheduled_by,
)
from simulations import workload
from simulations.network import Session
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
    started_by = {run_id: scheduled_by(h[0].detail if h else None)
                  for run_id, h in contents.history.items()}
    for run_id, run in runs.items():
        by_parent = run.parent_id in runs and any(
            e.event == "child.started" and e.detail and e.detail.startswith(f"run {run_id} ")
            for e in contents.history[run.parent_id])
        if run_id not in ledger.issued and started_by.get(run_id) is None and not by_parent:
            v.append(f"phantom run {run_id}: no client enqueued it, no schedule or parent "
                     "started it")
        elif started_by.get(run_id) is not None and started_by[run_id][0] not in (
                ledger.schedules):
            v.append(f"phantom run {run_id}: started by schedule {started_by[run_id][0]}, "
                     "which no client defined")
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
        v += _paused(run.id, history, ledger.deferred_starts)
        v += _retried(run.id, history)
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
                "completed", "failed", "cancelled"):
            v.append(f"run {run.id} is still {run.state} after the liveness phase")
        if run.version == workload.UNSERVED_VERSION and (
                run.attempts != 0 or run.state not in ("queued", "cancelled")):
            v.append(f"run {run.id} of an unregistered version became {run.state}")
        if run.lease_owner is not None:
            v.append(f"run {run.id} still holds a lease of {run.lease_owner} at the end")

    # A committed task result is never executed again (replay returns it), by a worker that
    # records each start before the task runs (the default).
    # (Repeated identical calls share one address: an execution after all of its calls'
    # results were committed is one too many.)
    # (A fork runs the same program, its task inputs and all: its fresh steps run tasks
    # the original ran; the fork checker below looks at what it copied.)
    # (A call whose run ended before its result, cancelled between two identical calls, is
    # one of them still: its step was recorded, its result never was.)
    forked = {json.loads(runs[r].payload)["rk"] for r in ledger.forks if r in runs}
    committed_at: dict[tuple[str, str], float] = {}
    calls: dict[tuple[str, str], set[tuple[str, str]]] = {}  # -> (run id, position) of each
    results: dict[tuple[str, str], int] = {}
    for (run_id, position), (step, at) in ledger.final_steps.items():
        if step.kind == "task":
            spec = json.loads(step.input)
            key = (spec["rk"], workload.label_of(spec))
            committed_at[key] = max(at, committed_at.get(key, at))
            calls.setdefault(key, set()).add((run_id, position))
            results[key] = results.get(key, 0) + 1
    for run_id, recorded in contents.steps.items():
        for step in recorded:
            if step.kind == "task":
                spec = json.loads(step.input)
                calls.setdefault((spec["rk"], workload.label_of(spec)), set()).add(
                    (run_id, step.position))
    for at, rk, label, task, worker in ledger.executions:
        # (A fork's children, started afresh, run its original's children's programs.)
        of_a_fork = any(rk == f or rk.startswith(f + ".") for f in forked)
        done = None if of_a_fork or results.get((rk, label), 0) < len(
            calls.get((rk, label), ())) else committed_at.get((rk, label))
        if done is not None and at > done and worker not in ledger.deferred_starts:
            v.append(f"task {task} of {rk} step {label} executed at t={at:.3f}, after its "
                     f"result was committed at t={done:.3f}")

    v += _lease_writes(ledger)
    v += _helpers(contents)
    # A fork's copied steps are the original's, as they were when it was forked. (A deadline
    # scope's step records its expiry, with the positions it cut: the fork keeps those it
    # copied, and records its own.)
    for fork_id, (original, copied) in sorted(ledger.forks.items()):
        mine = {st.position: st for st in contents.steps.get(fork_id, ())}
        for step in copied:
            if _as_copied(mine.get(step.position)) != _as_copied(step):
                v.append(f"fork {fork_id} of run {original}: its copied step {step.position} "
                         f"is {mine.get(step.position)}, the original's was {step}")
        if runs.get(fork_id) is not None and runs[fork_id].forked_steps != len(copied):
            v.append(f"fork {fork_id} of run {original} says it copied "
                     f"{runs[fork_id].forked_steps} steps; {len(copied)} were to be copied")

    v += _sends(contents, ledger)
    v += _waits(contents, ledger)
    v += _metrics(outcome, exact=False)
    if reference is not None:
        v += [f"without faults, {m}" for m in _metrics(reference, exact=True)]
    v += _schedules(contents, ledger, started_by)
    watches = [(run_id, ledger.heard_end.get(run_id), "the client watching it")
               for run_id in sorted(ledger.watching)]
    watches += [(run_id, ledger.heard_late.get(run_id), "the client that watched it late")
                for run_id in sorted(ledger.late_watching)]
    for run_id, heard, who in watches:
        run = runs.get(run_id)
        if run is not None and run.state in TERMINAL_RUN_STATES and heard is None:
            v.append(f"run {run_id} {run.state}, but {who} never heard")
        elif heard is not None and (run is None or heard[1:] != (run.state, run.result)) and not (
                # (a failed run a client retried afterwards: it ended failed first)
                run is not None and heard[1] == "failed" and any(
                    e.event == "run.queued" and (e.detail or "").startswith("retried by")
                    for e in contents.history.get(run_id, ()))):
            v.append(f"a client heard run {run_id} end {heard[1]} with {heard[2]} at "
                     f"t={heard[0]:.3f}; it is stored {run.state if run else 'nowhere'} with "
                     f"{run.result if run else None}")
    v += _reads(contents, ledger)

    v += _cancels(contents, ledger)
    v += _revokes_told(outcome)
    v += _children(contents)
    v += _deadlines(ledger)
    v += _shields(contents)
    cancelled = _not_compared(planned, runs, ledger, started_by)
    # Results equal the fault-free run's, run by run; a sleep's marker may differ where a
    # wake-up ended it early in either run, and must say what the store recorded.
    ref_steps = reference.store.inner.contents().steps if reference is not None else {}
    for run_id, (state, payload, result) in outcome.runs.items():
        if state != "completed" or result is None or run_id in cancelled:
            continue
        mine = _sleep_markers(contents.steps[run_id], payload)
        got = json.loads(result)
        for j, marker in mine.items():
            if j < len(got) and got[j] != marker and marker != -1:
                v.append(f"run {run_id}: its sleep at step {j} returned {got[j]}, but the "
                         f"store recorded {'slept' if marker else 'woken early'}")
        if reference is None:
            continue
        ref = reference.runs.get(run_id)
        if ref is None or ref[1] != payload:
            continue
        if state != ref[0] or ref[2] is None:
            v.append(f"run {run_id} ended {state} with {result}; without faults it ended "
                     f"{ref[0]} with {ref[2]}")
            continue
        theirs = _sleep_markers(ref_steps.get(run_id, ()), payload)
        woken = {j for j in mine.keys() | theirs.keys()
                 if mine.get(j) in (0, -1) or theirs.get(j) in (0, -1)}
        masked = [None if j in woken else x for j, x in enumerate(got)]
        expected = [None if j in woken else x for j, x in enumerate(json.loads(ref[2]))]
        if masked != expected:
            v.append(f"run {run_id} ended {state} with {result}; without faults it ended "
                     f"{ref[0]} with {ref[2]}")
    for run_id, (state, payload, _) in outcome.runs.items():
        ref = reference.runs.get(run_id) if reference is not None else None
        if (ref is not None and ref[1] == payload and state == "failed" and ref[0] != state
                and run_id not in cancelled):
            v.append(f"run {run_id} ended failed; without faults it ended {ref[0]} "
                     f"with {ref[2]}")
    return v


# Run events the servers count (aiki_runs_total), and the history event of each.
COUNTED_EVENTS = (("started", "run.running"), ("completed", "run.completed"),
                  ("failed", "run.failed"), ("cancelled", "run.cancelled"),
                  ("paused", "run.paused"))


# How long after a commit revoked a lease its holder's server may take to send it the
# Revoke (after the notice reached it, through another server): at once, not at the
# worker's next heartbeat (a third of a lease, 3.3 s here), which would otherwise heal it.
TOLD_WITHIN = 1.0


def _not_compared(planned: Any, runs: Any, ledger: Any, started_by: Any) -> set[str]:
    """The runs whose ends are not compared with the fault-free run's.

    A run a client cancelled may end otherwise in the fault-free run (the cancel came
    before or after its end there); so may a child whose parent did not complete (a
    failing parent cancels the children still running)."""
    cancelled = {item.run_id for item in planned.values() if item.cancels}
    # Nor is a fork's, when its original was cancelled by a client (the fork copies what
    # the cancel left: a cancel as the run began leaves only its compensation's steps,
    # which the fork, not cancelled, meets at other positions, seed 9525) or had children
    # (their child steps name the original's children: the fork joins them, so its end
    # depends on how far they were when it was forked).
    parents = {r.parent_id for r in runs.values() if r.parent_id is not None}
    cancelled |= {fork_id for fork_id, (original, _) in ledger.forks.items()
                  if original in cancelled or original in parents}
    # (A cancel_previous schedule's run is cancelled or not as the next occurrence finds it.)
    replacing = {s for s, overlap in ledger.schedules.items() if overlap == "cancel_previous"}
    cancelled |= {run_id for run_id, origin in started_by.items()
                  if origin is not None and origin[0] in replacing}
    for run in runs.values():
        parent = run
        while parent.parent_id is not None and parent.parent_id in runs:
            parent = runs[parent.parent_id]
            if parent.state != "completed" or parent.id in cancelled:
                cancelled.add(run.id)
    return cancelled


def _revokes_told(outcome: Outcome) -> list[str]:
    """A worker holding a lease that a commit revoked (a cancel, a failed parent's cascade,
    a cancel's grace period over) is sent a Revoke within TOLD_WITHIN of the commit by a
    server it is connected to (through another server: of the notice's arrival), so its
    task bodies stop now. Judged where telling it is possible: a connection of the lease's
    worker incarnation was welcomed before the commit and outlived the bound, its server
    not paused meanwhile; the committing server saw its commit succeed (on it), or the
    database's notice reached the other server (on that one). What happens to the Revoke on
    the wire is the network's: a lost one is healed by the heartbeat."""
    v = []
    assert outcome.store.notices is not None
    delivered = outcome.store.notices.delivered
    for (run_id, epoch), (at, committer, ambiguous) in outcome.ledger.revoked_at.items():
        owner = outcome.ledger.leases.get((run_id, epoch), (0, None))[1]
        sessions = [s for s in outcome.sessions if s.worker_id == owner]
        deadline = None
        for s in sessions:
            if s.welcomed_at is None or s.welcomed_at >= at or (
                    s.closed_at is not None and s.closed_at < at):
                continue
            heard = (None if ambiguous else at) if s.server == committer else delivered.get(
                (s.server, f"revoked:{epoch}:{run_id}"))
            if heard is None:
                continue
            by = heard + TOLD_WITHIN
            if (s.closed_at is not None and s.closed_at <= by) or any(
                    a <= by and b >= at for a, b in outcome.pauses.get(s.server, ())):
                continue
            deadline = by if deadline is None else max(deadline, by)
        if deadline is None:
            continue
        told = {s.server for s in sessions for t, r, e in s.revokes
                if r == run_id and at <= t <= deadline and (e is None or e >= epoch)}
        if told:
            outcome.sometimes["revoked lease's worker told at once"] += 1
            if told - {committer}:
                outcome.sometimes["revoked lease's worker told through another server"] += 1
        elif any(_let_go(s, (run_id, epoch), at, deadline) for s in sessions):
            outcome.sometimes["revoked lease's worker had let it go itself"] += 1
        else:
            v.append(f"run {run_id}: a commit revoked lease epoch {epoch} of worker {owner} "
                     f"at t={at:.3f} (through {committer}), and no server it was connected "
                     f"to told it within {TOLD_WITHIN:g} s: its tasks ran on until its next "
                     "heartbeat")
    return v


def _let_go(session: Session, lease: tuple[str, int], since: float, by: float) -> bool:
    """Whether the worker, on ``session``, said it held ``lease`` in a heartbeat and then,
    between ``since`` and ``by``, in a heartbeat that did not renew it, that it had let it
    go (it stopped the run itself: a cancel's grace period over by its own clock, ...):
    nothing of it ran on for a Revoke to stop."""
    said = False
    for at, held in session.held:
        if lease in held:
            said = True
        elif said and since <= at <= by:
            return True
    return False


def _metrics(outcome: Outcome, exact: bool) -> list[str]:
    """The servers' run counters against the store: a counter never counts what the store
    did not commit (a refused or lost write), so it is at most the history's count; without
    faults (``exact``), where no reply is lost, it is exactly that."""
    contents = outcome.store.inner.contents()
    stored = {name: 0 for _, name in COUNTED_EVENTS}
    for history in contents.history.values():
        for e in history:
            if e.event in stored and not _is_resume(e):  # (a resume is no claim)
                stored[e.event] += 1
    counts = [(event, sum(m.total(RUNS, event=event) for m in outcome.metrics), stored[name])
              for event, name in COUNTED_EVENTS]
    # A client's enqueues: not a fork, not a schedule's occurrence, not a child run (a
    # step of its parent).
    forked = sum(1 for r in contents.runs.values() if r.forked_from is not None)
    scheduled = sum(1 for run_id, h in contents.history.items()
                    if h and scheduled_by(h[0].detail) is not None)
    children = sum(1 for r in contents.runs.values() if r.parent_id is not None)
    for event, held in (("enqueued", len(contents.runs) - forked - scheduled - children),
                        ("forked", forked)):
        counts.append((event, sum(m.total(RUNS, event=event) for m in outcome.metrics), held))
    return [f"the servers counted {counted:g} runs {event} (aiki_runs_total), the store "
            f"holds {held}" for event, counted, held in counts
            if counted > held or (exact and counted != held)]


def _sleep_markers(steps: Any, payload: str) -> dict[int, int]:
    """Step index -> the marker a sleep there returns (1 slept, 0 woken early), as stored."""
    program = json.loads(payload)
    # Sleeps are top-level steps: the k-th sleep of the program is the k-th stored, by
    # position (a step's position counts the task calls before it, not the program's steps).
    stored = sorted((s for s in steps if s.kind == "sleep"),
                    key=lambda s: _position_key(s.position))
    indexes = [j for j, step in enumerate(program["steps"]) if "sleep" in step]
    out = {}
    # The steps a deadline scope reaches depend on when it expires: the sleeps after it
    # are not known, and their markers may be either.
    scope = next((j for j, step in enumerate(program["steps"]) if "deadline" in step), None)
    for j, step in zip(indexes, stored, strict=False):
        if scope is not None and j > scope:
            break
        if step.state == "completed":
            out[j] = 1 if step.output == "true" else 0
    if scope is not None:
        out.update({k: -1 for k in indexes if k > scope})
    return out


def _position_key(position: str) -> tuple[int, ...]:
    return tuple(int(x) for x in position.split("."))


def _sends(contents: Any, ledger: Any) -> list[str]:
    """Acknowledged sends are stored once, duplicates and refused sends not at all; each is
    delivered to at most one wait, and a run's waits for one event take its sends in order."""
    v = []
    stored: dict[str, list[Any]] = {}
    keyed: dict[tuple[str, str, str], int] = {}
    for run_id, events in contents.events.items():
        for e in events:
            stored.setdefault(e.payload, []).append(e)
            if e.idempotency_key is not None:
                k = (run_id, e.name, e.idempotency_key)
                keyed[k] = keyed.get(k, 0) + 1
    for k, n in sorted(keyed.items()):
        if n > 1:
            v.append(f"run {k[0]}: {n} {k[1]!r} events stored under one key {k[2]!r}")
    for send_id, log in sorted(ledger.sends.items()):
        copies = len(stored.get(log.payload, ()))
        if log.key is None and copies > 1:
            continue  # without a key, a send the network delivered twice is stored twice
        if log.outcome in ("delivered", "buffered") and copies != 1:
            v.append(f"send {send_id} to run {log.run_id} was acknowledged ({log.outcome}) at "
                     f"t={log.at:.3f} and is stored {copies} times")
        elif log.outcome == "duplicate" and (
                copies > 1 or keyed.get((log.run_id, log.name, log.key or ""), 0) != 1):
            v.append(f"send {send_id} to run {log.run_id} was answered as a duplicate of key "
                     f"{log.key!r}, which is not stored once")
        elif log.outcome == "RunFinished" and copies and not _sent_before_the_end(
                contents.history.get(log.run_id, ()), log):
            # (A keyed send is tried again after a lost reply: an attempt before the run
            # ended may have stored it.)
            v.append(f"send {send_id} to run {log.run_id} was refused (the run had finished) "
                     "and stored all the same")
        elif copies > 1:
            v.append(f"send {send_id} to run {log.run_id} is stored {copies} times")
    for run_id, events in contents.events.items():
        steps = {s.position: s for s in contents.steps.get(run_id, ())}
        taken: dict[str, int] = {}
        for e in events:
            if e.position is None:
                continue
            if e.position in taken:
                v.append(f"run {run_id}: events {taken[e.position]} and {e.seq} were both "
                         f"delivered to the wait at step {e.position}")
            taken[e.position] = e.seq
            step = steps.get(e.position)
            if step is None or (step.kind, step.name) != ("event", e.name):
                v.append(f"run {run_id}: event {e.seq} ({e.name!r}) was delivered to step "
                         f"{e.position}, which is no wait for it")
            elif step.state == "failed":
                v.append(f"run {run_id}: the wait at step {e.position} timed out and also "
                         f"received event {e.seq} (sent at {e.sent_at:.3f})")
            elif step.output != e.payload:
                v.append(f"run {run_id}: the wait at step {e.position} returned "
                         f"{step.output}, but event {e.seq} ({e.payload}) was delivered to it")
        # (A fork's copied waits received their events in the original.)
        copied = {s.position for s in ledger.forks.get(run_id, ("", ()))[1]}
        for step in steps.values():
            if step.kind == "event" and step.state == "completed" and (
                    step.position not in taken) and step.position not in copied:
                v.append(f"run {run_id}: the wait at step {step.position} completed with "
                         f"{step.output}, which no stored send was delivered to")
        # A wait that timed out and ran again after a retry takes what is buffered then:
        # the order of the waits is not the order of the sends any more.
        rerun = _rerun_after_retry(contents.history.get(run_id, ()))
        for name in {e.name for e in events}:
            mine = [e for e in events if e.name == name]  # in send order (seq)
            delivered = [e for e in mine if e.position is not None and e.position not in rerun]
            order = [_position_key(e.position or "") for e in delivered]
            if order != sorted(order):
                v.append(f"run {run_id}: {name!r} events were delivered out of send order: "
                         f"{[(e.seq, e.position) for e in delivered]}")
            if delivered and any(e.position is None and e.seq < delivered[-1].seq
                                 for e in mine):
                v.append(f"run {run_id}: a later {name!r} event was delivered while an earlier "
                         "one stayed buffered")
    return v


def _reads(contents: Any, ledger: Any) -> list[str]:
    """What clients read is what the ledger says was committed: a status is a state the run
    was in at some moment while the request was out (and a final one carries the final
    result); a history is a prefix of the run's final history, holding at least everything
    committed before the request was sent."""
    v = []
    for run_id, sent, answered, state, result in ledger.status_reads:
        timeline = [(ledger.committed.get(e.seq, (None,))[0], e.event.partition(".")[2])
                    for e in contents.history.get(run_id, ()) if e.event.startswith("run.")]
        ok = any(state == s and (t is None or t <= answered) and (
            i + 1 == len(timeline) or timeline[i + 1][0] is None
            or timeline[i + 1][0] >= sent)
            for i, (t, s) in enumerate(timeline))
        if not ok:
            v.append(f"a client read run {run_id} as {state} (asked at t={sent:.3f}, answered "
                     f"at t={answered:.3f}); the run was never {state} then: "
                     f"{[(None if t is None else round(t, 3), s) for t, s in timeline]}")
        run = contents.runs.get(run_id)
        if state in ("completed", "failed") and run is not None and result != run.result:
            v.append(f"a client read run {run_id} {state} with {result}; it is stored with "
                     f"{run.result}")
    for run_id, sent, answered, events in ledger.history_reads:
        final = tuple((e.seq, e.event, e.position, e.attempt)
                      for e in contents.history.get(run_id, ()))
        before = sum(1 for e in contents.history.get(run_id, ())
                     if ledger.committed.get(e.seq, (answered,))[0] < sent)
        if final[:len(events)] != events:
            v.append(f"a client read run {run_id}'s history at t={answered:.3f} as "
                     f"{len(events)} events that are not the start of its stored history")
        elif len(events) < before:
            v.append(f"a client read run {run_id}'s history (asked at t={sent:.3f}) with "
                     f"{len(events)} events; {before} were committed before it asked")
    return v


def _helpers(contents: Any) -> list[str]:
    """A value of run.now(), run.random() or run.uuid4() is recorded once and the same
    on every replay: the task call after it (whose input carries it) saw what was recorded."""
    v = []
    for run_id, steps in contents.steps.items():
        by_position = {s.position: s for s in steps}
        for step in steps:
            if step.kind not in ("now", "random", "uuid") or "." in step.position:
                continue
            after = by_position.get(str(int(step.position) + 1))
            if after is None or after.kind != "task" or step.output is None:
                continue
            seen = json.loads(after.input).get("h")
            if seen != json.loads(step.output):
                v.append(f"run {run_id}: run.{step.kind}() at step {step.position} recorded "
                         f"{step.output}, but the task after it was called with {seen!r}")
    return v


def _lease_writes(ledger: Any) -> list[str]:
    """Every write accepted under a lease (renewals included) was made while that lease was
    the run's: granted to that worker before, not ended (expired, given back, the run ended
    or leased again) before."""
    v = []
    for commit, at, what, run_id, epoch, worker in ledger.lease_writes:
        granted = ledger.leases.get((run_id, epoch))
        ended = ledger.lease_ended.get((run_id, epoch))
        if granted is None or granted[0] > commit or granted[1] != worker:
            v.append(f"{what} for run {run_id} accepted at t={at:.3f} under epoch {epoch} of "
                     f"{worker}, a lease never granted to it (granted: {granted})")
        elif ended is not None and ended < commit:
            v.append(f"{what} for run {run_id} accepted at t={at:.3f} under epoch {epoch} of "
                     f"{worker}, a lease that had ended (commit {ended} < {commit})")
    return v


def _sent_before_the_end(history: Any, log: Any) -> bool:
    if log.key is None:
        return False  # sent once: that attempt was refused
    sent = end = None
    for e in history:
        if e.event == "event.sent" and e.name == log.name and e.detail == f"key {log.key!r}":
            sent = e.seq
        elif e.event in ("run.completed", "run.failed", "run.cancelled"):
            end = e.seq
    return sent is not None and end is not None and sent < end


def _as_copied(step: StepRecord | None) -> StepRecord | None:
    """``step`` without the expiry a deadline scope's step records (its deadline kept)."""
    if step is None or step.kind != "deadline" or step.output is None:
        return step
    return attrs.evolve(step, output=json.dumps(deadline_expiry(step)[0]))


def _waits(contents: Any, ledger: Any) -> list[str]:
    """No sleep ends as slept, and no event wait times out, before its due time on the clock
    of the server that ended it (a clock set back shortly before is let off)."""
    v = []
    for run_id, history in contents.history.items():
        steps = {s.position: s for s in contents.steps.get(run_id, ())}
        ends: dict[str, list[str]] = {}
        # A wait that timed out before a retry runs again, with a due time of its own: the
        # step stored now is the new one.
        rerun = {e.position for e in history if e.event == "event.timed_out" and any(
            _is_retry(r) and r.seq > e.seq for r in history)}
        for e in history:
            if _is_retry(e):
                ends = {k: seen for k, seen in ends.items() if seen[-1] != "event.timed_out"}
            if e.event == "event.timed_out" and e.position in rerun and any(
                    _is_retry(r) and r.seq > e.seq for r in history):
                ends.setdefault(e.position or "", []).append(e.event)
                continue
            if e.event in ("event.received", "event.timed_out") and e.position:
                ends.setdefault(e.position, []).append(e.event)
            if not ((e.event == "sleep.completed" and e.detail == "slept")
                    or e.event == "event.timed_out"):
                continue
            step = steps.get(e.position or "")
            due = step.next_attempt_at if step is not None else None
            at, server, wall = ledger.committed.get(e.seq, (None, "", 0.0))
            if due is None or at is None:
                continue
            # (The servers keep one clock: a jump of any of them moves them all.)
            set_back = any(_same_clock(node, server) and at - 60.0 <= when <= at
                           for when, node in ledger.clock_set_back)
            if wall < due - 1e-3 and not set_back:
                v.append(f"run {run_id}: the {step.kind if step else '?'} at step {e.position} "
                         f"ended ({e.event} {e.detail}) at t={at:.3f} when the clock of {server}"
                         f" said {wall:.3f}, before its due time {due:.3f}")
        for position, seen in ends.items():
            if len(seen) > 1:
                v.append(f"run {run_id}: the wait at step {position} ended {len(seen)} times: "
                         f"{seen}")
    return v


def _same_clock(a: str, b: str) -> bool:
    """Whether nodes ``a`` and ``b`` read one clock: the same node, or two servers."""
    return a == b or (a.startswith("s") and b.startswith("s"))


def _cancels(contents: Any, ledger: Any) -> list[str]:
    """A cancel that answered True ends its run ``cancelled``; a run ends ``cancelled`` only
    once a cancel was committed; no task but the compensation (``run.shield()``) starts, or
    records anything, in a run after its cancel was committed; compensation runs only then."""
    v = []
    answered = {run_id for _, run_id, yes in ledger.cancels if yes}
    for run_id in sorted(answered):
        run = contents.runs.get(run_id)
        if run is not None and run.state != "cancelled":
            v.append(f"run {run_id}: a cancel was answered True, but it ended {run.state}")
    for run in contents.runs.values():
        history = contents.history[run.id]
        asked = next((e.seq for e in history if e.event == "cancel.requested"), None)
        if run.state == "cancelled" and asked is None:
            v.append(f"run {run.id} ended cancelled with no cancel asked for")
        for e in history:
            if not e.event.startswith("task."):
                continue
            comp = e.name == workload.COMPENSATION
            # (Shielded work goes on after a cancel, as a compensation does.)
            if asked is not None and e.seq > asked and not comp and (
                    e.name != workload.SHIELDED):
                v.append(f"run {run.id}: task {e.name} at step {e.position} went {e.event} "
                         f"at seq {e.seq}, after its cancel was committed at seq {asked}")
            elif comp and (asked is None or e.seq < asked):
                v.append(f"run {run.id}: compensation {e.event} at seq {e.seq} before any "
                         "cancel")
    return v


def _shields(contents: Any) -> list[str]:
    """A task inside ``run.shield()`` is never cut by a deadline scope around the shield:
    in a run that was not cancelled (whose grace period may end a shield), it completes,
    however long past the deadline, whatever its siblings in a ``run.gather`` do."""
    v = []
    for run in contents.runs.values():
        if run.state not in ("completed", "failed") or any(
                e.event == "cancel.requested" for e in contents.history[run.id]):
            continue
        for step in contents.steps[run.id]:
            if step.kind == "task" and step.name == workload.SHIELDED and (
                    step.state != "completed"):
                v.append(f"run {run.id} ended {run.state} with its shielded task at step "
                         f"{step.position} {step.state}"
                         + (f" ({step.error_type})" if step.error_type else "")
                         + ": a shielded task runs to its end, its outcome committed, "
                         "whatever the deadline around the shield or its siblings do")
    return v


def _deadlines(ledger: Any) -> list[str]:
    """No deadline scope expires early on the servers' clock, which deadlines are kept on,
    whichever worker recorded it and whichever sees it expire (the workers' own clocks are
    skewed; a jump of the servers' clock is let off, and drift); how late one may be while
    a server is up is the overdue monitor's (a run waiting past its deadline is woken by
    the timer)."""
    v = []
    jumps = sum(n for node, n in ledger.clock_jumps.items() if node.startswith("s"))
    for at, run_id, node, deadline, expired, clock, seconds, rk, position in ledger.deadlines:
        slack = jumps + 0.05 + 2e-3 * seconds
        if not expired:
            continue
        if clock < deadline - slack:
            v.append(f"run {run_id}: a deadline scope of {seconds:g} s expired at t={at:.3f} "
                     f"on {node}, when the servers' clock said {clock:.3f}, before its "
                     f"deadline {deadline:.3f}")
        # On the simulated clock itself: not before its seconds since the code first
        # entered the scope (its deadline was recorded then or later).
        entered = ledger.scopes_entered.get((rk, position))
        if entered is not None and at - entered < seconds - slack:
            v.append(f"run {run_id}: a deadline scope of {seconds:g} s at step {position} "
                     f"expired at t={at:.3f} on {node}, {at - entered:.3f} s after its code "
                     f"first entered it (t={entered:.3f})")
    return v


def _children(contents: Any) -> list[str]:
    """No run ends before the children it did not detach; a cancel reaches every such
    descendant (each one that had not ended gets its own cancel); a parent's wait for a
    child ends whatever the child's end (completed, failed, cancelled)."""
    v = []
    runs = contents.runs
    history = contents.history
    end = {r: next((e.seq for e in history[r] if e.event in (
        "run.completed", "run.failed", "run.cancelled")), None) for r in runs}
    asked = {r: next((e.seq for e in history[r] if e.event == "cancel.requested"), None)
             for r in runs}
    for run in runs.values():
        parent_id = run.parent_id
        if parent_id is None or parent_id not in runs:
            continue
        if not run.detached:
            born = history[run.id][0].seq
            # (The parent's end after the child's birth: a retried parent ends again, and
            # its children started since are held to that end.)
            parent_end = next((e.seq for e in history[parent_id] if e.seq > born and e.event
                               in ("run.completed", "run.failed", "run.cancelled")), None)
            if parent_end is not None and (end[run.id] is None or end[run.id] > parent_end):
                v.append(f"run {parent_id} ended (seq {parent_end}) before its child "
                         f"{run.id} (seq {end[run.id]})")
            cancel_at = asked[parent_id]
            if cancel_at is not None and born < cancel_at and asked[run.id] is None and (
                    end[run.id] is None or end[run.id] > cancel_at):
                v.append(f"run {parent_id}'s cancel (seq {cancel_at}) never reached its "
                         f"child {run.id}")
        parent = runs[parent_id]
        if run.state in ("completed", "failed", "cancelled") and parent.state != "cancelled":
            for step in contents.steps[parent_id]:
                if step.kind == "join" and step.name == run.id and step.state == "running":
                    v.append(f"run {parent_id} still waits at step {step.position} for its "
                             f"child {run.id}, which ended {run.state}")
    return v


def _transitions(run_id: str, history: list[Any], deferred_starts: set[str]) -> list[str]:
    out = []
    state: str | None = None
    released_by: set[str] = set()
    tasks: dict[str, str | None] = {}
    attempts: dict[str, int] = {}
    for e in history:
        kind, _, new = e.event.partition(".")
        if _is_retry(e):  # its steps that did not complete are dropped: they start afresh
            for position in [p for p, st in tasks.items() if st not in _DONE]:
                del tasks[position]
                attempts.pop(position, None)
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
                    (old, new) in UNSTARTED_TASK_TRANSITIONS and e.worker_id in deferred_starts
                    or (old, new) in CUT_TASK_TRANSITIONS
                    and (e.detail or "").startswith(DEADLINE_EXCEEDED))):
                out.append(f"run {run_id}: task at step {e.position} went {old} -> {new}")
            # After `retrying` comes the next attempt; otherwise the same one goes on.
            expected = attempts.get(e.position or "", 0) + (old in (None, "retrying"))
            if e.attempt != expected:
                out.append(f"run {run_id}: task at step {e.position} went {old} -> {new} "
                           f"at attempt {e.attempt}, expected attempt {expected}")
            tasks[e.position or ""] = new
            attempts[e.position or ""] = e.attempt
    return out


def _replaced(schedule_id: str, contents: Any, ledger: Any,
              started_by: dict[str, tuple[str, str] | None]) -> list[str]:
    """Under ``cancel_previous``, after every firing at most one run of the schedule is
    unfinished and not being cancelled: each run is live from its start until its cancel
    was asked for (or it ended), and no two such spans overlap (a run started in the
    transaction that cancels its predecessor starts as that one's span ends)."""
    spans = []
    for run_id, origin in started_by.items():
        if origin is None or origin[0] != schedule_id:
            continue
        history = contents.history[run_id]
        start = ledger.committed.get(history[0].seq, (None,))[0]
        end = next((ledger.committed.get(e.seq, (None,))[0] for e in history
                    if e.event in ("cancel.requested", "run.completed", "run.failed",
                                   "run.cancelled")), float("inf"))
        if start is not None:
            spans.append((start, end if end is not None else float("inf"), run_id))
    spans.sort()
    out = []
    for (_, end, before), (start, _, after) in zip(spans, spans[1:], strict=False):
        if start < end:
            out.append(f"schedule {schedule_id} (cancel_previous): run {after} started at "
                       f"t={start:.3f} while run {before} was unfinished and not being "
                       f"cancelled (until t={end:.3f})")
    return out


def _schedules(contents: Any, ledger: Any,
               started_by: dict[str, tuple[str, str] | None]) -> list[str]:
    """No occurrence starts two runs; under ``skip`` and ``buffer_one`` no two runs of a
    schedule overlap; every occurrence up to the schedule's next one was decided exactly
    once (fired, buffered, or skipped: by its policy, past the catch-up window, or while
    paused). That one within the window is decided while a server is up is the world's
    overdue monitor's."""
    v = []
    by_occurrence: dict[tuple[str, str], list[str]] = {}
    for run_id, origin in started_by.items():
        if origin is not None:
            by_occurrence.setdefault(origin, []).append(run_id)
    for (schedule_id, key), run_ids in sorted(by_occurrence.items()):
        if len(run_ids) > 1:
            v.append(f"schedule {schedule_id}: occurrence {key} started {len(run_ids)} runs: "
                     f"{sorted(run_ids)}")
    runs = contents.runs
    for schedule_id, firings in contents.firings.items():
        for f in firings:
            if f.outcome == "fired" and (f.run_id not in runs or started_by.get(f.run_id) != (
                    schedule_id, f.key)):
                v.append(f"schedule {schedule_id}: occurrence {f.key} was recorded fired as "
                         f"run {f.run_id}, which is not stored as its run")
    for schedule_id, overlap in sorted(ledger.schedules.items()):
        if overlap == "cancel_previous":
            v += _replaced(schedule_id, contents, ledger, started_by)
        if overlap not in ("skip", "buffer_one"):
            continue
        spans = []
        for run_id, origin in started_by.items():
            if origin is None or origin[0] != schedule_id:
                continue
            history = contents.history[run_id]
            start = ledger.committed.get(history[0].seq, (None,))[0]
            end = next((ledger.committed.get(e.seq, (None,))[0] for e in history
                        if e.event in ("run.completed", "run.failed")), float("inf"))
            if start is not None:
                spans.append((start, end if end is not None else float("inf"), run_id))
        spans.sort()
        for (_, end, before), (start, _, after) in zip(spans, spans[1:], strict=False):
            if start < end:
                v.append(f"schedule {schedule_id} ({overlap}): run {after} started at "
                         f"t={start:.3f}, before run {before} ended (t={end:.3f})")
    for s in contents.schedules.values():
        firings = contents.firings.get(s.id, ())
        covered: dict[float, int] = {}
        ranges = []
        for f in firings:
            if f.key.startswith("trigger:"):
                continue
            if f.key.startswith("skipped:"):
                ranges.append((f.occurrence, f.last if f.last is not None else f.occurrence))
            else:
                covered[f.occurrence] = covered.get(f.occurrence, 0) + 1
        occ = sch.next_after(s.cron, s.timezone, s.every, s.created_at)
        while occ < s.next_fire_at:
            n = covered.get(occ, 0) + sum(1 for a, b in ranges if a <= occ <= b)
            if n != 1:
                v.append(f"schedule {s.id}: occurrence {sch.iso(occ)} was decided {n} times "
                         f"(it comes before the next one, {sch.iso(s.next_fire_at)})")
            occ = sch.next_after(s.cron, s.timezone, s.every, occ)
    return v


_DONE = ("completed", "received")  # a step's last history state when it completed
# While a run is paused, nothing starts, waits, ends or is delivered (an outcome of a task in
# flight, a wake-up's end of a sleep, a send buffered and a lease given back may happen).
_NOT_WHILE_PAUSED = frozenset({
    "task.running", "sleep.waiting", "event.waiting", "event.received", "event.timed_out",
    "step.recorded", "run.completed", "run.failed", "run.running",
})


def _rerun_after_retry(history: Any) -> set[str]:
    """Positions of waits that timed out before a retry (which runs them again)."""
    out: set[str] = set()
    timed_out: set[str] = set()
    for e in history:
        if e.event == "event.timed_out" and e.position is not None:
            timed_out.add(e.position)
        elif _is_retry(e):
            out |= timed_out
    return out


def _is_retry(e: Any) -> bool:
    return e.event == "run.queued" and (e.detail or "").startswith("retried by")


def _is_resume(e: Any) -> bool:
    return e.event in ("run.queued", "run.waiting", "run.running") and (
        e.detail or "").startswith("resumed by")


def _paused(run_id: str, history: list[Any], deferred_starts: set[str]) -> list[str]:
    """No step starts while a run is paused, from the moment the pause committed: only the
    outcome of a task attempt in flight is recorded (one whose start was recorded, or, from
    a worker that defers its start records, one not recorded at all)."""
    out = []
    paused = False
    steps: dict[str, tuple[str, int]] = {}  # position -> (last state, attempt)
    for e in history:
        kind, _, new = e.event.partition(".")
        if e.event == "run.paused":
            paused = True
        elif _is_resume(e):
            paused = False
        elif _is_retry(e):
            steps = {p: st for p, st in steps.items() if st[0] in _DONE}
        elif paused and e.event in _NOT_WHILE_PAUSED:
            out.append(f"run {run_id}: {e.event} at step {e.position} (seq {e.seq}) while the "
                       "run was paused")
        elif paused and kind == "task" and e.position is not None:
            before = steps.get(e.position)
            in_flight = (before is not None and before[0] == "running"
                         and before[1] == e.attempt) or (
                before is None and e.worker_id in deferred_starts)
            if not in_flight:
                out.append(f"run {run_id}: task {e.name} at step {e.position} went {before} -> "
                           f"{new} at attempt {e.attempt} (seq {e.seq}) while the run was "
                           "paused: a step started after the pause")
        if e.position is not None and kind in ("task", "sleep", "event"):
            steps[e.position] = (new, e.attempt)
    return out


def _retried(run_id: str, history: list[Any]) -> list[str]:
    """A retried run never runs a step again that had completed before the retry."""
    out = []
    last: dict[str, str] = {}
    kept: set[str] = set()
    for e in history:
        kind, _, new = e.event.partition(".")
        if _is_retry(e):
            kept |= {p for p, st in last.items() if st in _DONE}
        elif e.position is not None and kind == "task":
            if e.position in kept and new in ("running", "completed", "failed", "retrying"):
                out.append(f"run {run_id}: a retry ran step {e.position} ({e.name}) again "
                           f"(task.{new} at seq {e.seq}), which had completed before it")
        if e.position is not None and kind in ("task", "sleep", "event"):
            last[e.position] = new
    return out
