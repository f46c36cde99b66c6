"""serving_nursery: the body's exception as itself, the background cancelled either way."""

from __future__ import annotations

import pytest
import trio

from aiki.actors.scopes import serving_nursery


async def test_the_body_exception_propagates_unwrapped_and_the_background_stops() -> None:
    stopped = trio.Event()

    async def background() -> None:
        try:
            await trio.sleep_forever()
        finally:
            stopped.set()

    with pytest.raises(KeyError, match="body"):
        async with serving_nursery() as nursery:
            nursery.start_soon(background)
            await trio.sleep(0)
            raise KeyError("body")
    assert stopped.is_set()


async def test_a_body_that_ends_cancels_the_background() -> None:
    async with serving_nursery() as nursery:
        nursery.start_soon(trio.sleep_forever)
    # (reaching here at all is the test: the nursery did not wait for the background)


async def test_a_background_failure_still_propagates() -> None:
    async def broken() -> None:
        raise ValueError("background")

    with pytest.RaisesGroup(ValueError) if hasattr(pytest, "RaisesGroup") else \
            pytest.raises(BaseExceptionGroup):
        async with serving_nursery() as nursery:
            nursery.start_soon(broken)
            await trio.sleep_forever()
