"""Retry policies: delays per attempt, the seed's dict form, validation and coercion."""

from __future__ import annotations

import math
import random
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from aiki.retry import Retry

SETTINGS = settings(deadline=None)

max_attempts_st = st.integers(min_value=1, max_value=40)
delays = st.floats(min_value=0.0, max_value=1e6, allow_nan=False, allow_infinity=False)
seeds = st.integers(min_value=-(2**64), max_value=2**64)


def delays_of(policy: Retry, rng: random.Random, upto: int | None = None) -> list[float | None]:
    """delay_after(1), delay_after(2), ... up to ``upto`` (default: two past max_attempts)."""
    last = policy.max_attempts + 2 if upto is None else upto
    return [policy.delay_after(attempt, rng) for attempt in range(1, last + 1)]


# -- delays --------------------------------------------------------------------------------
def test_none_means_a_single_attempt() -> None:
    policy = Retry.none()
    assert policy.kind == "none"
    assert policy.max_attempts == 1
    assert delays_of(policy, random.Random(0)) == [None, None, None]


def test_fixed_examples() -> None:
    assert delays_of(Retry.fixed(3, 1.5), random.Random(0)) == [1.5, 1.5, None, None, None]
    # max_attempts counts the first attempt: one attempt means no retry at all.
    assert delays_of(Retry.fixed(1, 10), random.Random(0)) == [None, None, None]
    assert delays_of(Retry.fixed(2, 0), random.Random(0)) == [0.0, None, None, None]


def test_exponential_examples() -> None:
    rng = random.Random(0)
    assert delays_of(Retry.exponential(5, 1.0), rng) == [1.0, 2.0, 4.0, 8.0, None, None, None]
    assert delays_of(Retry.exponential(6, 1.0, max_delay=5.0), rng) == (
        [1.0, 2.0, 4.0, 5.0, 5.0, None, None, None]
    )
    assert delays_of(Retry.exponential(4, 0.25, max_delay=0.0), rng) == (
        [0.0, 0.0, 0.0, None, None, None]
    )


@SETTINGS
@given(max_attempts=max_attempts_st, delay=delays, seed=seeds)
def test_fixed_delay_for_every_attempt(max_attempts: int, delay: float, seed: int) -> None:
    policy = Retry.fixed(max_attempts, delay)
    got = delays_of(policy, random.Random(seed))
    assert got[: max_attempts - 1] == [delay] * (max_attempts - 1)
    assert got[max_attempts - 1 :] == [None, None, None]


@SETTINGS
@given(
    max_attempts=max_attempts_st,
    base=delays,
    cap=st.none() | delays,
    seed=seeds,
)
def test_exponential_doubles_up_to_the_cap(
    max_attempts: int, base: float, cap: float | None, seed: int
) -> None:
    policy = Retry.exponential(max_attempts, base, cap)
    rng = random.Random(seed)
    state = rng.getstate()
    got = delays_of(policy, rng)
    assert rng.getstate() == state, "exponential backoff must not draw from the random source"
    for attempt in range(1, max_attempts):
        uncapped = base * 2.0 ** (attempt - 1)
        expected = uncapped if cap is None else min(uncapped, cap)
        assert got[attempt - 1] == expected
        if attempt > 1:  # each delay doubles the previous one, until the cap
            previous = got[attempt - 2]
            assert previous is not None
            assert got[attempt - 1] == min(previous * 2, math.inf if cap is None else cap)
    assert got[max_attempts - 1 :] == [None, None, None]


@SETTINGS
@given(
    max_attempts=max_attempts_st,
    base=delays,
    cap=st.none() | delays,
    seed=seeds,
)
def test_jittered_is_within_the_exponential_ceiling_and_seeded(
    max_attempts: int, base: float, cap: float | None, seed: int
) -> None:
    jittered = Retry.jittered(max_attempts, base, cap)
    ceilings = delays_of(Retry.exponential(max_attempts, base, cap), random.Random(0))
    got = delays_of(jittered, random.Random(seed))
    for delay, ceiling in zip(got, ceilings, strict=True):
        if ceiling is None:
            assert delay is None
        else:
            assert delay is not None
            assert 0.0 <= delay <= ceiling
    # The same seed gives the same delays, attempt for attempt.
    assert delays_of(jittered, random.Random(seed)) == got


