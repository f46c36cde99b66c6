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

import logging
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
from aiki.records import TERMINAL_RUN_STATES, RunRecord
from aiki.store.base import Store
from aiki.store.ops import (
    Claim,
    ControlOutcome,
    Enqueue,
    ExpireLeases,
    ForkRun,
    Op,
    PauseRun,
    ResumeRun,
    RetryRun,
    SaveStep,
)

T = TypeVar("T")
log = logging.getLogger("aiki.store_writer")


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
    # Told the leases a committed batch revoked on no client's request (``Outcomes.revoked``:
    # a schedule's ``cancel_previous``), so their workers hear of it now.
    on_revoked: Callable[[tuple[tuple[str, int | None], ...]], None] = lambda revoked: None
    max_batch: int = 256
    timeout: float = 30.0
    mailbox: Mailbox[Write] = attrs.field(default=attrs.Factory(
        lambda self: Mailbox[Write](4096, "store-writer", self.metrics), takes_self=True))
    _applying: bool = False  # a batch is being applied
    _asked: int = 0  # writes handed to the writer and not answered yet
    # The store's batch applied on this thread now, or None (``_at_once``).
    _inline: Callable[[list[Op[Any]]], list[Any] | None] | None = attrs.field(
        init=False, default=attrs.Factory(
            lambda self: getattr(self.store, "apply_at_once", None), takes_self=True))

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
            started = trio.current_time()
            flat = [op for w in batch for op in w.ops]
            self._applying = True
            try:
                outcomes = await self.store.apply(flat)
            except Exception as exc:
                failure = self._failed(exc, started)
                for w in batch:
                    w.reply.fail(failure)
                if failure is exc:
                    continue
                raise
            finally:
                self._applying = False
            self._committed(flat, outcomes, started)
            answers = iter(outcomes)
            for w in batch:
                mine = [next(answers) for _ in w.ops]
                w.reply.send(_answer(mine, w.every))

    def _committed(self, ops: list[Op[Any]], outcomes: list[Any], started: float) -> None:
        """Count a committed batch, and tell of the leases it revoked."""
        metrics = self.metrics
        if metrics.enabled:
            metrics.observe(STORE_COMMIT_SECONDS, trio.current_time() - started)
            metrics.inc(STORE_TRANSACTIONS, ("committed",))
            metrics.observe(STORE_OPS_PER_COMMIT, len(outcomes))
            for op, outcome in zip(ops, outcomes, strict=True):
                count_outcome(metrics, op, outcome)
            count_ends(metrics, getattr(outcomes, "ended", ()))
        revoked = getattr(outcomes, "revoked", ())
        if revoked:
            self.on_revoked(revoked)

    def _failed(self, exc: Exception, started: float) -> StoreUnavailable:
        """Count a batch that failed; what its writers are told (``exc`` itself if the
        store is unavailable; anything else is a bug, and crashes the writer)."""
        metrics = self.metrics
        metrics.observe(STORE_COMMIT_SECONDS, trio.current_time() - started)
        metrics.inc(STORE_TRANSACTIONS, ("failed",))
        metrics.inc(STORE_ERRORS, (type(exc).__name__,))
        if isinstance(exc, StoreUnavailable):
            return exc
        return StoreUnavailable(f"store write failed: {exc!r}")

    def _at_once(self, ops: tuple[Op[Any], ...]) -> list[Any] | None:
        """The outcomes of ``ops`` applied now, in the writer's stead, if the store can
        apply a batch on this thread without waiting (SQLite when no other task is
        runnable) and the writer has nothing before them: no write waits, none is being
        applied, none was handed to it (so nothing sent earlier is applied later). The
        batch would have been these ops alone, one scheduler round and two task switches
        later. None: they go to the writer."""
        inline = self._inline
        if inline is None or self._applying or self._asked or self.mailbox.queued():
            return None
        started = trio.current_time()
        flat = list(ops)
        try:
            outcomes = inline(flat)
        except Exception as exc:
            failure = self._failed(exc, started)
            if failure is not exc:  # a bug: its asker hears what the writer would say
                log.error("store writer: a write applied at once failed", exc_info=exc)
                raise failure from exc
            raise
        if outcomes is not None:
            self._committed(flat, outcomes, started)
        return outcomes

    async def _ask(self, ops: tuple[Op[Any], ...], every: bool) -> Any:
        done = self._at_once(ops)
        if done is not None:
            await trio.lowlevel.cancel_shielded_checkpoint()  # (others run between writes)
            return _answer(done, every)
        self._asked += 1
        try:
            return await self.mailbox.address.ask(
                lambda r: Write(ops if len(ops) > 1 else ops[0], r, every=every),
                self.timeout)
        finally:
            self._asked -= 1

    async def write(self, op: Op[T], *before: Op[Any]) -> T:
        """Apply ``op`` (batched with others) and return its outcome; raise it if refused.
        Ops in ``before`` are applied first, in the same transaction; the first refusal
        among them all is raised."""
        outcome: Any = await self._ask((*before, op), every=False)
        if isinstance(outcome, AikiError):
            raise outcome
        return outcome  # type: ignore[no-any-return]

    async def write_all(self, *ops: Op[Any]) -> list[Any]:
        """Apply ``ops`` in order in one transaction (batched with others); every op's
        outcome, a refusal among them as its outcome: one refused op does not undo the
        others."""
        outcomes: list[Any] = await self._ask(ops, every=True)
        return outcomes


def _answer(outcomes: list[Any], every: bool) -> Any:
    """A write's answer: every outcome, or the first refusal, or the last outcome."""
    if every:
        return outcomes
    for outcome in outcomes:
        if isinstance(outcome, AikiError):
            return outcome
    return outcomes[-1]


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
