"""The server's clock as a worker bounds it from the readings its replies carry."""

from __future__ import annotations

import pytest
import trio

from aiki.actors.server_time import DRIFT, ServerTime
from aiki.sources import TrioWallClock


async def test_bounds_hold_the_servers_clock_between_a_request_and_later(
    autojump_clock: trio.abc.Clock,
) -> None:
    local = TrioWallClock(anchor_wall=1000.0)  # this worker's clock: 500 s behind the server
    st = ServerTime(local)
    assert st.bounds() == (local.now(), local.now())  # no reading yet: its own clock
    sent = trio.current_time()
    await trio.sleep(0.2)  # the request's way there
    reading = 1500.0 + trio.current_time()  # the server's clock as it answers
    await trio.sleep(0.3)  # the reply's way back
    st.heard(reading, sent, trio.current_time())
    await trio.sleep(100)
    server_now = 1500.0 + trio.current_time()
    low, high = st.bounds()
    assert low <= server_now <= high
    assert server_now - low == pytest.approx(0.3 + 100 * DRIFT)
    assert high - server_now == pytest.approx(0.2 + 100.5 * DRIFT)
    st.heard(None, 0.0, 0.0)  # a server that does not say: the last reading stands
    assert st.bounds() == (low, high)
