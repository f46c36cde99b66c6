"""Link: a client's or worker's connection to the server, with request/reply correlation and
reconnection.

It owns the connection and a reader task that routes each reply to the request waiting for
it (by ``req``) and every push (``Assign``) to ``on_push``. The first connection must
succeed (``Link.open`` raises what went wrong). After that, a lost connection is replaced:
the Link reconnects with jittered exponential backoff and says hello again (a worker's hello
re-announces the leases it still holds), and ``on_welcome`` runs for every new connection.

A request whose connection is lost before its reply is sent again on the next connection
(``retry=True``, the default: every request is safe to repeat, see :mod:`aiki.store.ops`),
all within its one timeout. With ``retry=False`` it fails with :class:`ConnectionLost`.

A refusal that another attempt cannot fix ends the Link and is raised from ``Link.open``'s
block: the server refusing the token (:class:`AuthenticationFailed`) or the hello
(:class:`ProtocolError`, e.g. a protocol version it does not speak).

Nothing durable lives here: a crash of the Link loses only requests in flight, whose
callers see the error.
"""

from __future__ import annotations

import logging
import random
from collections.abc import AsyncIterator, Callable
from contextlib import AbstractAsyncContextManager, AsyncExitStack, asynccontextmanager
from typing import Any, TypeVar

import attrs
import trio

from aiki import errors
from aiki import protocol as p
from aiki.actors.deadlines import DeadlineQueue
from aiki.client.core import FATAL, Backoff, goodbye_error, refusal_error, welcome_of
from aiki.transport.base import Connection, Transport
from aiki.transport.memory import Answer, MemoryConnection

log = logging.getLogger("aiki.link")
T = TypeVar("T")

# Refusals of a hello that no reconnection can fix.
_FATAL = FATAL


async def open_when_reachable(
    stack: AsyncExitStack, opener: Callable[[], AbstractAsyncContextManager[T]], address: str,
    timeout: float, *, backoff: Backoff | None = None, rng: random.Random | None = None,
) -> T:
    """Enter ``opener()`` on ``stack``; while the server cannot be reached, try again with
    backoff for up to ``timeout`` seconds, so a worker or client may start before its server
    (docker-compose, Kubernetes). One log line says it waits.

    A refusal that no retry fixes (a wrong token, a worker id in use) is raised at once; after
    ``timeout`` the last failure is raised as :class:`ConnectionLost` saying how long it waited.
    """
    backoff = backoff or Backoff()
    rng = rng or random.Random(f"aiki-wait:{address}")
    deadline = trio.current_time() + timeout
    attempt = 0
    while True:
        try:
            value = await stack.enter_async_context(opener())
        except Exception as exc:
            cause = exc
            while isinstance(cause, BaseExceptionGroup) and len(cause.exceptions) == 1:
                cause = cause.exceptions[0]  # type: ignore[assignment]
            if isinstance(cause, _FATAL) or not isinstance(
                    cause, (errors.ConnectionLost, OSError, TimeoutError)):
                raise
            left = deadline - trio.current_time()
            if left <= 0:
                if attempt == 0:
                    raise
                raise errors.ConnectionLost(f"{cause} (waited {timeout:g} s for the server)"
                                            ) from exc
            if attempt == 0:
                log.warning("cannot reach the server at %s (%s); trying again for up to %g s",
                            address, cause, timeout)
            await trio.sleep(min(backoff.delay(attempt, rng), left))
            attempt += 1
            continue
        if attempt:
            log.info("connected to %s after %d attempt(s)", address, attempt + 1)
        return value


@attrs.define(eq=False)
class _Waiter:
    conn: Connection
    done: trio.Event = attrs.field(factory=trio.Event)
    value: Any = None
    error: BaseException | None = None

    def is_done(self) -> bool:
        return self.done.is_set()

    def expire(self, exc: BaseException) -> None:
        if not self.done.is_set():
            self.error = exc
            self.done.set()


class _TimedOut(Exception):
    """The sweep ended a request's wait at its deadline."""