def test_jittered_draws_differ_between_seeds_and_attempts() -> None:
    policy = Retry.jittered(50, 10.0)
    a = delays_of(policy, random.Random(1), upto=49)
    b = delays_of(policy, random.Random(2), upto=49)
    assert a != b
    capped = Retry.jittered(50, 10.0, max_delay=10.0)
    draws = delays_of(capped, random.Random(3), upto=49)
    assert len(set(draws)) > 40, "full jitter should spread over [0, ceiling]"


def test_exponential_with_many_attempts_stays_capped() -> None:
    policy = Retry.exponential(10_000, 1.0, max_delay=60.0)
    assert policy.delay_after(2_000, random.Random(0)) == 60.0
    jittered = Retry.jittered(10_000, 1.0, max_delay=60.0)
    delay = jittered.delay_after(2_000, random.Random(0))
    assert delay is not None and 0.0 <= delay <= 60.0


# -- the seed's dict form ------------------------------------------------------------------
def test_from_dict_exponential_seed_form() -> None:
    policy = Retry.from_dict(
        {"type": "exponential", "maxAttempts": 3, "baseDelayMs": 1000, "maxDelayMs": 30000}
    )
    assert policy == Retry.exponential(3, 1.0, 30.0)
    assert delays_of(policy, random.Random(0)) == [1.0, 2.0, None, None, None]


def test_from_dict_forms() -> None:
    assert Retry.from_dict({"type": "fixed", "maxAttempts": 4, "delayMs": 250}) == (
        Retry.fixed(4, 0.25)
    )
    assert Retry.from_dict({"type": "jittered", "maxAttempts": 5, "baseDelayMs": 100}) == (
        Retry.jittered(5, 0.1)
    )
    assert Retry.from_dict({"type": "exponential", "maxAttempts": 2}) == (Retry.exponential(2, 0.0))
    assert Retry.from_dict({"type": "exponential", "baseDelayMs": 1.5}) == (
        Retry.exponential(1, 0.0015)
    )
    assert Retry.from_dict({}) == Retry.none()
    assert Retry.from_dict({"type": "none"}) == Retry.none()


