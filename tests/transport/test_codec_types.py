"""The types users pass every day round-trip through the payload codec (issue 16): UUID,
Decimal, timezone-aware datetime, date, enums and paths, alone and inside attrs classes,
dataclasses and containers. JSON of the wrong type is refused, never coerced, and a typed
enqueue checks its payload against the workflow's annotation before anything is stored."""

from __future__ import annotations

import dataclasses
import datetime
import decimal
import enum
import pathlib
import uuid
from typing import Any

import attrs
import pytest
import trio
from hypothesis import given
from hypothesis import strategies as st

import aiki
from aiki import protocol
from aiki.errors import PayloadError


class Colour(enum.Enum):
    RED = "red"
    GREEN = "green"


class Priority(enum.IntEnum):
    LOW = 1
    HIGH = 2


@attrs.frozen
class Invoice:
    id: uuid.UUID
    total: decimal.Decimal
    issued: datetime.datetime
    due: datetime.date
    colour: Colour
    priority: Priority
    archive: pathlib.Path
    lines: tuple[decimal.Decimal, ...] = ()


@dataclasses.dataclass(frozen=True)
class Receipt:
    invoice: uuid.UUID
    paid_on: datetime.date


# Offsets in whole minutes, as every real timezone has (ISO 8601 has no finer offsets).
offsets = st.integers(-23 * 60 - 59, 23 * 60 + 59).map(
    lambda minutes: datetime.timezone(datetime.timedelta(minutes=minutes)))
zones = st.one_of(st.just(datetime.UTC), offsets)
aware = st.datetimes(timezones=zones)
finite_decimals = st.decimals(allow_nan=False)
paths = st.lists(st.text(st.characters(blacklist_characters="/\x00",
                                       blacklist_categories=("Cs",)), min_size=1),
                 max_size=4).map(lambda parts: pathlib.Path("/", *parts))

TYPES: list[tuple[Any, st.SearchStrategy[Any]]] = [
    (uuid.UUID, st.uuids()),
    (decimal.Decimal, finite_decimals),
    (datetime.datetime, aware),
    (datetime.date, st.dates()),
    (Colour, st.sampled_from(Colour)),
    (Priority, st.sampled_from(Priority)),
    (pathlib.Path, paths),
]


@pytest.mark.parametrize("annotation,values", TYPES, ids=lambda t: getattr(t, "__name__", ""))
@given(data=st.data())
def test_everyday_types_round_trip(annotation: Any, values: st.SearchStrategy[Any],
                                   data: st.DataObject) -> None:
    value = data.draw(values)
    text = protocol.encode_value(value, annotation)
    back = protocol.decode_value(text, annotation)
    assert back == value and type(back) is type(value)
    in_a_list = protocol.decode_value(protocol.encode_value([value], list[annotation]),
                                      list[annotation])
    assert in_a_list == [value]


@given(st.builds(Invoice, id=st.uuids(), total=finite_decimals, issued=aware, due=st.dates(),
                 colour=st.sampled_from(Colour), priority=st.sampled_from(Priority),
                 archive=paths, lines=st.lists(finite_decimals, max_size=3).map(tuple)))
def test_attrs_classes_of_everyday_types_round_trip(invoice: Invoice) -> None:
    assert protocol.decode_value(protocol.encode_value(invoice, Invoice), Invoice) == invoice


@given(st.builds(Receipt, invoice=st.uuids(), paid_on=st.dates()))
def test_dataclasses_of_everyday_types_round_trip(receipt: Receipt) -> None:
    assert protocol.decode_value(protocol.encode_value(receipt, Receipt), Receipt) == receipt


def test_the_instant_and_its_offset_survive() -> None:
    tokyo = datetime.timezone(datetime.timedelta(hours=9))
    when = datetime.datetime(2026, 12, 1, 9, 30, 15, 123456, tzinfo=tokyo)
    text = protocol.encode_value(when, datetime.datetime)
    assert text == '"2026-12-01T09:30:15.123456+09:00"'
    back = protocol.decode_value(text, datetime.datetime)
    assert back == when and back.utcoffset() == datetime.timedelta(hours=9)


def test_untyped_payloads_carry_everyday_types_as_strings() -> None:
    text = protocol.encode_value({"id": uuid.UUID(int=1), "total": decimal.Decimal("1.10")})
    assert text == '{"id":"00000000-0000-0000-0000-000000000001","total":"1.10"}'


