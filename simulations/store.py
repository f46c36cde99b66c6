"""The simulated store: the memory reference store behind injected faults, and the ledger.

The inner MemoryStore is "the database": it survives server crashes. The wrapper injects
errors before commit, errors after commit with the reply lost (an ambiguous commit),
unavailable windows, slow calls and driver bugs (a plain exception, which crashes the
StoreWriter so its supervisor restarts it). Every committed outcome is checked against the
ledger as it happens, so a violation is caught at the moment it is made.

Several servers share the database, each through a :class:`ServerStore` of its own, and
hear each other through a :class:`NoticeChannel`: PostgreSQL's LISTEN/NOTIFY as the
engine's triggers use it (a run queued, a run ended, a wait with a due time begun; sent when
the transaction commits, never to the committing server). The channel delays notices and
loses them while a server's listening connection is down, then says ``resync``.
"""

from __future__ import annotations

import math
import random
from collections import Counter
from collections.abc import Callable, Sequence
from typing import Any

import attrs
import trio

from aiki.errors import AikiError, StaleLease, StoreUnavailable
from aiki.records import (
    FINAL_STEP_STATES,
    EventRecord,
    HistoryEvent,
    RunCount,
    RunRecord,
    ScheduleFiring,
    ScheduleRecord,
    StepRecord,
    WaitRecord,
)
from aiki.store import Store
from aiki.store import ops as o
from aiki.store.memory import MemoryStore
from simulations.pause import PROCESS

SCHEDULE_OPS = (o.DefineSchedule, o.PauseSchedule, o.FireSchedules, o.TriggerSchedule,
                o.BackfillSchedule, o.DeleteSchedule)


@attrs.define
class StoreFaults:
    before_commit: float = 0.0
    after_commit: float = 0.0
    driver_bug: float = 0.0
    slow: float = 0.0
    # A batch that takes about a network round trip (as PostgreSQL's commits take beside
    # the Trio thread): what a worker's answer to a push sent before the commit races.
    # Too short to excuse a late claim or a slot, so not a fault the monitors wait out.
    lag: float = 0.0
    unavailable_until: float = -1.0  # trio time


