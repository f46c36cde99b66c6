"""The wire codec (every registered message) and the user-payload codec of aiki.protocol."""

from __future__ import annotations

import dataclasses
import json
import types
import typing
from typing import Any, Literal, Union

import attrs
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from aiki import protocol
from aiki.errors import PayloadError, ProtocolError
from aiki.records import (
    HistoryEvent,
    Lease,
    RunRecord,
    ScheduleFiring,
    ScheduleRecord,
    StepRecord,
    WaitFor,
    WaitRecord,
)

SETTINGS = settings(deadline=None, suppress_health_check=[HealthCheck.too_slow])

finite_floats = st.floats(allow_nan=False, allow_infinity=False)

# The records that messages carry; each gets a registered strategy so that st.from_type
# (used for tuple[Lease, ...], RunRecord fields of messages, ...) only draws finite floats.
RECORD_TYPES: tuple[type[Any], ...] = (
    RunRecord,
    StepRecord,
    HistoryEvent,
    Lease,
    WaitFor,
    WaitRecord,
    protocol.WorkflowRef,
    protocol.WorkerInfo,
    protocol.StrandedVersion,
    ScheduleRecord,
    ScheduleFiring,
)
_LEAF_TYPES: frozenset[Any] = frozenset({int, str, bool, float, type(None)})


def _is_union(tp: Any) -> bool:
    return typing.get_origin(tp) in (Union, types.UnionType)


def field_strategy(tp: Any) -> st.SearchStrategy[Any]:
    """A strategy for one field type: finite floats, otherwise st.from_type."""
    if tp is float:
        return finite_floats
    if _is_union(tp):
        return st.one_of(*[field_strategy(arg) for arg in typing.get_args(tp)])
    args = typing.get_args(tp)
    if typing.get_origin(tp) is tuple and len(args) == 2 and args[1] is Ellipsis:
        return st.lists(field_strategy(args[0]), max_size=5).map(tuple)
    return st.from_type(tp)


def attrs_strategy(cls: type[Any]) -> st.SearchStrategy[Any]:
    """st.builds over every field of an attrs class (defaulted fields are drawn too)."""
    attrs.resolve_types(cls)
    return st.builds(cls, **{f.name: field_strategy(f.type) for f in attrs.fields(cls)})


for _record in RECORD_TYPES:
    st.register_type_strategy(_record, attrs_strategy(_record))

MESSAGE_STRATEGIES: dict[str, st.SearchStrategy[Any]] = {
    tag: attrs_strategy(cls) for tag, cls in protocol.message_types().items()
}


def unsupported_types(tp: Any, where: str) -> list[str]:
    """Every type reachable from ``tp`` that ``field_strategy`` has no deliberate strategy for
    (a new record type would be drawn by hypothesis's attrs inference, with NaN floats)."""
    if tp in _LEAF_TYPES:
        return []
    origin = typing.get_origin(tp)
    if origin is Literal:
        return []
    if _is_union(tp):
        return [bad for arg in typing.get_args(tp) for bad in unsupported_types(arg, where)]
    if origin is tuple:
        args = typing.get_args(tp)
        if len(args) == 2 and args[1] is Ellipsis:
            return unsupported_types(args[0], where)
        return [f"{where}: {tp!r}"]
    if origin is dict and typing.get_args(tp) == (str, str):  # (W3C trace context headers)
        return []
    if tp in RECORD_TYPES:
        attrs.resolve_types(tp)
        return [
            bad
            for f in attrs.fields(tp)
            for bad in unsupported_types(f.type, f"{where} -> {tp.__name__}.{f.name}")
        ]
    return [f"{where}: {tp!r}"]


# -- coverage ------------------------------------------------------------------------------
def test_every_registered_message_type_has_a_strategy() -> None:
    tags = set(protocol.message_types())
    assert tags, "no message types registered"
    assert set(MESSAGE_STRATEGIES) == tags
    missing = [
        bad
        for tag, cls in protocol.message_types().items()
        for f in attrs.fields(attrs.resolve_types(cls))
        for bad in unsupported_types(f.type, f"{tag}.{f.name}")
    ]
    assert not missing, (
        "message fields whose types this test has no strategy for (add one to "
        f"RECORD_TYPES / field_strategy): {missing}"
    )


