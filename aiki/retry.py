"""Retry policies for tasks: fixed, exponential and jittered (full jitter) backoff.

``max_attempts`` counts the first attempt: ``Retry.fixed(3, 1.0)`` runs a task at most three
times, waiting one second between attempts. Delays are in seconds.
"""

from __future__ import annotations

import math
import random
from collections.abc import Mapping
from typing import Any, Literal

import attrs

Kind = Literal["none", "fixed", "exponential", "jittered"]


def _positive_int(_: object, attribute: attrs.Attribute[int], value: int) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < 1:
        raise ValueError(f"Retry.{attribute.name} must be an int >= 1, got {value!r}")


def _valid_delay(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool)
            and math.isfinite(value) and value >= 0)


def _non_negative(_: object, attribute: attrs.Attribute[Any], value: float | None) -> None:
    if value is not None and not _valid_delay(value):
        raise ValueError(f"Retry.{attribute.name} must be a number >= 0, got {value!r}")


def _kind(_: object, attribute: attrs.Attribute[Any], value: str) -> None:
    if value not in ("none", "fixed", "exponential", "jittered"):
        raise ValueError(f"unknown retry kind {value!r}")


@attrs.frozen
class Retry:
    """How often and how far apart a failing task is attempted again."""

    kind: Kind = attrs.field(validator=_kind)
    max_attempts: int = attrs.field(validator=_positive_int)
    base_delay: float = attrs.field(default=0.0, validator=_non_negative)
    max_delay: float | None = attrs.field(default=None, validator=_non_negative)

    @classmethod
    def none(cls) -> Retry:
        """One attempt, no retries (the default of a task)."""
        return cls("none", 1)

    @classmethod
    def fixed(cls, max_attempts: int, delay: float) -> Retry:
        """The same ``delay`` between attempts."""
        return cls("fixed", max_attempts, _seconds("delay (base_delay)", delay))

    @classmethod
    def exponential(
        cls, max_attempts: int, base_delay: float, max_delay: float | None = None
    ) -> Retry:
        """``base_delay * 2**(n-1)`` after the n-th failed attempt, capped at ``max_delay``."""
        return cls("exponential", max_attempts, _seconds("base_delay", base_delay),
                   _opt_seconds(max_delay))

    @classmethod
    def jittered(
        cls, max_attempts: int, base_delay: float, max_delay: float | None = None
    ) -> Retry:
        """Full jitter: uniform in ``[0, exponential delay]``, drawn from a seeded source."""
        return cls("jittered", max_attempts, _seconds("base_delay", base_delay),
                   _opt_seconds(max_delay))

    @classmethod
    def from_dict(cls, spec: Mapping[str, Any]) -> Retry:
        """The seed's form: ``{"type": "exponential", "maxAttempts": 3, "baseDelayMs": 1000,
        "maxDelayMs": 30000}`` (``delayMs`` for fixed)."""
        known = {"type", "maxAttempts", "baseDelayMs", "maxDelayMs", "delayMs"}
        unknown = set(spec) - known
        if unknown:
            raise ValueError(f"unknown retry option(s) {sorted(unknown)}; known: {sorted(known)}")
        kind = spec.get("type")
        attempts = spec.get("maxAttempts", 1)
        if kind == "fixed":
            return cls.fixed(attempts, _ms(spec, "delayMs", spec.get("baseDelayMs", 0)))
        if kind in ("exponential", "jittered"):
            base = _ms(spec, "baseDelayMs", 0)
            top = spec.get("maxDelayMs")
            make = cls.exponential if kind == "exponential" else cls.jittered
            return make(attempts, base, None if top is None else _ms(spec, "maxDelayMs", 0))
        if kind in ("none", None):
            return cls("none", attempts)
        raise ValueError(
            f"unknown retry type {kind!r}; expected 'fixed', 'exponential' or 'jittered'"
        )

    @classmethod
    def coerce(cls, value: Retry | Mapping[str, Any] | None) -> Retry:
        """Accept a Retry, the seed's dict form, or None (no retries)."""
        if value is None:
            return cls.none()
        if isinstance(value, Retry):
            return value
        if isinstance(value, Mapping):
            return cls.from_dict(value)
        raise TypeError(f"retry must be an aiki.Retry or a dict, got {type(value).__name__}")

    def delay_after(self, attempt: int, rng: random.Random) -> float | None:
        """Seconds to wait after failed attempt number ``attempt`` (1-based), or None when
        no attempt is left."""
        if attempt >= self.max_attempts:
            return None
        if self.kind in ("none", "fixed"):
            return self.base_delay
        # The exponent is capped so a policy with thousands of attempts cannot overflow.
        ceiling = self.base_delay * (2.0 ** min(attempt - 1, 1000))
        if self.max_delay is not None:
            ceiling = min(ceiling, self.max_delay)
        if self.kind == "exponential":
            return ceiling
        return rng.uniform(0.0, ceiling)


def _seconds(name: str, value: Any) -> float:
    if not _valid_delay(value):
        raise ValueError(f"Retry {name} must be a number of seconds >= 0, got {value!r}")
    return float(value)


def _opt_seconds(value: Any) -> float | None:
    return None if value is None else _seconds("max_delay", value)


def _ms(spec: Mapping[str, Any], key: str, default: Any) -> float:
    value = spec.get(key, default)
    if not _valid_delay(value):
        raise ValueError(f"retry option {key!r} must be a number of milliseconds >= 0")
    return float(value) / 1000.0