@attrs.define
class SendLog:
    """A client's send and its answer: ``delivered`` or ``buffered`` (EventSent), ``duplicate``
    (EventSent: the key was used, nothing stored), a refusal's error type, or ``unknown``
    (no answer: a send without a key is not sent again)."""

    run_id: str
    name: str
    key: str | None
    payload: str
    outcome: str
    at: float
    late: bool = False  # sent after a watcher heard the run end


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
    # History seq -> (virtual time of its commit, the server that committed it, that
    # server's clock then).
    committed: dict[int, tuple[float, str, float]] = attrs.field(factory=dict)
    clock_set_back: list[tuple[float, str]] = attrs.field(factory=list)  # (when, node)
    last_seq: int = 0
    # Run id -> the server through which it began to wait (while it waits).
    waiting_via: dict[str, str] = attrs.field(factory=dict)
    # (run id, position) -> the due time a wait step was first recorded with (the clients
    # that race a send against an event wait's timeout aim at it).
    wait_due: dict[tuple[str, str], float | None] = attrs.field(factory=dict)
    # (run id, event or "sleep") -> positions of its waits, in the order they began
    wait_order: dict[tuple[str, str], list[str]] = attrs.field(factory=dict)
    ended: set[str] = attrs.field(factory=set)  # runs seen completed or failed
    sends: dict[str, SendLog] = attrs.field(factory=dict)  # send id -> what became of it
    watching: set[str] = attrs.field(factory=set)  # runs some client waits to see end
    # Run id -> (when, state, result) a client waiting for the run's end was told.
    heard_end: dict[str, tuple[float, str, str | None]] = attrs.field(factory=dict)
    late_watching: set[str] = attrs.field(factory=set)  # ... and those watched late
    heard_late: dict[str, tuple[float, str, str | None]] = attrs.field(factory=dict)
    # (run id, sent, answered, state, result) of each status read a client made
    status_reads: list[tuple[str, float, float, str, str | None]] = attrs.field(factory=list)
    # (run id, sent, answered, ((seq, event, position, attempt), ...)) of each history read
    history_reads: list[tuple[str, float, float, tuple[Any, ...]]] = attrs.field(
        factory=list)
    wakeups: list[tuple[float, str, bool]] = attrs.field(factory=list)  # (when, run, woken)
    cancels: list[tuple[float, str, bool]] = attrs.field(factory=list)  # (asked, run, answer)
    # Deadline scopes as workflow code left them: (virtual time, run, node, deadline,
    # expired, the servers' clock then, the scope's seconds, the program's key, the scope's
    # position).
    deadlines: list[tuple[float, str, str, float, bool, float, float, str, str]] = (
        attrs.field(factory=list))
    # (program key, scope position) -> the virtual time workflow code first entered it (by
    # any run of the program: a fork copies its original's deadlines).
    scopes_entered: dict[tuple[str, str], float] = attrs.field(factory=dict)
    clock_jumps: Counter[str] = attrs.field(factory=Counter)  # node -> |jumps| in seconds
    commits: int = 0  # transactions committed so far: the order of what follows
    # (run id, epoch) -> (the commit that granted it, to whom)
    leases: dict[tuple[str, int], tuple[int, str]] = attrs.field(factory=dict)
    # (run id, epoch) -> the commit after which it was no longer the run's lease
    lease_ended: dict[tuple[str, int], int] = attrs.field(factory=dict)
    # Every write accepted under a lease, renewals included:
    # (commit, time, op, run id, epoch, worker id)
    lease_writes: list[tuple[int, float, str, str, int, str]] = attrs.field(factory=list)
    schedules: dict[str, str] = attrs.field(factory=dict)  # defined: id -> overlap policy
    schedules_paused: bool = False  # the clients paused them all (late in liveness)
    # A fork's id -> (the original's id, the original's steps it was to copy, as they were
    # when the fork committed).
    forks: dict[str, tuple[str, tuple[StepRecord, ...]]] = attrs.field(factory=dict)

    # (run id, lease epoch) -> (the virtual time a commit revoked that lease, the server that
    # committed it, whether that server saw the commit fail): a cancel, a failed parent's
    # cascade, a cancel's grace period over (the run's epoch moved on while it was held).
    revoked_at: dict[tuple[str, int], tuple[float, str, bool]] = attrs.field(factory=dict)
    def body_ended(self, run_id: str, epoch: int, at: float) -> None:
        """A task body under that lease ended (returned, raised or was cancelled) at ``at``."""
        revoked = self.revoked_at.get((run_id, epoch))
        if revoked is not None:
            self.sometimes["task body stopped by a revoke"] += 1
            if at - revoked[0] > 1.0:
                self.sometimes["task body stopped over 1 s after a revoke"] += 1

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
    notices: NoticeChannel | None = None  # to the servers sharing this database
    wall: Callable[[str], float] = lambda server: 0.0  # a server's clock
    # The SQLite store, when it is the database: ``inner`` (the memory model) answers every
    # operation beside it, and the two must agree (what the checkers read is the model's).
    db: Store | None = None
    # Told of every batch as a server's writer begins to apply it (the world's faults that
    # strike while a write is on its way).
    applying: Callable[[Sequence[o.Op[Any]]], None] = lambda ops: None
    # Whether worker incarnation ``owner`` holds the run under that lease epoch, in its
    # own view, now (the world's workers).
    holding: Callable[[str | None, str, int], bool] = lambda owner, run_id, epoch: True
    last_fault_at: float = -math.inf  # the last fault one of its calls met
    slow_until: float = -math.inf  # when the calls slowed so far are over
    # Set by ``applying``: this batch commits and its answer is lost (an after-commit fault).
    lose_answer: bool = False
    _lock: trio.Lock = attrs.field(factory=trio.Lock)
    _fork_sources: dict[str, tuple[StepRecord, ...]] = attrs.field(factory=dict)

    # Cheap looks at the model for the world's monitors, polled often (``contents`` copies
    # everything): read in place, between two of its transactions.
    def queued_runs(self) -> list[RunRecord]:
        return [r for r in self.inner._runs.values() if r.state == "queued"]

    def last_seq(self, run_id: str, event: str) -> int | None:
        """The seq of ``run_id``'s last ``event`` in its history, if any."""
        return next((e.seq for e in reversed(self.inner._history.get(run_id, ()))
                     if e.event == event), None)

    async def lag(self) -> None:
        """Sometimes take about a network round trip before a batch (``StoreFaults.lag``)."""
        if self.faults.lag and self.rng.random() < self.faults.lag:
            self.stats["lag"] += 1
            await trio.sleep(self.rng.uniform(0.005, 0.03))

    def for_server(self, server: str) -> ServerStore:
        return ServerStore(self, server)

    async def apply(self, ops: Sequence[o.Op[Any]], server: str = "s1") -> list[Any]:
        self.lose_answer = False
        self.applying(ops)
        f, r = self.faults, self.rng
        if r.random() < f.slow:
            self.stats["slow"] += 1
            self.last_fault_at = trio.current_time()
            delay = r.uniform(0.05, 2.0)
            self.slow_until = max(self.slow_until, self.last_fault_at + delay)
            await trio.sleep(delay)
        else:
            await trio.lowlevel.checkpoint()
        if trio.current_time() < f.unavailable_until:
            self.stats["unavailable"] += 1
            self.last_fault_at = trio.current_time()
            raise StoreUnavailable("simulated: the database is unavailable")
        if r.random() < f.driver_bug:
            self.stats["driver_bug"] += 1
            self.last_fault_at = trio.current_time()
            raise RuntimeError("simulated: bug in the store driver")
        if r.random() < f.before_commit:
            self.stats["before_commit"] += 1
            self.last_fault_at = trio.current_time()
            raise StoreUnavailable("simulated: error before commit")
        scheduling = any(isinstance(op, SCHEDULE_OPS) for op in ops)
        before = self.inner.contents().schedules if scheduling else None
        outcomes = await self._apply_both(ops)
        now = trio.current_time()
        self.ledger.commits += 1
        if before is not None and self.notices is not None \
                and self.inner.contents().schedules != before:
            # As PostgreSQL's trigger on schedules: every timer reads the next occurrence.
            self.notices.publish(server, ["due"])
        for op, outcome in zip(ops, outcomes, strict=True):
            if not isinstance(outcome, AikiError):
                self._check(op, outcome, now)
            else:
                self._refused(op, outcome, server)
        revoked = self._leases_ended(ops, outcomes, now, server)
        self._committed(ops, outcomes, now, server, revoked)
        traced = ",".join(_traced(op, out) for op, out in zip(ops, outcomes, strict=True))
        self.trace.append(f"{now:.6f} store {server} {traced}")
        lost, self.lose_answer = self.lose_answer, False
        if lost or r.random() < f.after_commit:
            self.stats["after_commit"] += 1
            self.last_fault_at = trio.current_time()
            for key in revoked:  # (its server acts on no outcome: it saw none)
                if key in self.ledger.revoked_at:
                    self.ledger.revoked_at[key] = (now, server, True)
            self.ledger.sometimes["ambiguous commit"] += 1
            raise StoreUnavailable("simulated: connection lost after commit")
        return outcomes

    async def _apply_both(self, ops: Sequence[o.Op[Any]]) -> list[Any]:
        """The database applies ``ops``; with SQLite, the model applies them too, in the
        same order (one at a time, never cancelled between the two), and must agree."""
        if self.db is None:
            return await self._apply_model(ops)
        async with self._lock:
            with trio.CancelScope(shield=True):  # (no waiting inside: both are inline)
                outcomes = await self.db.apply(ops)
                model = await self._apply_model(ops)
        for op, got, expected in zip(ops, outcomes, model, strict=True):
            if _differs(got, expected):
                self.ledger.violation(f"the SQLite store answered {type(op).__name__} with "
                                      f"{_first_difference(got, expected)}")
        return outcomes

    async def _apply_model(self, ops: Sequence[o.Op[Any]]) -> list[Any]:
        """The memory model applies ``ops`` as one transaction (nothing else runs in between),
        noting what each fork is to copy as it is at that op."""
        await trio.lowlevel.checkpoint()
        outcomes: list[Any] = []
        noted = o.Noted()
        for op in ops:
            fork = op if isinstance(op, o.ForkRun) else None
            source = () if fork is None else self.inner.contents().steps.get(fork.run_id, ())
            got = self.inner.apply_now([op])
            if fork is not None and getattr(got[0], "applied", False):
                # What the fork copied: its source as it was at the op that made it (the
                # same fork sent again, after a retry of its source, copies nothing).
                self._fork_sources[fork.new_run_id] = source
            outcomes += got
            noted.ended += getattr(got, "ended", ())
            noted.revoked += getattr(got, "revoked", ())
            noted.note_due(getattr(got, "due", None))
        return o.outcomes_of(outcomes, noted)

    async def _read(self, name: str, *args: Any, **kwargs: Any) -> Any:
        """A read from the database; with SQLite, checked against the model's."""
        if self.db is None:
            return await getattr(self.inner, name)(*args, **kwargs)
        async with self._lock:
            with trio.CancelScope(shield=True):
                got = await getattr(self.db, name)(*args, **kwargs)
                expected = await getattr(self.inner, name)(*args, **kwargs)
        if _differs(got, expected):
            self.ledger.violation(f"the SQLite store read {name}{args} differently from the "
                                  f"memory model: {_first_difference(got, expected)}")
        return got

    def _refused(self, op: o.Op[Any], error: AikiError, server: str) -> None:
        """A write refused as stale while another lease of its run is live: the fencing at
        work on a worker's late message (a sometimes-situation)."""
        if not isinstance(error, StaleLease):
            return
        lease = getattr(op, "lease", None)
        if lease is not None:
            self._stale_while_live(lease.run_id, lease.epoch, server, type(op).__name__)

    def _stale_while_live(self, run_id: str, epoch: int, server: str, what: str) -> None:
        run = self.inner.contents().runs.get(run_id)
        if (run is not None and run.state == "running" and run.lease_epoch != epoch
                and run.lease_expires_at is not None
                and run.lease_expires_at > self.wall(server)):
            self.ledger.sometimes["stale worker write while another lease is live"] += 1
            self.stats[f"stale {what} refused, another lease live"] += 1

    def _leases_ended(self, ops: Sequence[o.Op[Any]], outcomes: list[Any], now: float,
                      server: str) -> list[tuple[str, int]]:
        """Note when each lease the transaction touched ended (the run left ``running``, or
        was leased again; a paused run's lease lives on while its worker holds it, for the
        outcome of its task in flight). Those whose run's epoch moved on while held, a cancel
        asked for, are returned (not those the batch's expiry ended first), as PostgreSQL's
        trigger notifies them; unless the holder's own write ended the run, they are noted
        revoked."""
        revoked: list[tuple[str, int]] = []
        own = {(op.lease.run_id, op.lease.epoch) for op in ops
               if getattr(op, "lease", None) is not None}
        expired = {run_id for op, out in zip(ops, outcomes, strict=True)
                   if isinstance(op, o.ExpireLeases) and not isinstance(out, AikiError)
                   for run_id in out}
        led = self.ledger
        runs = self.inner.contents().runs
        touched: set[str] = set()
        for op, outcome in zip(ops, outcomes, strict=True):
            lease = getattr(op, "lease", None)
            if lease is not None:
                touched.add(lease.run_id)
            run_id = getattr(op, "run_id", None)  # controls: a pause, a resume, a retry...
            if isinstance(run_id, str):
                touched.add(run_id)
            if isinstance(op, (o.ExpireLeases, o.Renew)) and not isinstance(outcome, AikiError):
                touched.update(outcome)
        # A cancel (its own, a parent's failure, an overdue one) revokes the leases of runs
        # the ops do not name: the descendants it reaches.
        touched.update(r for r, e in led.max_epoch.items() if (r, e) not in led.lease_ended)
        for run_id in sorted(touched):  # (in one order: the notices follow it)
            epoch = led.max_epoch.get(run_id)
            run = runs.get(run_id)
            if epoch is None or (run_id, epoch) in led.lease_ended:
                continue
            if (run is None or run.state not in ("running", "paused")
                    or run.lease_owner is None or run.lease_epoch != epoch):
                led.lease_ended[(run_id, epoch)] = led.commits
                if (run is not None and run.cancel_requested_at is not None
                        and run.lease_epoch > epoch and run_id not in expired):
                    revoked.append((run_id, epoch))
                    owner = led.leases.get((run_id, epoch), (0, None))[1]
                    # (Not its worker's own end of the run, nor a lease it had let go.)
                    if (run_id, epoch) not in own and self.holding(owner, run_id, epoch):
                        led.revoked_at.setdefault((run_id, epoch), (now, server, False))
        return revoked

    def _committed(self, ops: Sequence[o.Op[Any]], outcomes: list[Any], now: float,
                   server: str, revoked: list[tuple[str, int]]) -> None:
        """Note what the transaction wrote (its history, by whom, when), and notify the other
        servers as the PostgreSQL triggers do (``revoked``: the leases a cancel revoked)."""
        if all(isinstance(op, o.Renew) or (isinstance(op, (o.Claim, o.ExpireLeases, o.WakeDue))
                                            and not out) or isinstance(out, AikiError)
               for op, out in zip(ops, outcomes, strict=True)):
            return  # no history written, nothing to notify
        led = self.ledger
        contents = self.inner.contents()
        new: list[HistoryEvent] = []
        for history in contents.history.values():
            for e in reversed(history):
                if e.seq <= led.last_seq:
                    break
                new.append(e)
        new.sort(key=lambda e: e.seq)
        notices: list[str] = []
        wall = self.wall(server)
        for e in new:
            run_id = e.run_id
            led.committed[e.seq] = (now, server, wall)
            led.last_seq = e.seq
            notice = None
            if e.event == "run.queued":
                notice = ""
                via = led.waiting_via.pop(run_id, None)
                if via is not None and via != server:
                    led.sometimes["run woken on another server"] += 1
            elif e.event in ("run.completed", "run.failed", "run.cancelled"):
                notice = f"ended:{run_id}"
                led.ended.add(run_id)
            elif e.event == "run.waiting":
                led.waiting_via[run_id] = server
                if any(w.due_at is not None for w in contents.waits.get(run_id, ())):
                    notice = "due"
            elif e.event in ("sleep.waiting", "event.waiting"):
                key = (run_id, e.position or "")
                if key not in led.wait_due:
                    step = next(s for s in contents.steps[run_id] if s.position == e.position)
                    led.wait_due[key] = step.next_attempt_at
                    led.wait_order.setdefault((run_id, e.name or ""), []).append(key[1])
            if notice is not None and notice not in notices:
                notices.append(notice)
        notices += [f"revoked:{epoch}:{run_id}" for run_id, epoch in revoked]
        if self.notices is not None:
            self.notices.publish(server, notices)

    def _check(self, op: o.Op[Any], outcome: Any, now: float) -> None:
        led = self.ledger
        if isinstance(op, o.Claim):
            for claimed in outcome:
                run = claimed.run
                previous = led.max_epoch.get(run.id, 0)
                if run.lease_epoch <= previous:
                    led.violation(f"run {run.id} leased again at epoch {run.lease_epoch}")
                led.lease_ended.setdefault((run.id, previous), led.commits)
                led.max_epoch[run.id] = run.lease_epoch
                led.leases[(run.id, run.lease_epoch)] = (led.commits, run.lease_owner or "?")
            return
        if isinstance(op, o.Renew):
            # Renewals are writes under a lease too: a heartbeat that renews a lease its
            # worker no longer holds keeps a zombie believing it may go on.
            for lease in op.leases:
                if lease.run_id not in outcome:
                    self._under_lease("Renew", lease, now)
                else:
                    self._stale_while_live(lease.run_id, lease.epoch, "s1", "Renew")
            return
        if isinstance(op, o.ExpireLeases):
            for run_id in outcome:
                history = self.inner.contents().history[run_id]
                owner = next((e.worker_id for e in reversed(history)
                              if e.event == "run.queued"), None)
                if owner in led.live_workers:
                    led.sometimes["lease expiry on a live worker"] += 1
            return
        if isinstance(op, o.RetryRun):
            # Its failed and unfinished steps run again: their results may be written anew.
            for key in [k for k, (step, _) in led.final_steps.items()
                        if k[0] == op.run_id and step.state != "completed"]:
                del led.final_steps[key]
            return
        if isinstance(op, o.ForkRun) and op.new_run_id not in led.forks:
            ordered = sorted(self._fork_sources.get(op.new_run_id, ()),
                             key=lambda s: tuple(int(x) for x in s.position.split(".")))
            led.forks[op.new_run_id] = (op.run_id, tuple(ordered[: op.from_step]))
            return
        lease = getattr(op, "lease", None)
        if lease is not None:
            self._under_lease(type(op).__name__, lease, now)
        if isinstance(op, o.SaveStep) and op.step.state in FINAL_STEP_STATES:
            key = (lease.run_id, op.step.position)
            known = led.final_steps.get(key)
            if known is None:
                led.final_steps[key] = (op.step, now)
            elif known[0] != op.step:
                led.violation(f"run {key[0]} step {key[1]}: committed result {known[0].output!r}"
                              f" was changed to {op.step.output!r}")

    def _under_lease(self, what: str, lease: Any, now: float) -> None:
        """A write accepted under ``lease``: it must be the run's current lease (the model),
        and it is logged for the checker that holds it to the lease's whole life."""
        led = self.ledger
        if lease.epoch != led.max_epoch.get(lease.run_id):
            led.violation(
                f"{what} for run {lease.run_id} accepted from epoch {lease.epoch}; "
                f"the current lease is epoch {led.max_epoch.get(lease.run_id)}")
        led.lease_writes.append((led.commits, now, what, lease.run_id, lease.epoch,
                                 lease.worker_id))

    # -- reads: from the database -------------------------------------------------------
    async def get_run(self, run_id: str) -> RunRecord | None:
        return await self._read("get_run", run_id)  # type: ignore[no-any-return]

    async def get_steps(self, run_id: str) -> tuple[StepRecord, ...]:
        return await self._read("get_steps", run_id)  # type: ignore[no-any-return]

    async def get_history(self, run_id: str) -> tuple[HistoryEvent, ...]:
        return await self._read("get_history", run_id)  # type: ignore[no-any-return]

    async def list_runs(self, *, workflow: str | None = None, state: str | None = None,
                        limit: int = 100) -> tuple[RunRecord, ...]:
        return await self._read(  # type: ignore[no-any-return]
            "list_runs", workflow=workflow, state=state, limit=limit)

    async def get_waits(self, run_id: str) -> tuple[WaitRecord, ...]:
        return await self._read("get_waits", run_id)  # type: ignore[no-any-return]

    async def get_events(self, run_id: str) -> tuple[EventRecord, ...]:
        return await self._read("get_events", run_id)  # type: ignore[no-any-return]

    async def get_children(self, run_id: str) -> tuple[RunRecord, ...]:
        return await self.inner.get_children(run_id)

    async def run_counts(self) -> tuple[RunCount, ...]:
        return await self.inner.run_counts()

    async def next_due(self) -> float | None:
        return await self._read("next_due")  # type: ignore[no-any-return]

    async def get_schedule(self, schedule_id: str) -> ScheduleRecord | None:
        return await self._read("get_schedule", schedule_id)  # type: ignore[no-any-return]

    async def list_schedules(self) -> tuple[ScheduleRecord, ...]:
        return await self._read("list_schedules")  # type: ignore[no-any-return]

    async def get_firings(self, schedule_id: str, limit: int = 20) -> tuple[ScheduleFiring, ...]:
        return await self._read("get_firings", schedule_id, limit)  # type: ignore[no-any-return]

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