@pytest.mark.parametrize(
    ("spec", "names"),
    [
        pytest.param(
            {"type": "fixed", "maxAttempts": 0, "delayMs": 1},
            ["max_attempts", "0"],
            id="zero-attempts",
        ),
        pytest.param({"type": "fixed", "maxAttempts": -1}, ["max_attempts"], id="neg-attempts"),
        pytest.param(
            {"type": "fixed", "maxAttempts": True}, ["max_attempts", "True"], id="bool-attempts"
        ),
        pytest.param({"type": "fixed", "maxAttempts": 2.0}, ["max_attempts"], id="float-attempts"),
        pytest.param({"type": "fixed", "maxAttempts": "3"}, ["max_attempts"], id="string-attempts"),
        pytest.param({"type": "fixed", "delayMs": -5}, ["delayMs"], id="neg-delay"),
        pytest.param({"type": "fixed", "delayMs": True}, ["delayMs"], id="bool-delay"),
        pytest.param({"type": "exponential", "baseDelayMs": -1}, ["baseDelayMs"], id="neg-base"),
        pytest.param(
            {"type": "exponential", "baseDelayMs": "1000"}, ["baseDelayMs"], id="string-base"
        ),
        pytest.param({"type": "jittered", "baseDelayMs": False}, ["baseDelayMs"], id="bool-base"),
        pytest.param({"type": "exponential", "maxDelayMs": -1}, ["maxDelayMs"], id="neg-max"),
        pytest.param({"type": "exponential", "maxDelayMs": True}, ["maxDelayMs"], id="bool-max"),
        pytest.param({"type": "linear", "maxAttempts": 3}, ["linear"], id="unknown-type"),
        pytest.param({"type": 3}, ["3"], id="type-not-string"),
        pytest.param({"type": "fixed", "maxAttempts": 3, "delay": 5}, ["delay"], id="unknown-key"),
        pytest.param({"type": "fixed", "max_attempts": 3}, ["max_attempts"], id="python-spelling"),
        pytest.param(
            {"type": "fixed", "delayMs": float("nan")},
            ["delayMs"],
            id="nan-delay",
        ),
    ],
)
def test_from_dict_rejects_bad_options(spec: dict[str, Any], names: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        Retry.from_dict(spec)
    for name in names:
        assert name in str(info.value), f"{name!r} not in {str(info.value)!r}"


# -- constructor validation ----------------------------------------------------------------
@pytest.mark.parametrize(
    ("make", "names"),
    [
        pytest.param(lambda: Retry.fixed(0, 1.0), ["max_attempts", "0"], id="fixed-zero"),
        pytest.param(lambda: Retry.exponential(-3, 1.0), ["max_attempts"], id="exp-negative"),
        pytest.param(lambda: Retry.jittered(True, 1.0), ["max_attempts", "True"], id="bool"),
        pytest.param(
            lambda: Retry.fixed(2.5, 1.0),  # type: ignore[arg-type]
            ["max_attempts"],
            id="float-attempts",
        ),
        pytest.param(lambda: Retry.fixed(3, -0.5), ["base_delay", "-0.5"], id="neg-delay"),
        pytest.param(lambda: Retry.exponential(3, -1.0), ["base_delay"], id="neg-base"),
        pytest.param(lambda: Retry.jittered(3, 1.0, -2.0), ["max_delay"], id="neg-max"),
        pytest.param(lambda: Retry("fixed", 3, -1.0), ["base_delay"], id="direct"),
        pytest.param(
            lambda: Retry.fixed(3, True),
            ["base_delay"],
            id="bool-delay",
        ),
        pytest.param(
            lambda: Retry.exponential(3, 1.0, float("nan")),
            ["max_delay"],
            id="nan-max",
        ),
        pytest.param(
            lambda: Retry.fixed(3, "1"),  # type: ignore[arg-type]
            ["base_delay"],
            id="string-delay",
        ),
    ],
)
def test_constructors_reject_bad_values(make: Any, names: list[str]) -> None:
    with pytest.raises(ValueError) as info:
        make()
    for name in names:
        assert name in str(info.value), f"{name!r} not in {str(info.value)!r}"


def test_policies_are_frozen_values() -> None:
    policy = Retry.exponential(3, 1, 30)
    assert policy == Retry("exponential", 3, 1.0, 30.0)
    assert isinstance(policy.base_delay, float) and isinstance(policy.max_delay, float)
    assert hash(policy) == hash(Retry.exponential(3, 1.0, 30.0))
    with pytest.raises(AttributeError):
        policy.max_attempts = 5  # type: ignore[misc]


# -- coercion ------------------------------------------------------------------------------
def test_coerce_accepts_none_retry_and_dict() -> None:
    assert Retry.coerce(None) == Retry.none()
    policy = Retry.jittered(4, 0.5, 10)
    assert Retry.coerce(policy) is policy
    assert Retry.coerce({"type": "fixed", "maxAttempts": 2, "delayMs": 100}) == (
        Retry.fixed(2, 0.1)
    )


def test_coerce_passes_dict_errors_through() -> None:
    with pytest.raises(ValueError, match="bogus"):
        Retry.coerce({"type": "fixed", "bogus": 1})


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        (3, "int"),
        ("exponential", "str"),
        (1.5, "float"),
        ([("type", "fixed")], "list"),
        (("fixed", 3), "tuple"),
        (True, "bool"),
        (object(), "object"),
    ],
)
def test_coerce_rejects_other_types(value: Any, type_name: str) -> None:
    with pytest.raises(TypeError, match="retry") as info:
        Retry.coerce(value)
    assert type_name in str(info.value)