def test_coverage_check_flags_types_without_a_strategy() -> None:
    @attrs.frozen
    class NewRecord:
        x: float

    assert unsupported_types(tuple[Lease, ...], "f") == []
    assert unsupported_types(RunRecord | None, "f") == []
    assert unsupported_types(Literal["a", "b"], "f") == []
    assert unsupported_types(NewRecord, "f") == [f"f: {NewRecord!r}"]
    assert unsupported_types(tuple[NewRecord, ...], "f") == [f"f: {NewRecord!r}"]
    assert unsupported_types(set[int], "f") != []
    assert unsupported_types(dict[str, int], "f") != []
    assert unsupported_types(dict[str, str] | None, "f") == []


def test_message_types_is_a_copy_and_tags_match() -> None:
    types_ = protocol.message_types()
    for tag, cls in types_.items():
        assert cls.TAG == tag
        assert attrs.has(cls)
    types_.clear()
    assert protocol.message_types(), "message_types() must return a copy"


# -- round trips ---------------------------------------------------------------------------
@pytest.mark.parametrize("tag", sorted(protocol.message_types()))
@SETTINGS
@given(data=st.data())
def test_round_trip_every_message_type(tag: str, data: st.DataObject) -> None:
    msg = data.draw(MESSAGE_STRATEGIES[tag], label="message")
    assert type(msg) is protocol.message_types()[tag]

    text = protocol.encode(msg)
    wire = json.loads(text)
    assert isinstance(wire, dict)
    assert wire["type"] == tag
    assert set(wire) == {"type"} | {f.name for f in attrs.fields(type(msg))}

    decoded = protocol.decode(text)
    assert type(decoded) is type(msg)
    assert decoded == msg
    assert protocol.decode(text.encode()) == msg
    assert protocol.encode(decoded) == text
    assert protocol.from_wire(protocol.to_wire(msg)) == msg


@SETTINGS
@given(msg=st.one_of(*MESSAGE_STRATEGIES.values()))
def test_round_trip_any_message(msg: Any) -> None:
    assert protocol.decode(protocol.encode(msg)) == msg


def test_round_trip_defaults_and_unicode() -> None:
    hello = protocol.Hello(req=1, role="worker", node_id="nœud-\u2603-\U0001f600")
    text = protocol.encode(hello)
    assert protocol.decode(text) == hello
    assert json.loads(text)["protocol"] == protocol.PROTOCOL_VERSION
    # Optional fields may be left out on the wire; they take their defaults.
    assert protocol.decode('{"type":"hello","req":1,"role":"client","node_id":"n"}') == (
        protocol.Hello(req=1, role="client", node_id="n")
    )


# -- malformed input -----------------------------------------------------------------------
_LEASE = '{"run_id":"r","epoch":1,"worker_id":"w"}'
_STEP = (
    '{"position":"0","kind":"task","name":"t","input_hash":"h","input":"[]",'
    '"idempotency_key":null,"state":"running","attempts":1}'
)


