"""The records' fast copies (``evolve``) and rows (``row_of``) agree with attrs' own."""

from __future__ import annotations

from typing import Any

import attrs
import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiki.records import RunRecord, StepRecord, WaitRecord, evolve, row_of

text = st.text(max_size=8)
maybe_text = st.none() | text
number = st.floats(allow_nan=False)
maybe_number = st.none() | number

runs = st.builds(
    RunRecord, id=text, workflow=text, version=text, payload=text,
    state=st.sampled_from(["queued", "running", "waiting", "paused", "completed"]),
    idempotency_key=maybe_text, attempts=st.integers(0, 9), lease_epoch=st.integers(0, 9),
    lease_owner=maybe_text, lease_expires_at=maybe_number, result=maybe_text,
    error_type=maybe_text, error_message=maybe_text, created_at=number, updated_at=number,
    finished_at=maybe_number, cancel_requested_at=maybe_number, parent_id=maybe_text)
steps = st.builds(
    StepRecord, position=text, kind=st.sampled_from(["task", "sleep", "event"]), name=text,
    input_hash=text, input=text, idempotency_key=maybe_text,
    state=st.sampled_from(["running", "retrying", "completed", "failed"]),
    attempts=st.integers(1, 9), output=maybe_text, next_attempt_at=maybe_number)
waits = st.builds(WaitRecord, run_id=text, position=text,
                  kind=st.sampled_from(["sleep", "event", "retry"]), name=text,
                  due_at=maybe_number, since=number)


def changes_of(record: Any) -> st.SearchStrategy[dict[str, Any]]:
    names = [f.name for f in attrs.fields(type(record))]
    return st.dictionaries(st.sampled_from(names), maybe_text | st.integers(), max_size=4)


@given(st.one_of(runs, steps, waits), st.data())
def test_evolve_and_row_of_agree_with_attrs(record: Any, data: st.DataObject) -> None:
    changes = data.draw(changes_of(record))
    assert evolve(record, **changes) == attrs.evolve(record, **changes)
    assert row_of(record) == attrs.astuple(record)


def test_an_unknown_field_is_named() -> None:
    step = StepRecord("0", "task", "pay", "h", "{}", None, "running", 1)
    with pytest.raises(TypeError, match="StepRecord has no field 'stat'"):
        evolve(step, stat="completed")


@attrs.frozen
class Private:
    _secret: int
    shown: int = attrs.field(kw_only=True, default=0)


def test_a_class_init_cannot_take_by_position_falls_back_to_attrs() -> None:
    # (a private field's init argument has another name; a keyword-only field no position)
    assert evolve(Private(1, shown=2), shown=3) == Private(1, shown=3)
    assert row_of(Private(1, shown=2)) == (1, 2)