@pytest.mark.parametrize("text,annotation,expected", [
    ("123", uuid.UUID, "expected UUID as a string, got int"),
    ('"not-a-uuid"', uuid.UUID, "UUID"),
    ("1.5", decimal.Decimal, "expected Decimal as a string, got float"),
    ('"one"', decimal.Decimal, "'one' is not a decimal number"),
    ('"2026-12-01T09:30:00"', datetime.datetime, "has no timezone"),
    ("1764581400", datetime.datetime, "expected datetime as a string, got int"),
    ('"2026-12-01T09:30:00+00:00"', datetime.date, "date"),
    ('"blue"', Colour, "'blue' is not a valid Colour"),
    ('"2"', Priority, "expected a Priority value, got str '2'"),
    ("true", Priority, "expected a Priority value, got bool"),
    ("5", pathlib.Path, "expected Path as a string, got int"),
])
def test_json_of_the_wrong_type_is_refused_not_coerced(text: str, annotation: Any,
                                                       expected: str) -> None:
    with pytest.raises(PayloadError, match="cannot decode payload") as info:
        protocol.decode_value(text, annotation)
    assert expected in str(info.value)


def test_a_naive_datetime_or_a_datetime_for_a_date_is_refused_at_encode() -> None:
    with pytest.raises(PayloadError, match="has no timezone: give it one"):
        protocol.encode_value(datetime.datetime(2026, 12, 1, 9, 30), datetime.datetime)
    with pytest.raises(PayloadError, match="expected a date, got a datetime"):
        protocol.encode_value(datetime.datetime(2026, 12, 1, tzinfo=datetime.UTC),
                              datetime.date)


@pytest.mark.parametrize("value,annotation,expected", [
    ("abc", int, "does not match its annotation int: expected int, got str 'abc'"),
    ([1, "x"], list[int], "does not match its annotation list[int]"),
    ({"a": "1"}, dict[str, int], "does not match its annotation dict[str, int]"),
    ("2026-12-01", datetime.date, "annotation date: expected date, got str"),
    (True, int, "annotation int: TypeError: expected int, got bool True"),
])
def test_a_typed_payload_must_match_its_annotation(value: Any, annotation: Any,
                                                   expected: str) -> None:
    with pytest.raises(PayloadError) as info:
        protocol.encode_value(value, annotation)
    assert expected in str(info.value)


@aiki.workflow(name="slow", version="1")
async def slow(run: aiki.WorkflowRun, seconds: int) -> int:
    return seconds


@aiki.workflow(name="bill", version="1")
async def bill(run: aiki.WorkflowRun, invoice: Invoice) -> Receipt:
    return Receipt(invoice.id, invoice.due)


async def test_a_typed_enqueue_refuses_a_mismatched_payload_and_stores_nothing(
    autojump_clock: trio.abc.Clock,
) -> None:
    async with aiki.embedded("memory") as client:
        with pytest.raises(PayloadError, match="payload of workflow 'slow' does not match its "
                                               "annotation int: .*got str 'abc'"):
            await slow.enqueue(client, "abc")  # type: ignore[arg-type]
        assert await client.list_runs() == []


async def test_everyday_types_cross_a_whole_run(autojump_clock: trio.abc.Clock) -> None:
    invoice = Invoice(uuid.UUID(int=7), decimal.Decimal("19.99"),
                      datetime.datetime(2026, 12, 1, 9, 0, tzinfo=datetime.UTC),
                      datetime.date(2026, 12, 31), Colour.GREEN, Priority.HIGH,
                      pathlib.Path("/srv/invoices/7.pdf"), (decimal.Decimal("0.10"),))
    async with aiki.embedded("memory") as client:
        async with aiki.worker(client, workflows=[bill]):
            handle = await bill.enqueue(client, invoice)
            assert await handle.wait_for_completion(timeout=30) == Receipt(
                uuid.UUID(int=7), datetime.date(2026, 12, 31))


@given(st.one_of(st.text(), st.integers(), st.booleans()))
def test_plain_values_of_their_own_type_encode_as_the_converter_would(value: Any) -> None:
    import json

    annotation = type(value)  # the shortcut for str, int and bool
    general = json.dumps(protocol.converter.unstructure(value, unstructure_as=annotation),
                         sort_keys=True, separators=(",", ":"), allow_nan=False)
    assert protocol.encode_value(value, annotation) == general
    assert protocol.decode_value(general, annotation) == value