@pytest.mark.parametrize(
    ("text", "expected"),
    [
        pytest.param("not json", ["not valid JSON"], id="not-json"),
        pytest.param(b"\xff\xfe", ["not valid JSON"], id="not-utf8"),
        pytest.param("", ["not valid JSON"], id="empty"),
        pytest.param("[1, 2]", ["JSON object", "list"], id="array"),
        pytest.param('"ok"', ["JSON object", "str"], id="string"),
        pytest.param("null", ["JSON object", "NoneType"], id="null"),
        pytest.param('{"req": 1}', ["'type'"], id="missing-type"),
        pytest.param('{"type": 5, "req": 1}', ["'type'"], id="type-not-string"),
        pytest.param('{"type": "no_such_msg", "req": 1}', ["unknown", "no_such_msg"], id="unknown"),
        pytest.param('{"type": "ok", "req": "x"}', ["'ok'", "req"], id="wrong-field-type"),
        pytest.param(
            '{"type": "welcome", "req": 1, "server_id": "s", "lease_ttl": "soon",'
            ' "heartbeat_interval": 1}',
            ["'welcome'", "lease_ttl"],
            id="wrong-float-type",
        ),
        pytest.param('{"type": "ok"}', ["'ok'", "req", "missing"], id="missing-field"),
        pytest.param(
            '{"type": "refused", "req": 1, "error_type": "X"}',
            ["'refused'", "message", "missing"],
            id="missing-field-of-several",
        ),
        pytest.param(
            '{"type": "ok", "req": 1, "surplus_field": 2}',
            ["'ok'", "surplus_field"],
            id="extra-field",
        ),
        pytest.param(
            '{"type": "hello", "req": 1, "role": "admin", "node_id": "n"}',
            ["'hello'", "role", "admin"],
            id="literal-violation",
        ),
        pytest.param(
            '{"type": "start_step", "req": 1, "lease": {"run_id": "r", "epoch": "e",'
            f' "worker_id": "w"}}, "step": {_STEP}}}',
            ["'start_step'", "lease.epoch"],
            id="nested-wrong-field-type",
        ),
        pytest.param(
            f'{{"type": "save_step", "req": 1, "lease": {_LEASE}}}',
            ["'save_step'", "step", "missing"],
            id="missing-nested-record",
        ),
        pytest.param(
            '{"type": "run_ended", "req": 1, "run": {"id": "r"}}',
            ["'run_ended'", "run.workflow", "missing"],
            id="nested-missing-field",
        ),
        pytest.param(
            f'{{"type": "heartbeat", "req": 1, "leases": [{_LEASE}], "x": 1}}',
            ["'heartbeat'", "x"],
            id="extra-field-with-tuple",
        ),
        pytest.param(
            '{"type": "history", "req": 1, "events": [{"seq": 1}]}',
            ["'history'", "events[0]"],
            id="tuple-element-malformed",
        ),
        pytest.param(
            f'{{"type": "heartbeat", "req": 1, "leases": [{_LEASE[:-1]}, "extra": 1}}]}}',
            ["'heartbeat'", "extra"],
            id="nested-extra-field",
        ),
    ],
)
def test_malformed_message_raises_protocol_error(text: str | bytes, expected: list[str]) -> None:
    with pytest.raises(ProtocolError) as info:
        protocol.decode(text)
    for part in expected:
        assert part in str(info.value), f"{part!r} not in {str(info.value)!r}"


def test_deeply_nested_json_is_a_protocol_error_not_a_recursion_error() -> None:
    """A frame of 100k nested brackets once escaped ``decode`` as RecursionError, which
    took down the receiving session's whole listener."""
    deep = "[" * 100_000 + "]" * 100_000
    with pytest.raises(ProtocolError, match="nested too deeply"):
        protocol.decode(deep)
    with pytest.raises(PayloadError, match="nested too deeply"):
        protocol.decode_value(deep)
    [error] = protocol.decode_frame(deep)
    assert isinstance(error, ProtocolError) and "nested too deeply" in str(error)
    nested_field = '{"type": "get_run", "req": 1, "run_id": ' + deep + "}"
    with pytest.raises(ProtocolError):
        protocol.decode(nested_field)


def test_a_frame_is_one_message_or_a_batch_and_bad_items_do_not_spoil_the_rest() -> None:
    one = protocol.encode(protocol.Ok(1))
    assert protocol.encode_frame([one]) == one
    frame = protocol.encode_frame([one, protocol.encode(protocol.Ok(2))])
    assert protocol.decode_frame(frame) == [protocol.Ok(1), protocol.Ok(2)]
    mixed = protocol.decode_frame('[{"type": "ok", "req": 1}, {"type": "nope"}, 3]')
    assert mixed[0] == protocol.Ok(1)
    assert isinstance(mixed[1], ProtocolError) and "unknown message type 'nope'" in str(mixed[1])
    assert isinstance(mixed[2], ProtocolError) and "must be a JSON object" in str(mixed[2])
    for bad, why in [("[]", "empty batch"), ("{", "not valid JSON"), ("NaN", "not valid JSON"),
                     (b"\xff", "not valid JSON")]:
        [error] = protocol.decode_frame(bad)
        assert isinstance(error, ProtocolError) and why in str(error)


_COERCION_BUG = (
    "protocol.converter is a default cattrs.Converter whose primitive structure hooks call "
    "int()/str()/float()/bool()/tuple(), so a field of the wrong JSON type is silently "
    "coerced instead of raising ProtocolError"
)


