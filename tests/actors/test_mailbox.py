"""Mailbox, Address and Reply: delivery, back-pressure, drops, ask with reply/failure/timeout."""

from __future__ import annotations

import pytest
import trio
import trio.testing

from aiki.actors.mailbox import (
    Address,
    AskTimeout,
    Mailbox,
    MailboxClosed,
    MailboxFull,
    Reply,
)
from aiki.errors import AikiError
from aiki.metrics import MAILBOX_DROPPED, Metrics


async def test_tell_delivers_in_order_and_iteration_ends_after_close() -> None:
    box = Mailbox[int](4, "box")
    for n in range(3):
        await box.address.tell(n)
    box.close()
    assert [msg async for msg in box] == [0, 1, 2]  # queued messages survive close
    with pytest.raises(MailboxClosed, match="'box'"):
        await box.receive()


async def test_address_is_shared() -> None:
    box = Mailbox[int](1, "box")
    assert box.address is box.address
    assert isinstance(box.address, Address)


def test_capacity_must_be_positive() -> None:
    with pytest.raises(ValueError, match="capacity"):
        Mailbox[int](0, "box")


async def test_tell_nowait_returns_false_when_full_and_counts_drops() -> None:
    metrics = Metrics()
    box = Mailbox[str](2, "box", metrics)
    a, b = box.address, box.address
    assert a.tell_nowait("x") and b.tell_nowait("y")
    assert not a.tell_nowait("z")
    assert not b.tell_nowait("w")
    assert metrics.series(MAILBOX_DROPPED) == {("box", "full"): 2}
    assert box.receive_nowait() == "x"
    assert a.tell_nowait("v")
    assert [box.receive_nowait(), box.receive_nowait()] == ["y", "v"]
    with pytest.raises(trio.WouldBlock):
        box.receive_nowait()


async def test_closed_mailbox_refuses_messages() -> None:
    metrics = Metrics()
    box = Mailbox[int](2, "box", metrics)
    box.close()
    assert not box.address.tell_nowait(1)
    assert metrics.value(MAILBOX_DROPPED, ("box", "closed")) == 1
    with pytest.raises(MailboxClosed):
        await box.address.tell(1)
    with pytest.raises(MailboxClosed):
        await box.address.ask(lambda r: 1, timeout=1)
    assert metrics.series(MAILBOX_DROPPED) == {("box", "closed"): 2}
    with pytest.raises(MailboxClosed):
        box.receive_nowait()


async def test_tell_waits_for_room(autojump_clock: trio.testing.MockClock) -> None:
    box = Mailbox[int](1, "box")
    sent_at: list[float] = []

    async def sender() -> None:
        await box.address.tell(1)
        await box.address.tell(2)  # blocks until the reader makes room
        sent_at.append(trio.current_time())

    async with trio.open_nursery() as nursery:
        nursery.start_soon(sender)
        await trio.sleep(3)
        assert sent_at == []
        assert await box.receive() == 1
        assert await box.receive() == 2
    assert sent_at == [3]


async def test_close_wakes_blocked_teller() -> None:
    box = Mailbox[int](1, "box")
    box.address.tell_nowait(0)

    async def blocked(task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED) -> None:
        task_status.started()
        with pytest.raises(MailboxClosed):
            await box.address.tell(1)

    async with trio.open_nursery() as nursery:
        await nursery.start(blocked)
        await trio.testing.wait_all_tasks_blocked()
        box.close()


async def _replier(box: Mailbox[tuple[int, Reply[int]]]) -> None:
    async for n, reply in box:
        if n < 0:
            reply.fail(ValueError(f"negative: {n}"))
        elif n > 0:
            reply.send(n * 2)
        # n == 0: never answer


async def test_ask_returns_the_reply() -> None:
    box = Mailbox[tuple[int, Reply[int]]](4, "doubler")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_replier, box)
        assert await box.address.ask(lambda r: (21, r), timeout=1) == 42
        box.close()


async def test_ask_raises_the_repliers_failure() -> None:
    box = Mailbox[tuple[int, Reply[int]]](4, "doubler")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_replier, box)
        with pytest.raises(ValueError, match="negative: -1"):
            await box.address.ask(lambda r: (-1, r), timeout=1)
        box.close()


async def test_ask_times_out_in_virtual_time(autojump_clock: trio.testing.MockClock) -> None:
    box = Mailbox[tuple[int, Reply[int]]](4, "doubler")
    async with trio.open_nursery() as nursery:
        nursery.start_soon(_replier, box)
        with pytest.raises(AskTimeout, match="'doubler' within 2.5 s"):
            await box.address.ask(lambda r: (0, r), timeout=2.5)
        assert trio.current_time() == pytest.approx(2.5)
        box.close()


async def test_ask_a_full_mailbox_raises_at_once() -> None:
    box = Mailbox[tuple[int, Reply[int]]](1, "doubler")
    assert box.address.tell_nowait((1, Reply()))
    with pytest.raises(MailboxFull, match="'doubler' is full") as info:
        await box.address.ask(lambda r: (2, r), timeout=1)
    assert info.value.name == "doubler"
    assert box.address.metrics.series(MAILBOX_DROPPED) == {("doubler", "full"): 1}


async def test_late_reply_to_a_gone_asker_is_harmless(
    autojump_clock: trio.testing.MockClock,
) -> None:
    box = Mailbox[tuple[int, Reply[int]]](4, "slow")
    with pytest.raises(AskTimeout):
        await box.address.ask(lambda r: (1, r), timeout=1)
    _, reply = box.receive_nowait()
    reply.send(2)  # nobody waits any more: neither blocks nor raises
    reply.fail(RuntimeError("ignored"))


