"""StoreWriter: the one actor that writes to the store, committing many writes at once.

Messages: :class:`Write` (an op and the reply to answer). It owns nothing but its mailbox:
every outcome goes back to the asker, so a crash loses only the batch in flight, whose askers
time out and may retry (every op is safe to retry: see :mod:`aiki.store.ops`).

Group commit: it takes the first write, then whatever else is already waiting (up to
``max_batch``), and applies them all in one store transaction. Under load one commit carries
many runs' checkpoints; when idle a lone write is committed at once.

Being the one writer, it is where the server's metrics of runs, tasks and the store are
counted (:func:`count_outcome`): from each committed op and its outcome, so what is counted
is what the store holds, never a write that was refused or rolled back.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable
from typing import Any, TypeVar

import attrs
import trio

from aiki.actors.mailbox import Mailbox, Reply
from aiki.actors.scopes import serving_nursery
from aiki.errors import AikiError, StaleLease, StoreUnavailable
from aiki.metrics import (
    DISPATCH_LATENCY,
    LEASES_EXPIRED,
    RUNS,
    STALE_WRITES,
    STORE_COMMIT_SECONDS,
    STORE_ERRORS,
    STORE_OPS,
    STORE_OPS_PER_COMMIT,
    STORE_TRANSACTIONS,
    TASK_ATTEMPTS,
    Metrics,
)
from aiki.records import TERMINAL_RUN_STATES, Lease, RunRecord
from aiki.store.base import Store
from aiki.store.ops import (
    Claim,
    CompleteRun,
    ControlOutcome,
    Enqueue,
    EnqueueOutcome,
    ExpireLeases,
    FailRun,
    ForkRun,
    Op,
    Outcomes,
    PauseRun,
    Renew,
    ResumeRun,
    RetryRun,
    SaveStep,
    StartStep,
)

T = TypeVar("T")


@attrs.frozen
class Write:
    """One op, or several (a tuple) applied in order in the same transaction; the reply is
    the first refusal among them, or the last one's outcome."""

    op: Op[Any] | tuple[Op[Any], ...]
    reply: Reply[Any]
    every: bool = False  # reply with every op's outcome (refusals among them), in order

    @property
    def ops(self) -> tuple[Op[Any], ...]:
        return self.op if isinstance(self.op, tuple) else (self.op,)