@pytest.mark.parametrize(
    "text",
    [
        pytest.param(
            '{"type": "ok", "req": 1.5}',
            id="float-for-int",
        ),
        pytest.param(
            '{"type": "ok", "req": "7"}',
            id="string-for-int",
        ),
        pytest.param(
            '{"type": "ok", "req": true}',
            id="bool-for-int",
        ),
        pytest.param(
            '{"type": "goodbye", "reason": null}',
            id="null-for-str",
        ),
        pytest.param(
            '{"type": "refused", "req": 1, "error_type": 404, "message": "m"}',
            id="int-for-str",
        ),
        pytest.param(
            '{"type": "heartbeat_ack", "req": 1, "lost": "abc"}',
            id="string-for-tuple",
        ),
        pytest.param(
            '{"type": "enqueued", "req": 1, "run_id": "r", "version": "v", "created": "no"}',
            id="string-for-bool",
        ),
        pytest.param(
            f'{{"type": "wait_run", "req": 1, "lease": {_LEASE}, "conditions": [{{"position":'
            ' "0", "kind": "retry", "name": null, "due_at": NaN}], "reason": "r"}',
            id="nan-float",
        ),
    ],
)
def test_wrong_json_type_is_not_coerced(text: str) -> None:
    with pytest.raises(ProtocolError):
        protocol.decode(text)


class _NotAMessage:
    pass


@attrs.frozen
class _SubclassOfOk(protocol.Ok):
    pass


@pytest.mark.parametrize(
    ("value", "name"),
    [
        (object(), "object"),
        (_NotAMessage(), "_NotAMessage"),
        ({"type": "ok", "req": 1}, "dict"),
        ('{"type":"ok","req":1}', "str"),
        (None, "NoneType"),
        (protocol.Ok, "type"),
        (protocol.WorkflowRef("w", "1"), "WorkflowRef"),
        (Lease("r", 1, "w"), "Lease"),
        (_SubclassOfOk(1), "_SubclassOfOk"),
    ],
)
def test_encode_non_message_raises_protocol_error(value: Any, name: str) -> None:
    with pytest.raises(ProtocolError, match="not a protocol message") as info:
        protocol.encode(value)
    assert name in str(info.value)


def test_encode_message_with_nan_raises_protocol_error() -> None:
    msg = protocol.WaitRun(1, Lease("r", 1, "w"), (WaitFor("0", "retry", None, float("nan")),),
                           "r")
    with pytest.raises(ProtocolError):
        protocol.encode(msg)


# -- user payloads -------------------------------------------------------------------------
json_values: st.SearchStrategy[Any] = st.recursive(
    st.none() | st.booleans() | st.integers() | finite_floats | st.text(),
    lambda children: (
        st.lists(children, max_size=5) | st.dictionaries(st.text(), children, max_size=5)
    ),
    max_leaves=25,
)


@attrs.frozen
class Item:
    sku: str
    quantity: int
    price: float


@attrs.frozen
class Order:
    id: str
    items: list[Item]
    tags: tuple[str, ...]
    meta: dict[str, int]
    note: str | None = None
    express: bool = False


@dataclasses.dataclass
class Shipment:
    order: Order
    weights: list[float]
    address: dict[str, str]
    tracking: str | None = None


items = st.builds(Item, sku=st.text(), quantity=st.integers(), price=finite_floats)
orders = st.builds(
    Order,
    id=st.text(),
    items=st.lists(items, max_size=4),
    tags=st.lists(st.text(), max_size=4).map(tuple),
    meta=st.dictionaries(st.text(), st.integers(), max_size=4),
    note=st.none() | st.text(),
    express=st.booleans(),
)
shipments = st.builds(
    Shipment,
    order=orders,
    weights=st.lists(finite_floats, max_size=4),
    address=st.dictionaries(st.text(), st.text(), max_size=4),
    tracking=st.none() | st.text(),
)


@SETTINGS
@given(value=json_values)
def test_payload_round_trip_plain_json(value: Any) -> None:
    text = protocol.encode_value(value)
    json.loads(text)  # valid JSON
    assert protocol.decode_value(text) == value
    assert protocol.encode_value(protocol.decode_value(text)) == text