@attrs.define(eq=False)
class ServerStore:
    """One server's connection to the shared simulated database."""

    # (As PostgreSQL's: an enqueue's run is pushed to its worker before the commit, and the
    # store's faults strike it meanwhile.)
    commits_off_the_loop = True
    db: SimStore
    server: str

    async def apply(self, ops: Sequence[o.Op[Any]]) -> list[Any]:
        if self.commits_off_the_loop:  # (PostgreSQL's commits take a round trip or more)
            await self.db.lag()
        return await self.db.apply(ops, self.server)

    async def watch(self, on_notice: Callable[[str], None], *,
                    task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        """What ``PostgresStore.watch`` does: the other servers' notices, ``resync`` after
        some were lost."""
        await self.db.notices.listen(self.server, on_notice, task_status=task_status)

    async def get_run(self, run_id: str) -> RunRecord | None:
        return await self.db.get_run(run_id)

    async def get_steps(self, run_id: str) -> tuple[StepRecord, ...]:
        return await self.db.get_steps(run_id)

    async def get_history(self, run_id: str) -> tuple[HistoryEvent, ...]:
        return await self.db.get_history(run_id)

    async def list_runs(self, *, workflow: str | None = None, state: str | None = None,
                        limit: int = 100) -> tuple[RunRecord, ...]:
        return await self.db.list_runs(workflow=workflow, state=state, limit=limit)

    async def get_waits(self, run_id: str) -> tuple[WaitRecord, ...]:
        return await self.db.get_waits(run_id)

    async def get_events(self, run_id: str) -> tuple[EventRecord, ...]:
        return await self.db.get_events(run_id)

    async def get_children(self, run_id: str) -> tuple[RunRecord, ...]:
        return await self.db.get_children(run_id)

    async def run_counts(self) -> tuple[RunCount, ...]:
        return await self.db.run_counts()

    async def next_due(self) -> float | None:
        return await self.db.next_due()

    async def get_schedule(self, schedule_id: str) -> ScheduleRecord | None:
        return await self.db.get_schedule(schedule_id)

    async def list_schedules(self) -> tuple[ScheduleRecord, ...]:
        return await self.db.list_schedules()

    async def get_firings(self, schedule_id: str, limit: int = 20) -> tuple[ScheduleFiring, ...]:
        return await self.db.get_firings(schedule_id, limit)

    async def aclose(self) -> None:
        await trio.lowlevel.checkpoint()


@attrs.define
class NoticeFaults:
    delay: float = 0.0  # chance that a notice (and those behind it) is held up
    max_delay: float = 5.0
    latency: float = 0.002


@attrs.define(eq=False)
class _Listener:
    server: str
    inbox: trio.MemorySendChannel[str]
    lost: bool = False  # its connection is down: notices to it are lost
    ready_at: float = 0.0  # one connection: notices arrive in commit order


@attrs.define(eq=False)
class NoticeChannel:
    """The database's notification channel between servers (LISTEN/NOTIFY)."""

    rng: random.Random
    trace: list[str]
    faults: NoticeFaults = attrs.field(factory=NoticeFaults)
    nursery: trio.Nursery | None = None
    listeners: dict[str, _Listener] = attrs.field(factory=dict)
    stats: Counter[str] = attrs.field(factory=Counter)
    # (server, notice) -> when it reached the server's listener (None: lost), for the
    # notices the promptness checker reads (``revoked:...``).
    delivered: dict[tuple[str, str], float | None] = attrs.field(factory=dict)

    async def listen(self, server: str, on_notice: Callable[[str], None], *,
                     task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        send, receive = trio.open_memory_channel[str](float("inf"))
        listener = self.listeners[server] = _Listener(server, send)
        try:
            task_status.started()
            async for notice in receive:
                on_notice(notice)
        finally:
            if self.listeners.get(server) is listener:
                del self.listeners[server]

    def publish(self, origin: str, notices: list[str]) -> None:
        if not notices or self.nursery is None:
            return
        now = trio.current_time()
        for listener in list(self.listeners.values()):
            if listener.server == origin:
                continue
            if listener.lost:
                self.stats["notice lost"] += len(notices)
                for notice in notices:
                    self.delivered.setdefault((listener.server, notice), None)
                continue
            delay = self.faults.latency
            if self.rng.random() < self.faults.delay:
                delay += self.rng.uniform(0.0, self.faults.max_delay)
                self.stats["notice delayed"] += 1
            listener.ready_at = max(listener.ready_at, now + delay)
            self.nursery.start_soon(self._deliver, listener, listener.ready_at, list(notices))

    async def _deliver(self, listener: _Listener, at: float, notices: list[str]) -> None:
        PROCESS.set(None)  # the database's, not the committing server's
        await trio.sleep_until(at)
        lost = listener.lost or self.listeners.get(listener.server) is not listener
        for notice in notices:
            self.delivered.setdefault((listener.server, notice), None if lost else at)
            if not lost:
                listener.inbox.send_nowait(notice)

    def cut(self, server: str, duration: float) -> None:
        """``server``'s listening connection drops for ``duration``: what is notified meanwhile
        is lost; once it is back, the server hears ``resync``."""
        listener = self.listeners.get(server)
        if listener is None or listener.lost or self.nursery is None:
            return
        listener.lost = True
        self.stats["notice channel cut"] += 1
        self.trace.append(f"{trio.current_time():.6f} notices cut {server} {duration:.3f}")
        self.nursery.start_soon(self._restore, listener, duration)

    async def _restore(self, listener: _Listener, duration: float) -> None:
        PROCESS.set(None)
        await trio.sleep(duration)
        listener.lost = False
        if self.listeners.get(listener.server) is listener:
            listener.inbox.send_nowait("resync")

    def heal(self) -> None:
        self.faults = NoticeFaults()


def _first_difference(got: Any, expected: Any) -> str:
    """Where two answers first differ, briefly."""
    if (isinstance(got, (list, tuple)) and isinstance(expected, (list, tuple))
            and len(got) == len(expected)):
        for i, (a, b) in enumerate(zip(got, expected, strict=True)):
            if _differs(a, b):
                return f"at [{i}]: {_first_difference(a, b)}"
    return f"{got!r:.400} where the memory model has {expected!r:.400}"


def _differs(got: Any, expected: Any) -> bool:
    """Whether two stores' answers differ (errors by type and message)."""
    if isinstance(got, BaseException) or isinstance(expected, BaseException):
        return (type(got), str(got)) != (type(expected), str(expected))
    if isinstance(got, (list, tuple)) and isinstance(expected, (list, tuple)):
        return len(got) != len(expected) or any(
            _differs(a, b) for a, b in zip(got, expected, strict=True))
    return bool(got != expected)


def _traced(op: Any, outcome: Any) -> str:
    """An op as the trace shows it: its kind, its run (with the lease's epoch and worker),
    the runs a claim leased (with their epochs), and a refusal's error."""
    lease, run_id = getattr(op, "lease", None), getattr(op, "run_id", None)
    text = type(op).__name__
    if lease is not None:
        text += f"[{lease.run_id}:{lease.epoch}:{lease.worker_id}]"
    elif isinstance(run_id, str):
        text += f"[{run_id}]"
    if isinstance(op, o.Claim) and isinstance(outcome, tuple) and outcome:
        text += "->" + "/".join(f"{c.run.id}:{c.run.lease_epoch}" for c in outcome)
    if isinstance(outcome, AikiError):
        text += f"!{type(outcome).__name__}"
    return text
