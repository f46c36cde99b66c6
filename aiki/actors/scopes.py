"""Structured-concurrency helpers shared by the runtime."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import trio


@asynccontextmanager
async def serving_nursery() -> AsyncIterator[trio.Nursery]:
    """A nursery of background tasks that serve the block's body.

    When the body ends, however it ends, the background tasks are cancelled; the body's own
    exception (a Cancelled included) then propagates as itself, not wrapped in an
    ExceptionGroup, so callers can catch it by type. A background task's failure propagates
    as Trio reports it.
    """
    failure: BaseException | None = None
    async with trio.open_nursery() as nursery:
        try:
            yield nursery
        except BaseException as exc:
            failure = exc
        nursery.cancel_scope.cancel()
    if failure is not None:
        raise failure