@SETTINGS
@given(order=orders)
def test_payload_round_trip_attrs(order: Order) -> None:
    text = protocol.encode_value(order, Order)
    assert protocol.decode_value(text, Order) == order
    # Untyped encoding of an attrs instance gives the same canonical text.
    assert protocol.encode_value(order) == text


@SETTINGS
@given(shipment=shipments)
def test_payload_round_trip_dataclass(shipment: Shipment) -> None:
    text = protocol.encode_value(shipment, Shipment)
    assert protocol.decode_value(text, Shipment) == shipment
    assert protocol.encode_value(shipment) == text


@SETTINGS
@given(orders=st.lists(orders, max_size=3), by_name=st.dictionaries(st.text(), orders, max_size=3))
def test_payload_round_trip_nested_containers(
    orders: list[Order], by_name: dict[str, Order]
) -> None:
    text = protocol.encode_value(orders, list[Order])
    assert protocol.decode_value(text, list[Order]) == orders
    text = protocol.encode_value(by_name, dict[str, Order])
    assert protocol.decode_value(text, dict[str, Order]) == by_name
    # Without an annotation, lists and dicts of attrs instances are encoded the same way.
    assert protocol.encode_value(by_name) == text


@pytest.mark.parametrize(
    ("annotation", "strategy"),
    [
        (int, st.integers()),
        (str, st.text()),
        (float, finite_floats),
        (bool, st.booleans()),
        (type(None), st.none()),
        (int | None, st.none() | st.integers()),
        (list[int], st.lists(st.integers())),
        (dict[str, float], st.dictionaries(st.text(), finite_floats)),
        (tuple[int, ...], st.lists(st.integers()).map(tuple)),
        (tuple[str, int], st.tuples(st.text(), st.integers())),
        (list[dict[str, list[str]]], st.lists(st.dictionaries(st.text(), st.lists(st.text())))),
    ],
    ids=repr,
)
@SETTINGS
@given(data=st.data())
def test_payload_round_trip_primitives_with_annotation(
    annotation: Any, strategy: st.SearchStrategy[Any], data: st.DataObject
) -> None:
    value = data.draw(strategy)
    text = protocol.encode_value(value, annotation)
    decoded = protocol.decode_value(text, annotation)
    assert decoded == value
    assert type(decoded) is type(value)


@SETTINGS
@given(
    entries=st.dictionaries(st.text(), json_values, min_size=2, max_size=6),
    data=st.data(),
)
def test_payload_encoding_is_canonical(entries: dict[str, Any], data: st.DataObject) -> None:
    shuffled = dict(data.draw(st.permutations(list(entries.items()))))
    a = protocol.encode_value(entries)
    b = protocol.encode_value(shuffled)
    assert a == b
    assert protocol.content_hash("step", a) == protocol.content_hash("step", b)
    # Nested too.
    assert protocol.encode_value({"outer": entries}) == protocol.encode_value({"outer": shuffled})


def test_payload_encoding_is_compact_and_sorted() -> None:
    assert protocol.encode_value({"b": 1, "a": [1, {"d": 2, "c": 3}]}) == (
        '{"a":[1,{"c":3,"d":2}],"b":1}'
    )
    assert protocol.encode_value(Item("x", 2, 1.5), Item) == (
        '{"price":1.5,"quantity":2,"sku":"x"}'
    )


@SETTINGS
@given(name=st.text(), a=json_values, b=json_values)
def test_content_hash(name: str, a: Any, b: Any) -> None:
    text_a = protocol.encode_value(a)
    text_b = protocol.encode_value(b)
    h = protocol.content_hash(name, text_a)
    assert isinstance(h, str) and len(h) == 32
    assert h == protocol.content_hash(name, protocol.encode_value(a))
    if text_a != text_b:
        assert h != protocol.content_hash(name, text_b)
    assert h != protocol.content_hash(name + "x", text_a)


def test_content_hash_separates_name_from_input() -> None:
    assert protocol.content_hash("ab", '"c"') != protocol.content_hash("a", 'b"c"')
    assert protocol.content_hash("a", "1") != protocol.content_hash("b", "1")
    assert protocol.content_hash("a", "1") != protocol.content_hash("a", "2")


class Widget:
    pass


@attrs.frozen
class Holder:
    thing: Any