@attrs.define(eq=False)
class Link:
    transport: Transport
    address: str
    hello: Callable[[int], p.Hello]
    on_push: Callable[[Any], None] = lambda msg: None
    request_timeout: float = 30.0
    reconnect: Backoff | None = attrs.field(factory=Backoff)
    rng: random.Random = attrs.field(factory=lambda: random.Random(0))
    on_welcome: Callable[[p.Welcome], None] = lambda welcome: None
    welcome: p.Welcome | None = None
    connections: int = 0
    _conn: Connection | None = None
    _up: trio.Event = attrs.field(factory=trio.Event)
    _final: BaseException | None = None
    _req: int = 0
    _waiting: dict[int, _Waiter] = attrs.field(factory=dict)
    # The deadlines of requests sent at once (see ``request``), swept by one task.
    _deadlines: DeadlineQueue[_Waiter] = attrs.field(factory=DeadlineQueue)

    @classmethod
    @asynccontextmanager
    async def open(
        cls, transport: Transport, address: str, hello: Callable[[int], p.Hello],
        on_push: Callable[[Any], None] = lambda msg: None, request_timeout: float = 30.0,
        *, reconnect: Backoff | None = Backoff(), rng: random.Random | None = None,
        on_welcome: Callable[[p.Welcome], None] = lambda welcome: None,
    ) -> AsyncIterator[Link]:
        """Connect and say hello (raising what went wrong), then keep the connection up
        until the block ends."""
        link = cls(transport, address, hello, on_push, request_timeout, reconnect,
                   rng or random.Random(0), on_welcome)
        failure: BaseException | None = None
        try:
            async with trio.open_nursery() as nursery:
                try:
                    nursery.start_soon(link._deadlines.sweep, _TimedOut, "link")
                    await nursery.start(link._maintain)
                    yield link
                except BaseException as exc:
                    failure = exc  # re-raised as itself, not wrapped in the nursery's group
                nursery.cancel_scope.cancel()
        except BaseExceptionGroup as group:
            # The connection was refused for good while the block ran: that is the error.
            fatal = [e for e in group.exceptions if isinstance(e, errors.AikiError)]
            if len(fatal) == 1:
                raise fatal[0] from None
            raise
        if failure is not None:
            raise failure

    @property
    def connected(self) -> bool:
        return self._conn is not None

    @property
    def ended(self) -> BaseException | None:
        """Why this Link gave up for good (a refusal, or a loss with ``reconnect=None``);
        None while it is connected or reconnecting."""
        return self._final

    @property
    def in_flight(self) -> int:
        """Requests sent and not yet answered."""
        return len(self._waiting)

    def next_req(self) -> int:
        self._req += 1
        return self._req

    async def request(self, make: Callable[[int], Any], timeout: float | None = None, *,
                      retry: bool = True) -> Any:
        """Send ``make(req)`` and return the reply; a ``Refused`` reply is raised as its error.

        Waits for a connection if there is none (while reconnecting). Raises TimeoutError
        after ``timeout`` seconds (``request_timeout`` by default) in all.

        The common case, connected, the message queued at once and the Link's own timeout,
        waits for its reply without a cancel scope: the Link's sweep ends the wait at its
        deadline (see :mod:`aiki.actors.deadlines`). Otherwise (no connection, a full send
        queue, a lost connection to send again on, another timeout) the request waits in a
        scope of its own, within the same deadline. Over a connection within this process
        (the memory transport), the server's session answers the request in this task
        instead of it being sent (:meth:`_answer`).
        """
        limit = self.request_timeout if timeout is None else timeout
        deadline = trio.current_time() + limit
        conn = self._conn
        # (The sweep takes the requests of the Link's own timeout: their deadlines come in
        # order. Others, the waits for a run's end among them, keep a scope of their own.)
        if conn is not None and limit == self.request_timeout and self._deadlines.fits(
                deadline):
            await trio.lowlevel.checkpoint_if_cancelled()  # a cancelled caller sends nothing
            req = self.next_req()
            waiter = self._waiting[req] = _Waiter(conn)
            answer = conn.direct() if isinstance(conn, MemoryConnection) else None
            try:
                if answer is not None:
                    await self._answer(answer, waiter, make(req), deadline, limit)
                    sent = True
                else:
                    sent = conn.try_send(make(req))
            except errors.ConnectionLost:
                self._drop(conn)
                self._waiting.pop(req, None)
                if not self._may_resend(retry):
                    raise
                sent = False
            except BaseException:
                self._waiting.pop(req, None)
                raise
            if not sent:
                self._waiting.pop(req, None)
            else:
                try:
                    if not waiter.is_done():
                        await self._reply_of(waiter, deadline, limit)
                finally:
                    self._waiting.pop(req, None)
                lost = isinstance(waiter.error, errors.ConnectionLost)
                if not (lost and self._may_resend(retry)):
                    return self._outcome(waiter, limit)
                log.info("request %d: connection lost before the reply; sending it again "
                         "once reconnected", req)
        try:
            with trio.fail_at(deadline):
                while True:
                    conn = await self._connection()
                    req = self.next_req()
                    waiter = self._waiting[req] = _Waiter(conn)
                    answer = conn.direct() if isinstance(conn, MemoryConnection) else None
                    try:
                        try:
                            if answer is not None:
                                await self._answer(answer, waiter, make(req), deadline, limit)
                            else:
                                await conn.send(make(req))
                        except errors.ConnectionLost as exc:
                            waiter.error = exc
                            self._drop(conn)
                        else:
                            if not waiter.is_done():
                                await waiter.done.wait()
                    finally:
                        self._waiting.pop(req, None)
                    if (isinstance(waiter.error, errors.ConnectionLost)
                            and self._may_resend(retry)):
                        log.info("request %d: connection lost before the reply; sending it "
                                 "again once reconnected", req)
                        continue
                    break
        except trio.TooSlowError:
            raise TimeoutError(f"no reply from the server within {limit} s") from None
        return self._outcome(waiter, limit)

    async def _reply_of(self, waiter: _Waiter, deadline: float, limit: float) -> None:
        """Wait for ``waiter``'s reply, or for its deadline (timed out by the sweep, unless
        a later deadline was queued while its request was being answered directly)."""
        if not self._deadlines.fits(deadline):
            with trio.move_on_at(deadline):
                await waiter.done.wait()
            waiter.expire(_TimedOut())
            return
        self._deadlines.add(deadline, limit, waiter)
        try:
            await waiter.done.wait()
        finally:
            waiter.expire(_TimedOut())  # (nothing once answered) off the queue
            self._deadlines.trim()

    async def _answer(self, answer: Answer, waiter: _Waiter, msg: Any, deadline: float,
                      limit: float) -> None:
        """Have the server's session answer ``msg`` in this task (a connection within this
        process; see :meth:`aiki.transport.memory.MemoryConnection.direct`): ``waiter`` is
        done with its reply, or, where the reply comes as a message (the end of a watched
        run), waits for it as for that of a request sent.

        What the server was sent, it finishes, as it would a message that left on a
        connection: neither this task's cancellation nor the request's deadline cuts the
        answer short (the server's own timeouts bound it; the connection closing ends it).
        A reply past the deadline is dropped with TimeoutError, as a late message is; a
        cancellation is seen once the answer is in.
        """
        reply = await answer(msg)
        await trio.lowlevel.checkpoint_if_cancelled()
        if trio.current_time() > deadline:
            raise TimeoutError(f"no reply from the server within {limit} s")
        if reply is not None:
            waiter.value = reply
            waiter.done.set()

    def _may_resend(self, retry: bool) -> bool:
        return retry and self._final is None and self.reconnect is not None

    @staticmethod
    def _outcome(waiter: _Waiter, limit: float) -> Any:
        if isinstance(waiter.error, _TimedOut):
            raise TimeoutError(f"no reply from the server within {limit} s") from None
        if waiter.error is not None:
            raise waiter.error
        if isinstance(waiter.value, p.Refused):
            raise refusal_error(waiter.value.error_type, waiter.value.message)
        return waiter.value

    def _drop(self, conn: Connection) -> None:
        """``conn`` is dead: requests wait for the next connection instead of using it."""
        if self._conn is conn:
            self._conn = None
            self._up = trio.Event()

    async def _connection(self) -> Connection:
        while True:
            if self._final is not None:
                raise self._final
            if self._conn is not None:
                return self._conn
            await self._up.wait()

    # -- the connection's life ------------------------------------------------------------
    async def _maintain(self, *, task_status: trio.TaskStatus[None] = trio.TASK_STATUS_IGNORED
                        ) -> None:
        """Connect, serve, reconnect: until cancelled or refused for good."""
        first = True
        attempt = 0
        while True:
            try:
                await self._serve_one_connection(task_status if first else None)
                attempt = 0
            except _FATAL as exc:
                self._end(exc)
                raise
            except (errors.ConnectionLost, OSError, TimeoutError) as exc:
                if first:
                    self._end(exc)
                    raise
                log.warning("cannot reconnect to %s: %s", self.address, exc)
            if self.welcome is not None:
                first = False
            if self.reconnect is None:
                self._end(errors.ConnectionLost(f"the connection to {self.address} is closed"))
                return
            delay = self.reconnect.delay(attempt, self.rng)
            attempt += 1
            log.info("reconnecting to %s in %.2f s", self.address, delay)
            await trio.sleep(delay)

    async def _serve_one_connection(self, task_status: trio.TaskStatus[None] | None) -> None:
        """One connection from connect to loss; returns when it is lost after its welcome."""
        conn = await self.transport.connect(self.address)
        try:
            lost: list[BaseException] = []
            try:
                async with trio.open_nursery() as nursery:
                    reader_done = trio.Event()
                    nursery.start_soon(self._read, conn, reader_done, lost)
                    welcome = await self._say_hello(conn, lost)
                    self.welcome = welcome
                    self.connections += 1
                    self._conn = conn
                    self._up.set()
                    self.on_welcome(welcome)
                    if task_status is not None:
                        task_status.started()
                    await reader_done.wait()
                    nursery.cancel_scope.cancel()
            except BaseExceptionGroup as group:
                if len(group.exceptions) == 1 and isinstance(group.exceptions[0], Exception):
                    raise group.exceptions[0] from None  # the hello's failure, as itself
                raise
            if lost and isinstance(lost[0], _FATAL):
                raise lost[0]
            log.warning("lost the connection to %s: %s", self.address,
                        lost[0] if lost else "closed")
        finally:
            self._drop(conn)
            for waiter in list(self._waiting.values()):
                if waiter.conn is conn and not waiter.done.is_set():
                    waiter.error = errors.ConnectionLost(f"lost the connection to {self.address}")
                    waiter.done.set()
            with trio.CancelScope(shield=True), trio.move_on_after(1):
                await conn.aclose()

    async def _say_hello(self, conn: Connection, lost: list[BaseException]) -> p.Welcome:
        req = self.next_req()
        waiter = self._waiting[req] = _Waiter(conn)
        try:
            await conn.send(self.hello(req))
            with trio.fail_after(self.request_timeout):
                await waiter.done.wait()
        except trio.TooSlowError:
            raise TimeoutError(f"no welcome from {self.address} within "
                               f"{self.request_timeout} s") from None
        finally:
            self._waiting.pop(req, None)
        if waiter.error is not None:
            raise waiter.error
        if lost and not isinstance(waiter.value, (p.Welcome, p.Refused)):
            raise lost[0]
        return welcome_of(waiter.value, self.address)

    def _end(self, exc: BaseException) -> None:
        """No more connections: fail everything waiting now and later with ``exc``."""
        self._final = exc
        self._up.set()
        for waiter in self._waiting.values():
            if not waiter.done.is_set():
                waiter.error = exc
                waiter.done.set()

    async def _read(self, conn: Connection, done: trio.Event,
                    lost: list[BaseException]) -> None:
        try:
            while True:
                try:
                    msg = await conn.receive()
                except errors.ProtocolError as exc:
                    log.warning("undecodable message from %s: %s", self.address, exc)
                    continue
                if isinstance(msg, p.Goodbye):
                    lost.append(goodbye_error(msg))
                    break
                req = getattr(msg, "req", None)
                waiter = self._waiting.get(req) if req is not None else None
                if waiter is not None:
                    waiter.value = msg
                    waiter.done.set()
                elif isinstance(msg, p.Refused):
                    log.warning("server refused a message: %s: %s", msg.error_type, msg.message)
                else:
                    self.on_push(msg)
        except errors.ConnectionLost as exc:
            lost.append(exc)
        finally:
            self._drop(conn)
            done.set()
            # Replies will not come on this connection any more.
            for waiter in list(self._waiting.values()):
                if waiter.conn is conn and not waiter.done.is_set():
                    waiter.error = lost[0] if lost else errors.ConnectionLost(
                        f"lost the connection to {self.address}")
                    waiter.done.set()



__all__ = ["Backoff", "Link", "refusal_error"]