@attrs.define(eq=False)
class StoreWriter:
    store: Store
    metrics: Metrics = attrs.field(factory=Metrics)
    # Told what every committed batch did beyond its outcomes (``Outcomes``: the runs it
    # ended, the leases it revoked, a deadline it set), whoever asked for the writes and
    # whatever became of the asker since: the server acts on it even when the request that
    # caused it was cut short (its connection lost) between the commit and its answer.
    on_committed: Callable[[Outcomes], None] = lambda outcomes: None
    # Told when a committed batch held a write whose asker had gone (cancelled: its
    # connection lost; or timed out), or when an asker is cancelled with its answer given
    # but not yet read (seed 294: cancelled in the same scheduling round as the commit):
    # what the asker would have told others after the commit (the Dispatcher that a run is
    # queued, the Timer of a wait's due time) is not known, and they look again.
    on_orphaned: Callable[[], None] = lambda: None
    # Told when a batch failed: it may have committed all the same (the connection lost at
    # the COMMIT), and what it did beyond its outcomes is not known. Its askers send their
    # writes again, if they are still there; the server looks again for the rest.
    on_unknown: Callable[[], None] = lambda: None
    # Told at the commit of the runs whose leases an ExpireLeases of the batch expired, so
    # the Dispatcher frees their seats before any later claim of them is answered.
    on_expired: Callable[[tuple[str, ...]], None] = lambda run_ids: None
    # Told at the commit of a batch that ended runs, before their watchers hear: the leases
    # of the batch's accepted completions and failures (each ends its holder's lease,
    # whether its run ended or now waits for its children).
    on_ended_by_holders: Callable[[tuple[Lease, ...]], None] = lambda leases: None
    # Told at the commit of the leases under which it accepted task starts or renewals:
    # their workers hold those runs (a seat that let one go, told by a heartbeat built
    # before the assignment reached the worker, learns it again before any later revoke of
    # it is told).
    on_held: Callable[[tuple[Lease, ...]], None] = lambda leases: None
    # Told before each batch is applied, and at its commit (before ``on_committed``) of the
    # runs its enqueues created: which runs have not ended, for whoever keeps count
    # (``RunWatchers``).
    on_applying: Callable[[], None] = lambda: None
    on_queued: Callable[[tuple[str, ...]], None] = lambda run_ids: None
    max_batch: int = 256
    timeout: float = 30.0
    mailbox: Mailbox[Write] = attrs.field(default=attrs.Factory(
        lambda self: Mailbox[Write](4096, "store-writer", self.metrics), takes_self=True))
    _applying: bool = False  # a batch is being applied

    @property
    def idle(self) -> bool:
        """No batch is being applied and no write waits: a write now is a batch of its own."""
        return not self._applying and self.mailbox.queued() == 0

    async def run(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        async with serving_nursery() as nursery:  # (a crash propagates as itself)
            nursery.start_soon(self.mailbox.expire_asks)  # the writes' timeouts, all at once
            task_status.started()
            await self._write_batches()

    async def _write_batches(self) -> None:
        while True:
            batch = [await self.mailbox.receive()]
            while len(batch) < self.max_batch:
                try:
                    batch.append(self.mailbox.receive_nowait())
                except trio.WouldBlock:
                    break
            metrics = self.metrics
            started = trio.current_time()
            flat = [op for w in batch for op in w.ops]
            self._applying = True
            self.on_applying()
            try:
                outcomes = await self.store.apply(flat)
            except Exception as exc:
                metrics.observe(STORE_COMMIT_SECONDS, trio.current_time() - started)
                metrics.inc(STORE_TRANSACTIONS, ("failed",))
                metrics.inc(STORE_ERRORS, (type(exc).__name__,))
                self.on_unknown()
                if isinstance(exc, StoreUnavailable):
                    for w in batch:
                        w.reply.fail(exc)
                    continue
                for w in batch:
                    w.reply.fail(StoreUnavailable(f"store write failed: {exc!r}"))
                raise
            finally:
                self._applying = False
            ended = getattr(outcomes, "ended", ())
            if metrics.enabled:
                metrics.observe(STORE_COMMIT_SECONDS, trio.current_time() - started)
                metrics.inc(STORE_TRANSACTIONS, ("committed",))
                metrics.observe(STORE_OPS_PER_COMMIT, len(outcomes))
                for op, outcome in zip(flat, outcomes, strict=True):
                    count_outcome(metrics, op, outcome)
                count_ends(metrics, ended)
            # (Only a store that notes its ends (``Outcomes``) may vouch that runs go on.)
            self.on_queued(tuple(
                out.run_id for op, out in zip(flat, outcomes, strict=True)
                if type(op) is Enqueue and type(out) is EnqueueOutcome and out.created
            ) if isinstance(outcomes, Outcomes) else ())
            held = held_under(flat, outcomes)
            if held:
                self.on_held(held)
            if ended:
                by_holders = tuple(op.lease for op, out in zip(flat, outcomes, strict=True)
                                   if isinstance(op, (CompleteRun, FailRun))
                                   and not isinstance(out, AikiError))
                if by_holders:
                    self.on_ended_by_holders(by_holders)
            if isinstance(outcomes, Outcomes) and (ended or outcomes.revoked
                                                   or outcomes.due is not None):
                self.on_committed(outcomes)
            if any(w.reply.is_done() for w in batch):
                self.on_orphaned()
            expired = tuple(run_id for op, out in zip(flat, outcomes, strict=True)
                            if type(op) is ExpireLeases and not isinstance(out, AikiError)
                            for run_id in out)
            if expired:
                self.on_expired(expired)
            answers = iter(outcomes)
            for w in batch:
                mine = [next(answers) for _ in w.ops]
                refused = [o for o in mine if isinstance(o, AikiError)]
                w.reply.send(mine if w.every else refused[0] if refused else mine[-1],
                             self.on_orphaned)

    async def write(self, op: Op[T], *before: Op[Any]) -> T:
        """Apply ``op`` (batched with others) and return its outcome; raise it if refused.
        Ops in ``before`` are applied first, in the same transaction; the first refusal
        among them all is raised."""
        chain: Op[Any] | tuple[Op[Any], ...] = (*before, op) if before else op
        outcome: Any = await self.mailbox.address.ask(lambda r: Write(chain, r), self.timeout)
        if isinstance(outcome, AikiError):
            raise outcome
        return outcome  # type: ignore[no-any-return]

    async def write_all(self, *ops: Op[Any]) -> list[Any]:
        """Apply ``ops`` in order in one transaction (batched with others); every op's
        outcome, a refusal among them as its outcome: one refused op does not undo the
        others."""
        outcomes: list[Any] = await self.mailbox.address.ask(
            lambda r: Write(ops, r, every=True), self.timeout)
        return outcomes


def held_under(ops: Iterable[Op[Any]], outcomes: Iterable[Any]) -> tuple[Lease, ...]:
    """The leases a commit of ``ops`` proved held by their workers: those of its accepted
    task starts, and those its renewals extended (not the ones they found lost)."""
    held: list[Lease] = []
    for op, out in zip(ops, outcomes, strict=True):
        if isinstance(out, AikiError):
            continue
        if type(op) is StartStep:
            held.append(op.lease)
        elif type(op) is Renew:
            held.extend(lease for lease in op.leases if lease.run_id not in out)
    return tuple(held)


# What an op whose outcome is a run record did to it, when it is not the run's new state.
_RUN_EVENT: dict[type[Op[Any]], str] = {RetryRun: "retried", ResumeRun: "resumed"}
_OK: dict[type[Op[Any]], tuple[str, str]] = {}  # the labels of an op applied: (name, "ok")


def _count_enqueue(metrics: Metrics, op: Any, outcome: Any) -> None:
    if outcome.created and op.origin is None:  # (a schedule's occurrence is not a client's)
        metrics.inc(RUNS, (op.workflow, op.version, "enqueued"))


def _count_control(metrics: Metrics, op: Any, outcome: ControlOutcome) -> None:
    if outcome.applied:  # not the same request sent again (answered as done)
        run = outcome.run
        event = "forked" if isinstance(op, ForkRun) else _RUN_EVENT.get(type(op), run.state)
        metrics.inc(RUNS, (run.workflow, run.version, event))


def _count_claim(metrics: Metrics, op: Any, outcome: Any) -> None:
    for claimed in outcome:
        run = claimed.run
        labels = (run.workflow, run.version)
        metrics.inc(RUNS, (*labels, "started"))
        if run.attempts == 1:  # its first claim: enqueue -> claim
            metrics.observe(DISPATCH_LATENCY, max(op.now - run.created_at, 0.0), labels)


def _count_save(metrics: Metrics, op: Any, outcome: Any) -> None:
    if outcome and op.step.kind == "task" and op.step.state != "running":
        metrics.inc(TASK_ATTEMPTS, (op.step.name, op.step.state))


def _count_expired(metrics: Metrics, op: Any, outcome: Any) -> None:
    if outcome:
        metrics.inc(LEASES_EXPIRED, by=len(outcome))


_COUNT: dict[type[Op[Any]], Callable[[Metrics, Any, Any], None]] = {
    Enqueue: _count_enqueue, Claim: _count_claim, SaveStep: _count_save,
    ExpireLeases: _count_expired, ForkRun: _count_control, RetryRun: _count_control,
    PauseRun: _count_control, ResumeRun: _count_control,
}


def count_outcome(metrics: Metrics, op: Op[Any], outcome: Any) -> None:
    """Count one committed op: every op by name and outcome; then what it did to runs and
    tasks. An op that returns the run it moved (completing, failing, retrying, cancelling,
    ...) counts as that run's new state, so a new op of that shape needs no code here."""
    cls = type(op)
    if isinstance(outcome, AikiError):
        metrics.inc(STORE_OPS, (cls.__name__, type(outcome).__name__))
        if isinstance(outcome, StaleLease):
            metrics.inc(STALE_WRITES, (cls.__name__,))
        return
    ok = _OK.get(cls)
    if ok is None:
        ok = _OK[cls] = (cls.__name__, "ok")
    metrics.inc(STORE_OPS, ok)
    counter = _COUNT.get(cls)
    if counter is not None:
        counter(metrics, op, outcome)
    elif isinstance(outcome, RunRecord):
        event = _RUN_EVENT.get(cls, outcome.state)
        if event not in TERMINAL_RUN_STATES:  # (ends are counted from what the batch ended)
            metrics.inc(RUNS, (outcome.workflow, outcome.version, event))


def count_ends(metrics: Metrics, ended: Iterable[RunRecord]) -> None:
    """Count the runs a committed batch ended (completed, failed, cancelled): those its ops
    ended, and those that ended with them (a parent settled, a tree cancelled); a repeated
    op that finds its run ended already ends nothing, and counts nothing."""
    for run in ended:
        metrics.inc(RUNS, (run.workflow, run.version, run.state))
