"""A batch of one run, decided on what this store last wrote, in one autocommitted statement;
and a run claimed as it is enqueued, in another.

One at a time, each batch of a run's life after its claim is a task start (with the previous
task's outcome), or the last outcome with the run's end: ops of one run. In a transaction
that is four round trips: BEGIN with the run's lock, the read of the run and its step, the
write, COMMIT. But the store that claimed the run, or wrote it last, knows it as it is now,
unless another writer changed it since (another server, a cancel, a lease expiry). The run
row's version tells: ``xmin``, the id of the transaction that wrote that version. So:

- :class:`Fresh` keeps, per run, what this store last saw of it as a whole (its row and every
  step) and that row's version: from a claim, and from each write here;
- :func:`plan` asks the state machine for each op's change on what is kept, as the locked
  path would on what it read. Anything but a plain write (a refusal, a repeat, a change
  beyond the run's row, steps and history, an end that touches another run) is left to the
  locked path, which decides again on what it reads;
- the writes go in one statement (:data:`WRITE`) that first locks the run's row if its
  version is still the one kept (a compare-and-set), and writes nothing otherwise. A row
  changed and committed after the statement's snapshot is checked again as committed (the
  version compared is the newest one's): the statement sees it changed and writes nothing.
  A row another transaction holds is skipped, not waited for: nothing is written either.
  Then the batch goes the locked way, as before.

Why the row's version covers the steps too: every transaction that writes a run's steps
also writes the run's row (``_sql.TOUCH``), so no change that the state machine's decision
reads (the run's row and the step at the op's position) leaves the version as it was. A
claim reads the steps it keeps after it locked the runs (``_sql._CLAIMED_STEPS``). And a
run's end reads how many children it waits for: a run with no ``child`` step kept started
none, and the statement itself looks for unfinished children of its id (a run id used again
after a purge may name the parent of an older run's children).

The other batch of one run at a time is its enqueue with the claim of an idle worker: when
no other run of its version is queued, the claim can lease only the new run, so the run is
inserted as leased (:data:`NEW_CLAIMED`), and kept here for its first task start.

An autocommitted statement has no transaction id to ask about if its reply is lost. Its
history events are its receipt instead: :func:`statement_fate` waits until the server
process that ran it is gone, then looks them up.
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable, Mapping, Sequence
from typing import Any, TypeVar

import attrs

from aiki.errors import AikiError
from aiki.records import TERMINAL_RUN_STATES, ClaimedRun, RunRecord, StepRecord, row_of
from aiki.store import machine as m
from aiki.store import ops as o
from aiki.store.postgres import _sql
from aiki.store.postgres._sql import (
    _HISTORY_TYPES,
    _RUN_FIELDS,
    _RUN_TYPES,
    _STEP_TYPES,
    RUN_COLUMNS,
    STEP_COLUMNS,
    CommitUnknown,
    Conn,
    History,
    Pool,
    _columns,
    _lost,
    _unnest,
)


@attrs.frozen
class Seen:
    """A run as this store last wrote or claimed it: the row, every step, and the row's
    version (``xmin``) and place (``ctid``: the statement finds the row there, whatever the
    planner thinks of the table's size)."""

    version: str
    place: str
    run: RunRecord
    steps: Mapping[str, StepRecord]


class Fresh:
    """What this store saw last of the runs it works on (:class:`Seen`), for :func:`plan`.

    A run is kept from its claim and through the writes of this module, and forgotten when it
    ends, when a batch of the locked path touches it (what that batch did is not kept), or,
    past ``limit`` runs, with the oldest half. A run with more than ``max_steps`` steps is not
    kept: a batch of it goes the locked way. Stale entries are harmless (the version check
    refuses them); forgetting only saves a round trip that would find one stale. Touched on
    the asyncio loop only."""

    def __init__(self, limit: int = 4096, max_steps: int = 256) -> None:
        self._seen: dict[str, Seen] = {}
        self._limit = limit
        self._max_steps = max_steps

    def get(self, run_id: str) -> Seen | None:
        return self._seen.get(run_id)

    def learn(self, run_id: str, seen: Seen) -> None:
        if len(seen.steps) > self._max_steps:
            self._seen.pop(run_id, None)
            return
        if run_id not in self._seen and len(self._seen) >= self._limit:
            for old in list(self._seen)[: self._limit // 2]:
                del self._seen[old]
        self._seen[run_id] = seen

    def forget(self, run_id: str) -> None:
        self._seen.pop(run_id, None)

    def __len__(self) -> int:
        return len(self._seen)

    def kept(self, ops: Sequence[o.Op[Any]]) -> dict[str, str]:
        """The row version kept of each run the renewals of ``ops`` name, when the batch
        is one whose renewals :meth:`after_locked` may learn (see there)."""
        if not all(isinstance(op, _LEARNED) for op in ops):
            return {}
        return {lease.run_id: seen.version for op in ops if isinstance(op, o.Renew)
                for lease in op.leases if (seen := self._seen.get(lease.run_id)) is not None}

    def after_locked(self, ops: Sequence[o.Op[Any]], outcomes: Sequence[Any],
                     versions: Mapping[str, tuple[str, str]],
                     renewed: Mapping[str, tuple[str, str]]) -> None:
        """A batch went the locked way: the runs its ops name are forgotten; when nothing
        else in the batch could have written them (every op is a claim, an enqueue or a
        renewal: the row's version is the batch's, and each run is written by one op),
        the runs its claims leased are kept as the claim returned them, and the kept runs
        it renewed while still as kept (``renewed``: their new version and place), renewed
        as the state machine renews them. A run running longer than a heartbeat stays on
        the one-statement path."""
        for op in ops:
            run_id = _run_named(op)
            if run_id is not None:
                self.forget(run_id)
        if not all(isinstance(op, _LEARNED) for op in ops):
            return
        for op, outcome in zip(ops, outcomes, strict=True):
            if isinstance(op, o.Claim) and isinstance(outcome, tuple):
                for claimed in outcome:
                    if isinstance(claimed, ClaimedRun) and claimed.run.id in versions:
                        self.learn(claimed.run.id, Seen(
                            *versions[claimed.run.id], claimed.run,
                            {s.position: s for s in claimed.steps}))
            elif isinstance(op, o.Renew) and isinstance(outcome, tuple):
                for lease in op.leases:
                    seen = self._seen.get(lease.run_id)
                    if seen is None or lease.run_id in outcome:
                        continue  # (not kept; or its lease was stale, and kept as it was)
                    run = m.renew(seen.run, lease, op.now, op.lease_ttl)
                    if run is None or lease.run_id not in renewed:
                        self.forget(lease.run_id)  # (changed since it was kept)
                    else:
                        self.learn(lease.run_id,
                                   Seen(*renewed[lease.run_id], run, seen.steps))


_LEARNED = (o.Claim, o.Enqueue, o.Renew)  # the ops of a batch after_locked learns from


def _run_named(op: o.Op[Any]) -> str | None:
    lease = getattr(op, "lease", None)
    if lease is not None:
        return str(lease.run_id)
    run_id = getattr(op, "run_id", None)
    return run_id if isinstance(run_id, str) else None


# -- the statement ----------------------------------------------------------------------------
_GUARDED = "EXISTS (SELECT FROM guard)"
_FIRST_RUN = 5 + len(_STEP_TYPES)
_FIRST_HISTORY = _FIRST_RUN + len(_RUN_FIELDS)
WRITE = (  # $1 the run, $2 and $3 its row's version and place as kept, $4 whether it ends;
    # its steps, its row's fields, its history events. (Found by place, a TID scan: a plan
    # kept from when the table was small may not read it in full.) A run that ends must have
    # no unfinished child it did not detach, as the locked way counts them (a run id used
    # again after a purge may name a parent whose old children are retried). A row another
    # transaction holds is not waited for (SKIP LOCKED): the statement writes nothing and
    # the batch goes the locked way, so this statement never waits on a lock, and a cancel
    # never leaves it waiting to commit once the lock is free.
    "WITH guard AS MATERIALIZED (SELECT id FROM runs WHERE ctid = $3::text::tid"
    " AND xmin = $2::text::xid AND id = $1 AND (NOT $4::bool OR NOT EXISTS (SELECT FROM runs c"
    f" WHERE c.parent_id = $1 AND NOT c.detached AND c.{_sql._UNFINISHED}))"
    " FOR UPDATE SKIP LOCKED),"
    f" upserted AS (INSERT INTO steps (run_id, {STEP_COLUMNS})"
    f" SELECT * FROM {_unnest(5, _STEP_TYPES)} WHERE {_GUARDED}"
    " ON CONFLICT (run_id, position) DO UPDATE SET "
    + ", ".join(f"{f.name} = excluded.{f.name}" for f in attrs.fields(StepRecord)) + "),"
    " changed AS (UPDATE runs SET "
    + ", ".join(f"{c} = ${i}" for i, c in enumerate(_RUN_FIELDS, start=_FIRST_RUN))
    + f" WHERE ctid = $3::text::tid AND {_GUARDED} RETURNING xmin::text, ctid::text),"
    " logged AS (INSERT INTO history (run_id, at, event, attempt, worker_id, position, name,"
    f" detail) SELECT * FROM {_unnest(_FIRST_HISTORY, _HISTORY_TYPES)} WHERE {_GUARDED})"
    " SELECT * FROM changed")


@attrs.define
class Plan:
    """What a batch of one run writes, decided on what :class:`Fresh` kept of it."""

    run_id: str
    version: str  # the row's, as kept
    place: str
    run: RunRecord  # as it will be
    steps: dict[str, StepRecord]  # every step, as they will be
    written: dict[str, StepRecord]  # the steps written, in the order first written
    history: list[History]
    outcomes: o.Outcomes


def plan(ops: Sequence[o.Op[Any]], fresh: Fresh) -> Plan | None:
    """The writes of ``ops`` if they are task starts and outcomes without an idempotency key
    and the end of a run that writes no other run, all of one running run :class:`Fresh`
    keeps, and each one's change is a plain write (:func:`aiki.store.machine.rows_only`,
    with a history event); otherwise None.

    (A change may end the run's waits: a running run has none, since waits are kept only
    while a run waits, so there is nothing to delete.)"""
    first = ops[0] if ops else None
    if not isinstance(first, (o.StartStep, o.SaveStep, o.CompleteRun)):
        return None
    run_id = first.lease.run_id
    seen = fresh.get(run_id)
    if seen is None or seen.run.state != "running":
        return None
    run, steps = seen.run, dict(seen.steps)
    written: dict[str, StepRecord] = {}
    history: list[History] = []
    results: list[Any] = []
    ended: list[RunRecord] = []
    for op in ops:
        if not isinstance(op, (o.StartStep, o.SaveStep, o.CompleteRun)) \
                or op.lease.run_id != run_id or ended:
            return None
        try:
            if isinstance(op, o.CompleteRun):
                if not m.ends_alone(run) or any(s.kind == "child" for s in steps.values()):
                    return None
                change = m.finish(run, op.lease, op.now, result=op.result, children=0)
            else:
                if op.step.idempotency_key is not None:
                    return None
                change = m.decide_step(op, run, steps.get(op.step.position), None)
        except AikiError:
            return None  # a refusal: the locked path decides again, on what it reads
        if not change.history or not m.rows_only(change):
            return None
        if change.run is not None:
            run = change.run
        for step in change.steps:
            steps[step.position] = written[step.position] = step
        history += _entries(run_id, change.history)
        if isinstance(op, o.CompleteRun):
            if change.run is None or change.run.state not in TERMINAL_RUN_STATES:
                return None
            ended.append(change.run)
            results.append(change.run)
        else:
            results.append(True)
    outcomes = o.Outcomes(results)
    outcomes.ended = tuple(ended)
    return Plan(run_id, seen.version, seen.place, run, steps, written, history, outcomes)


def _entries(run_id: str, entries: Sequence[m.Entry]) -> list[History]:
    return [(run_id, e.at, e.event, e.attempt, e.worker_id, e.position, e.name, e.detail)
            for e in entries]


async def write(conn: Conn, p: Plan) -> tuple[str, str] | None:
    """Send :data:`WRITE` for ``p``: the run row's new version and place, or None if it had
    changed (nothing was written). A seam: the tests replace it to lose the connection
    around it."""
    row = await conn.fetchrow(
        WRITE, p.run_id, p.version, p.place, bool(p.outcomes.ended),
        *_columns([(p.run_id, *row_of(s)) for s in p.written.values()], len(_STEP_TYPES)),
        *row_of(p.run)[1:], *_columns(p.history, len(_HISTORY_TYPES)))
    return None if row is None else (row[0], row[1])


# -- a run claimed as it is enqueued -----------------------------------------------------------
# An enqueue while a worker of its version has nothing to do comes with a claim for that
# worker (``Dispatcher.reserve``): in a transaction, five round trips (BEGIN, the insert, the
# claim, the claimed run's steps, COMMIT). When no other run of the version is queued, the
# claim can only lease the new run, and the run can be written as it will be once leased, in
# one statement. A run queued before it (or the run's id, or its idempotency key, taken
# already) means nothing is written: the batch goes the locked way. (Unlike WRITE, this
# statement may wait for a lock: an insert of the same run id or idempotency key by a
# transaction still open. Cancelled while it waits, it may still commit once that lock is
# free: a run leased to the worker its caller reserved, which never hears of it, so the
# lease expires and the run is claimed again, as when a cancelled locked-way batch's
# COMMIT went out (``Session._enqueue``).)
_NEW_HISTORY = 1 + len(_RUN_TYPES)
NEW_CLAIMED = (  # $1.. the run's fields as leased ($1 its id, $2 and $3 its workflow and
    # version); its history events. (The queued runs of a version are found through their
    # own index, runs_claim: the generic plan is checked by a test on a new store and on a
    # small one. Once statistics say the table is empty, a plan made then reads it in full,
    # until the next ANALYZE makes it again.)
    "WITH older AS MATERIALIZED (SELECT FROM runs WHERE state = 'queued' AND workflow = $2"
    " AND version = $3 ORDER BY seq LIMIT 1),"
    f" new AS (INSERT INTO runs ({RUN_COLUMNS}) SELECT "
    + ", ".join(f"${i}::{t}" for i, t in enumerate(_RUN_TYPES, start=1))
    + " WHERE NOT EXISTS (SELECT FROM older) ON CONFLICT DO NOTHING"
    " RETURNING xmin::text, ctid::text),"
    " logged AS (INSERT INTO history (run_id, at, event, attempt, worker_id, position, name,"
    f" detail) SELECT * FROM {_unnest(_NEW_HISTORY, _HISTORY_TYPES)}"
    " WHERE EXISTS (SELECT FROM new))"
    " SELECT * FROM new")


_P = TypeVar("_P", "Plan", "NewClaimed")


@attrs.frozen
class NewClaimed:
    """An enqueue and the claim that leases its run, decided without a read."""

    run: RunRecord  # as leased
    history: list[History]
    outcomes: o.Outcomes


def plan_new(ops: Sequence[o.Op[Any]]) -> NewClaimed | None:
    """The run of an enqueue followed by a claim of its version alone, as that claim would
    lease it if no other run of the version is queued; otherwise None."""
    if len(ops) != 2:
        return None
    enqueue, claim = ops
    if not isinstance(enqueue, o.Enqueue) or not isinstance(claim, o.Claim) \
            or claim.workflows != ((enqueue.workflow, enqueue.version),) or claim.limit < 1:
        return None
    queued, entry = m.enqueue(enqueue)
    change = m.claim(queued, claim.worker_id, claim.now, claim.lease_ttl)
    assert change.run is not None
    outcomes = o.Outcomes([o.EnqueueOutcome(enqueue.run_id, created=True),
                           (ClaimedRun(change.run, ()),)])
    return NewClaimed(change.run, _entries(enqueue.run_id, (entry, *change.history)),
                      outcomes)


async def insert(conn: Conn, p: NewClaimed) -> tuple[str, str] | None:
    """Send :data:`NEW_CLAIMED` for ``p``: the new row's version and place, or None if
    nothing was written. A seam, as :func:`write`."""
    row = await conn.fetchrow(NEW_CLAIMED, *row_of(p.run),
                              *_columns(p.history, len(_HISTORY_TYPES)))
    return None if row is None else (row[0], row[1])


async def apply(conn: Conn, ops: Sequence[o.Op[Any]], fresh: Fresh) -> o.Outcomes | None:
    """``ops`` applied by :data:`WRITE`, when :func:`plan` allows and the run is as kept
    (and not held by another transaction), or by :data:`NEW_CLAIMED`, when :func:`plan_new`
    allows and no other run of its version is queued; None when they must go the locked
    way (nothing was written)."""
    p = plan(ops, fresh)
    if p is not None:
        fresh.forget(p.run_id)  # (kept again below, once the new version is known)
        written = await _sent(conn, write, p)
        if written is not None and not p.outcomes.ended:
            fresh.learn(p.run_id, Seen(*written, p.run, p.steps))
        return None if written is None else p.outcomes
    new = plan_new(ops)
    if new is not None:
        written = await _sent(conn, insert, new)
        if written is not None:
            fresh.learn(new.run.id, Seen(*written, new.run, {}))
        return None if written is None else new.outcomes
    return None


async def _sent(conn: Conn, send: Callable[[Conn, _P], Awaitable[tuple[str, str] | None]],
                p: _P) -> tuple[str, str] | None:
    """``send(conn, p)``; a lost reply raised as :class:`CommitUnknown`, with the history
    events that tell whether the statement committed."""
    pid = conn.get_server_pid()  # (unknown once the connection is gone)
    try:
        return await send(conn, p)
    except Exception as exc:
        if _lost(exc, conn):
            raise CommitUnknown(exc, p.outcomes, None, pid, p.history) from exc
        raise


async def run_batch(pool: Pool, ops: Sequence[o.Op[Any]], parents: _sql.Parents,
                    fresh: Fresh) -> o.Outcomes:
    """Apply ``ops``: by :func:`apply` when it can, the locked way otherwise (on the same
    connection, in one crossing of the bridge); one outcome per op."""

    async def body(conn: Conn) -> o.Outcomes:
        outcomes = await apply(conn, ops, fresh)
        if outcomes is not None:
            parents.applied(ops, outcomes)
            return outcomes
        if renewals_apart(ops, fresh):
            return await _renewals_first(conn, ops, parents, fresh)
        return await _locked(conn, ops, parents, fresh)

    return await _sql.with_connection(pool, body)


async def _locked(conn: Conn, ops: Sequence[o.Op[Any]], parents: _sql.Parents,
                  fresh: Fresh) -> o.Outcomes:
    outcomes, batch = await _sql.apply_batch(conn, ops, parents, fresh.kept(ops))
    fresh.after_locked(ops, outcomes, batch.versions, batch.renewed)
    return outcomes


def renewals_apart(ops: Sequence[o.Op[Any]], fresh: Fresh) -> bool:
    """Whether ``ops`` are heartbeats' renewals and one run's writes that :func:`plan`
    takes: the store writer merges a worker's heartbeat with whatever its runs write at the
    time. Together they would go the locked way, which forgets the run for the rest of its
    life (a run renewed every heartbeat interval meets one of its own writes in a batch
    sooner or later)."""
    renewals = [op for op in ops if isinstance(op, o.Renew)]
    return 0 < len(renewals) < len(ops) and plan(
        [op for op in ops if not isinstance(op, o.Renew)], fresh) is not None


async def _renewals_first(conn: Conn, ops: Sequence[o.Op[Any]], parents: _sql.Parents,
                          fresh: Fresh) -> o.Outcomes:
    """``ops`` (see :func:`renewals_apart`) in two parts: the renewals the locked way,
    which notes the kept runs renewed (:meth:`Fresh.after_locked`), then the run's writes
    by :func:`apply` on the run as renewed (the locked way if it changed since). The
    worker sent its heartbeat and its run's writes as requests of their own, each answered
    on its own: any order of them is one it could have seen.

    Two transactions, and either may be lost: repeating a renewal is harmless (at the
    same reading of the clock it renews to the same expiry, or finds the lease gone, as it
    is), so a renewal whose fate is unknown has the whole batch run again, and the fate of
    the second part, once known, stands for the batch."""
    first = [i for i, op in enumerate(ops) if isinstance(op, o.Renew)]
    rest = [i for i, op in enumerate(ops) if not isinstance(op, o.Renew)]
    try:
        renewed = await _locked(conn, [ops[i] for i in first], parents, fresh)
    except CommitUnknown as unknown:
        raise _sql.NotCommitted(unknown.cause) from unknown

    def merged(written: Sequence[Any]) -> o.Outcomes:
        out = o.Outcomes([None] * len(ops))
        for i, outcome in zip(first, renewed, strict=True):
            out[i] = outcome
        for i, outcome in zip(rest, written, strict=True):
            out[i] = outcome
        out.ended = renewed.ended + getattr(written, "ended", ())
        out.revoked = renewed.revoked + getattr(written, "revoked", ())
        out.due = min((d for d in (renewed.due, getattr(written, "due", None))
                       if d is not None), default=None)
        return out

    writes = [ops[i] for i in rest]
    try:
        outcomes = await apply(conn, writes, fresh)
        if outcomes is not None:
            parents.applied(writes, outcomes)
        else:
            outcomes = await _locked(conn, writes, parents, fresh)
    except CommitUnknown as unknown:
        raise CommitUnknown(unknown.cause, merged(unknown.outcomes), unknown.xid, unknown.pid,
                            unknown.receipt) from unknown
    return merged(outcomes)


_RECEIPT = (  # the transactions that wrote a history event equal to this one
    "SELECT xmin::text FROM history WHERE run_id = $1 AND at = $2 AND event = $3"
    " AND attempt = $4 AND worker_id IS NOT DISTINCT FROM $5"
    " AND position IS NOT DISTINCT FROM $6 AND name IS NOT DISTINCT FROM $7"
    " AND detail IS NOT DISTINCT FROM $8")


async def statement_fate(pool: Pool, receipt: Sequence[History], pid: int) -> str | None:
    """Whether the statement that wrote the history events ``receipt`` committed:
    ``committed`` or ``aborted``; ``in progress`` if the server process ``pid`` that ran it
    would not end.

    The process is ended first, and waited for, so the answer is final: a statement still
    running may commit after a look that did not find its events. Committed means one
    transaction wrote events equal to all of them: each holds the server's clock reading
    for its op (stamped per message), so another statement writes the same set only by
    applying the same ops at the same readings of the clock. With no event to look for, the
    fate cannot be told (None)."""

    async def read(conn: Conn) -> str | None:
        if not receipt:
            return None
        if not await _ended(conn, pid):
            return "in progress"
        writers: set[str] | None = None
        for event in receipt:
            found = {row[0] for row in await conn.fetch(_RECEIPT, *event)}
            writers = found if writers is None else writers & found
        return "committed" if writers else "aborted"

    return await _sql.with_connection(pool, read)


_ALIVE = "SELECT count(*) FROM pg_stat_activity WHERE pid = $1"


async def _ended(conn: Conn, pid: int) -> bool:
    """Terminate server process ``pid`` and wait (up to 5 s) until it is gone; whether it
    is."""
    if await conn.fetchval(_ALIVE, pid):
        await conn.execute("SELECT pg_terminate_backend($1, 5000)", pid)
        return not await conn.fetchval(_ALIVE, pid)
    return True

