"""Record ids are time-ordered UUIDv7s; ``run.uuid4()`` stays a random UUID4."""

from __future__ import annotations

import uuid

import attrs
from hypothesis import given
from hypothesis import strategies as st

from aiki.sources import Sources


@attrs.define
class FixedClock:
    t: float

    def now(self) -> float:
        return self.t


@given(st.lists(st.floats(min_value=1e9, max_value=4e9), min_size=2, max_size=50),
       st.integers(min_value=0, max_value=2**32))
def test_new_ids_are_uuid7_ordered_by_millisecond_and_unique(times: list[float], seed: int) -> None:
    clock = FixedClock(0.0)
    sources = Sources.seeded(seed, clock)
    made = []
    for t in times:
        clock.t = t
        made.append((int(t * 1000), sources.new_id()))
    for _, text in made:
        parsed = uuid.UUID(text)
        assert (parsed.version, parsed.variant) == (7, uuid.RFC_4122)
    assert len({text for _, text in made}) == len(made)
    for (ms_a, a), (ms_b, b) in zip(made, made[1:], strict=False):
        if ms_a < ms_b:
            assert a < b  # the text sorts as the time does
        assert uuid.UUID(a).int >> 80 == ms_a


def test_seeded_ids_repeat_and_uuid4_and_short_ids_are_random_shaped() -> None:
    clock = FixedClock(1_700_000_000.0)
    a, b = Sources.seeded(3, clock), Sources.seeded(3, clock)
    assert [a.new_id() for _ in range(3)] == [b.new_id() for _ in range(3)]
    assert uuid.UUID(a.uuid4()).version == 4
    short = a.short_id()
    assert len(short) == 8 and int(short, 16) >= 0
