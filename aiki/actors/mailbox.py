"""Mailboxes: the bounded queue an actor reads, the address others send to, one-shot replies.

An actor owns one :class:`Mailbox` and reads it; everybody else holds only its
:class:`Address`. Messages are hints (the store is the truth), so a full mailbox drops rather
than blocks, except on the parent → child path where :meth:`Address.tell` may wait.

An ``ask`` waits for its reply at most its timeout. Where the mailbox's owner runs
:meth:`Mailbox.expire_asks` beside its loop (the StoreWriter does: every task start and
outcome is an ask), one task fails the asks whose time is up, instead of a cancel scope per
ask (see :mod:`aiki.actors.deadlines`).

Every message a mailbox refuses (full or closed) is counted in the ``metrics`` sink it was
given (``aiki_mailbox_dropped_total{mailbox, reason}``), so an operator sees an actor fall
behind; without one it counts into a sink of its own.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Generic, TypeVar, cast

import trio

from aiki.actors.deadlines import DeadlineQueue
from aiki.errors import AikiError
from aiki.metrics import MAILBOX_DROPPED, Metrics

T = TypeVar("T")
R = TypeVar("R")


class MailboxFull(AikiError):
    """An ``ask`` found the mailbox full: the actor is behind. Retry later or drop the request."""

    def __init__(self, name: str) -> None:
        super().__init__(f"mailbox {name!r} is full: its actor is behind; retry later or drop")
        self.name = name


class MailboxClosed(AikiError):
    """The mailbox was closed: its actor has stopped taking messages."""

    def __init__(self, name: str) -> None:
        super().__init__(f"mailbox {name!r} is closed: its actor no longer takes messages")
        self.name = name


class AskTimeout(AikiError):
    """No reply came within the ``ask`` timeout; the request may or may not have been handled."""


class Reply(Generic[R]):
    """A one-shot answer slot carried inside a message.

    The first :meth:`send` or :meth:`fail` wins; later calls are ignored. Neither blocks nor
    raises, even if the asker has timed out or been cancelled and nobody will ever read it.
    """

    def __init__(self) -> None:
        self._done = trio.Event()
        self._value: R | None = None
        self._error: BaseException | None = None
        self._if_lost: Callable[[], None] | None = None

    def send(self, value: R, if_lost: Callable[[], None] | None = None) -> None:
        """Answer ``value``. ``if_lost`` is called if the asker turns out to be gone without
        reading it: cancelled in the same scheduling round, before it ran again, so
        :meth:`is_done` said nothing of it at the time (a write committed whose asker will
        not act on it)."""
        if not self._done.is_set():
            self._value = value
            self._if_lost = if_lost
            self._done.set()

    def fail(self, exc: BaseException) -> None:
        if not self._done.is_set():
            self._error = exc
            self._done.set()

    def is_done(self) -> bool:
        """Answered, or its asker gone (timed out or cancelled: nobody will read it)."""
        return self._done.is_set()

    expire = fail  # (for the sweep of aiki.actors.deadlines)

    async def _wait(self) -> R:
        try:
            await self._done.wait()
        except BaseException:  # (cancelled, perhaps after it was answered)
            if self._done.is_set() and self._if_lost is not None:
                self._if_lost()
            raise
        if self._error is not None:
            raise self._error
        return cast(R, self._value)  # set together with _done


class Address(Generic[T]):
    """Where to send messages to one mailbox. Cheap to share. A message refused because the
    mailbox was full or closed is counted in ``metrics`` under the mailbox's name."""

    def __init__(self, send: trio.MemorySendChannel[T], name: str, metrics: Metrics) -> None:
        self._send = send
        self.name = name
        self.metrics = metrics
        self._full = (name, "full")
        self._closed = (name, "closed")
        self._deadlines: DeadlineQueue[Reply[object]] = DeadlineQueue()

    def _dropped(self, closed: bool) -> None:
        self.metrics.inc(MAILBOX_DROPPED, self._closed if closed else self._full)

    async def tell(self, msg: T) -> None:
        """Send ``msg``, waiting while the mailbox is full; raise :class:`MailboxClosed`.

        Use it only from a parent to its child: a cycle of blocking sends (A waits on B's full
        mailbox while B waits on A's) deadlocks. Peers and replies use :meth:`tell_nowait`.
        Cancelled while waiting, the message is not delivered.
        """
        try:
            await self._send.send(msg)
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            raise MailboxClosed(self.name) from None

    def room(self) -> int:
        """How many more messages fit now (0 when full or closed)."""
        stats = self._send.statistics()
        if stats.open_receive_channels == 0:
            return 0
        return max(int(stats.max_buffer_size) - stats.current_buffer_used, 0)

    def tell_nowait(self, msg: T) -> bool:
        """Send ``msg`` if there is room; return False (and count a drop) if full or closed."""
        try:
            self._send.send_nowait(msg)
        except trio.WouldBlock:
            self._dropped(False)
            return False
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self._dropped(True)
            return False
        return True

    async def ask(self, make: Callable[[Reply[R]], T], timeout: float) -> R:
        """Send ``make(reply)`` without blocking and wait up to ``timeout`` seconds for the answer.

        Raises :class:`MailboxFull` or :class:`MailboxClosed` if the message could not be
        queued, :class:`AskTimeout` if no answer came in time, and the replier's exception if
        it called ``reply.fail(exc)``. On timeout or cancellation the message may still be
        handled later; its answer is then silently discarded.
        """
        reply: Reply[R] = Reply()
        try:
            self._send.send_nowait(make(reply))
        except trio.WouldBlock:
            self._dropped(False)
            raise MailboxFull(self.name) from None
        except (trio.ClosedResourceError, trio.BrokenResourceError):
            self._dropped(True)
            raise MailboxClosed(self.name) from None
        deadline = trio.current_time() + timeout
        deadlines = self._deadlines
        if deadlines.fits(deadline):  # expire_asks fails it at its deadline
            deadlines.add(deadline, timeout, cast(Reply[object], reply))
            try:
                return await reply._wait()
            finally:
                reply.fail(AskTimeout("the asker is gone"))  # (no-op once answered)
                deadlines.trim()
        try:
            with trio.fail_at(deadline):
                return await reply._wait()
        except trio.TooSlowError:
            raise AskTimeout(f"no reply from {self.name!r} within {timeout} s") from None
        finally:
            reply.fail(AskTimeout("the asker is gone"))  # (no-op once answered)