@pytest.mark.parametrize(
    ("value", "type_name"),
    [
        pytest.param(object(), "object", id="object"),
        pytest.param(Widget(), "Widget", id="custom-class"),
        pytest.param({1, 2}, "set", id="set"),
        pytest.param(frozenset({"a"}), "frozenset", id="frozenset"),
        pytest.param(b"bytes", "bytes", id="bytes"),
        pytest.param({1: "a"}, "int", id="int-keys"),
        pytest.param({("a",): 1}, "tuple", id="tuple-keys"),
        pytest.param(float("nan"), "float", id="nan"),
        pytest.param(float("inf"), "float", id="inf"),
        pytest.param(-float("inf"), "float", id="-inf"),
        pytest.param([1, Widget()], "Widget", id="nested-in-list"),
        pytest.param({"a": {"b": Widget()}}, "Widget", id="nested-in-dict"),
        pytest.param({"a": {2: "b"}}, "int", id="nested-int-keys"),
        pytest.param([float("nan")], "float", id="nested-nan"),
        pytest.param(Holder(Widget()), "Widget", id="nested-in-attrs"),
        pytest.param(Item("x", 1, float("nan")), "float", id="nan-in-attrs"),
    ],
)
def test_unencodable_payload_raises_type_error(value: Any, type_name: str) -> None:
    with pytest.raises(TypeError) as info:
        protocol.encode_value(value)
    assert isinstance(info.value, PayloadError)
    assert type_name in str(info.value)
    assert "payload" in str(info.value)


def test_unencodable_payload_with_annotation_and_what() -> None:
    with pytest.raises(PayloadError, match="input of task 'ship'") as info:
        protocol.encode_value(Widget(), Widget, what="input of task 'ship'")
    assert "Widget" in str(info.value)
    with pytest.raises(PayloadError, match="float"):
        protocol.encode_value(float("nan"), float)
    with pytest.raises(PayloadError, match="set"):
        protocol.encode_value({1}, set[int])


@pytest.mark.parametrize(
    ("text", "annotation", "expected"),
    [
        pytest.param(
            '{"sku":"x","quantity":"many","price":1}',
            Item,
            ["Item", "quantity"],
            id="attrs-wrong-field-type",
        ),
        pytest.param('{"sku":"x","price":1}', Item, ["Item", "quantity"], id="attrs-missing"),
        pytest.param(
            '{"sku":"x","quantity":1,"price":1,"colour":"red"}',
            Item,
            ["Item", "colour"],
            id="attrs-extra",
        ),
        pytest.param('"a string"', int, ["int"], id="str-into-int"),
        pytest.param('{"a": 1}', list[int], ["list"], id="dict-into-list-int"),
        pytest.param("5", list[int], ["list"], id="int-into-list"),
        pytest.param('[1, "x"]', list[int], ["list", "[1]"], id="bad-element"),
        pytest.param(
            '{"order":{"id":"o","items":[{"sku":1}],"tags":[],"meta":{}},'
            '"weights":[],"address":{}}',
            Shipment,
            ["Shipment", "order.items[0]"],
            id="dataclass-nested",
        ),
        pytest.param("not json", Item, ["payload", "not valid JSON"], id="not-json"),
        pytest.param(
            "[1]",
            Item,
            ["Item"],
            id="list-into-attrs",
        ),
        pytest.param(
            "[1]",
            dict[str, int],
            ["dict"],
            id="list-into-dict",
        ),
        pytest.param(
            "null",
            str,
            ["str"],
            id="null-into-str",
        ),
        pytest.param(
            "1.5",
            int,
            ["int"],
            id="float-into-int",
        ),
        pytest.param(
            '"abc"',
            tuple[str, ...],
            ["tuple"],
            id="str-into-tuple",
        ),
    ],
)
def test_decode_into_wrong_type_raises_payload_error(
    text: str, annotation: Any, expected: list[str]
) -> None:
    with pytest.raises(PayloadError) as info:
        protocol.decode_value(text, annotation)
    assert isinstance(info.value, TypeError)
    for part in expected:
        assert part in str(info.value), f"{part!r} not in {str(info.value)!r}"


def test_decode_value_names_what() -> None:
    with pytest.raises(PayloadError, match="result of workflow 'w'.*Item"):
        protocol.decode_value('{"sku": 1}', Item, what="result of workflow 'w'")