@pytest.mark.parametrize("swept", [False, True])
async def test_a_reply_whose_asker_is_gone_says_so(
    swept: bool, autojump_clock: trio.testing.MockClock,
) -> None:
    # The replier learns that nobody will read its answer (the StoreWriter then has the
    # server look again at what the asker would have told others), whether the ask's
    # timeout is kept by the mailbox's sweep or by a scope of its own.
    box = Mailbox[tuple[int, Reply[int]]](4, "slow")
    async with trio.open_nursery() as nursery:
        if swept:
            nursery.start_soon(box.expire_asks)
            await trio.testing.wait_all_tasks_blocked()
        with trio.move_on_after(1):  # the asker cancelled
            await box.address.ask(lambda r: (1, r), timeout=60)
        with pytest.raises(AskTimeout):  # the asker timed out
            await box.address.ask(lambda r: (2, r), timeout=1)
        for _ in range(2):
            _, reply = box.receive_nowait()
            assert reply.is_done()
        asked = Reply[int]()
        assert not asked.is_done()
        nursery.cancel_scope.cancel()


async def test_reply_is_one_shot() -> None:
    first: Reply[int] = Reply()
    first.send(1)
    first.send(2)
    first.fail(ValueError("ignored"))
    assert await first._wait() == 1

    second: Reply[int] = Reply()
    second.fail(KeyError("k"))
    second.send(3)
    with pytest.raises(KeyError):
        await second._wait()


def test_errors_belong_to_the_hierarchy() -> None:
    for error in (MailboxFull, MailboxClosed, AskTimeout):
        assert issubclass(error, AikiError)


# -- one task expires the asks (Mailbox.expire_asks) -------------------------------------------
async def test_expired_asks_fail_at_their_deadline_and_answered_ones_leave_the_queue(
    autojump_clock: trio.testing.MockClock,
) -> None:
    box = Mailbox[tuple[int, Reply[int]]](64, "doubler")
    queue = box.address._deadlines.queue
    timed_out: list[float] = []
    async with trio.open_nursery() as nursery:
        nursery.start_soon(box.expire_asks)
        nursery.start_soon(_replier, box)
        await trio.sleep(0)  # the sweeper is on

        async def ask(n: int, timeout: float) -> None:
            try:
                assert await box.address.ask(lambda r: (n, r), timeout=timeout) == 2 * n
            except AskTimeout as exc:
                assert f"'doubler' within {timeout} s" in str(exc)
                timed_out.append(trio.current_time())

        async with trio.open_nursery() as asks:
            for i in range(1, 30):
                asks.start_soon(ask, i, 5.0)
            asks.start_soon(ask, 0, 2.5)  # never answered; earlier than the others' 5 s
            asks.start_soon(ask, 0, 7.0)  # never answered
        assert timed_out == [pytest.approx(2.5), pytest.approx(7.0)]
        assert not queue  # nothing left behind
        # A cancelled asker leaves nothing behind either.
        with trio.move_on_after(1):
            await box.address.ask(lambda r: (0, r), timeout=10.0)
        assert not queue
        with pytest.raises(RuntimeError, match="already running"):
            await box.expire_asks()
        box.close()
        nursery.cancel_scope.cancel()
    # Without the sweeper an ask keeps a deadline of its own.
    other = Mailbox[tuple[int, Reply[int]]](4, "unswept")
    with pytest.raises(AskTimeout):
        await other.address.ask(lambda r: (0, r), timeout=1.0)
    assert not other.address._deadlines.queue


async def test_the_queue_holds_the_asks_in_flight_not_every_ask_of_the_timeout(
    autojump_clock: trio.testing.MockClock,
) -> None:
    box = Mailbox[tuple[int, Reply[int]]](64, "doubler")
    queue = box.address._deadlines.queue
    longest = 0
    async with trio.open_nursery() as nursery:
        nursery.start_soon(box.expire_asks)
        nursery.start_soon(_replier, box)
        await trio.sleep(0)
        for i in range(1, 1000):  # one after another, well inside the 30 s timeout
            assert await box.address.ask(lambda r, i=i: (i, r), timeout=30.0) == 2 * i
            longest = max(longest, len(queue))
            await trio.sleep(0.001)
        box.close()
        nursery.cancel_scope.cancel()
    assert longest <= 1 and not queue


@pytest.mark.parametrize("cancelled_first", [True, False], ids=["cancelled-then-answered",
                                                                 "answered-then-cancelled"])
async def test_an_answer_its_asker_never_read_is_reported_lost(cancelled_first: bool) -> None:
    """An asker cancelled in the same scheduling round as its answer, before it ran again:
    ``is_done`` said nothing when the answer was sent, and the asker raises Cancelled
    without reading it. The replier's ``if_lost`` hears of it (seed 294: a child run
    committed, and the poke its session would have sent after the write was lost). An
    asker answered before its cancel reads the answer: nothing is lost."""
    box = Mailbox[Reply[int]](4, "box")
    got: list[int] = []
    lost: list[bool] = []
    scope = trio.CancelScope()

    async def asker() -> None:
        with scope:
            got.append(await box.address.ask(lambda r: r, timeout=10))

    async with trio.open_nursery() as nursery:
        nursery.start_soon(asker)
        reply = await box.receive()
        assert not reply.is_done()
        if cancelled_first:
            scope.cancel()
        reply.send(7, lambda: lost.append(True))
        if not cancelled_first:
            scope.cancel()
    assert (got, lost) == (([], [True]) if cancelled_first else ([7], []))