class Mailbox(Generic[T]):
    """A bounded queue of ``capacity`` messages, read by the one actor that owns it.

    It outlives its actor's crashes: a restarted actor keeps reading the same mailbox, so
    messages queued during the restart are not lost. :meth:`close` stops new messages;
    those already queued are still delivered, then iteration ends.
    """

    def __init__(self, capacity: int, name: str, metrics: Metrics | None = None) -> None:
        if capacity < 1:
            raise ValueError(f"mailbox {name!r}: capacity must be at least 1, got {capacity}")
        self.name = name
        send, self._receive = trio.open_memory_channel[T](capacity)
        self._address = Address(send, name, metrics if metrics is not None else Metrics())

    @property
    def address(self) -> Address[T]:
        return self._address

    async def receive(self) -> T:
        """The next message, waiting for one; :class:`MailboxClosed` once closed and drained."""
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            raise MailboxClosed(self.name) from None

    def queued(self) -> int:
        """How many messages wait to be read."""
        return self._receive.statistics().current_buffer_used

    def reader_waiting(self) -> bool:
        """Nothing is queued and the owner waits for the next message (none is on its way to
        it): a message that goes another way now overtakes nothing sent here."""
        stats = self._receive.statistics()
        return stats.current_buffer_used == 0 and stats.tasks_waiting_receive > 0

    def receive_nowait(self) -> T:
        """The next message if one is queued, else raise ``trio.WouldBlock``."""
        try:
            return self._receive.receive_nowait()
        except trio.EndOfChannel:
            raise MailboxClosed(self.name) from None

    async def expire_asks(self) -> None:
        """Fail each ``ask`` of this mailbox with :class:`AskTimeout` when its time is up.

        The owner runs it in its own nursery, beside the loop that reads the mailbox, so it
        stops with the owner; until it runs again (the owner restarting), asks made meanwhile
        keep cancel scopes of their own, and those queued before it stopped are failed late
        by the gap. Runs until cancelled; one at a time per mailbox.
        """
        name = self.name
        await self._address._deadlines.sweep(
            lambda timeout: AskTimeout(f"no reply from {name!r} within {timeout} s"),
            f"mailbox {name!r}")

    def close(self) -> None:
        """Refuse further messages; a sender blocked in :meth:`Address.tell` gets MailboxClosed."""
        self._address._send.close()

    def __aiter__(self) -> Mailbox[T]:
        return self

    async def __anext__(self) -> T:
        try:
            return await self._receive.receive()
        except trio.EndOfChannel:
            raise StopAsyncIteration from None
