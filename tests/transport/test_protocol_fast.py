"""The wire codec's fast path (aiki.protocol_fast) against the cattrs path it stands in for.

The fast path may refuse what the cattrs path accepts (it then hands over), but it must
never accept what the cattrs path refuses, nor decode anything differently.
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from hypothesis import given
from hypothesis import strategies as st

from aiki import protocol
from aiki.errors import ProtocolError
from aiki.records import Lease, StepRecord, WaitFor
from tests.transport.test_protocol import MESSAGE_STRATEGIES, SETTINGS

FAST = protocol._fast()
ANY_MESSAGE = st.one_of(*MESSAGE_STRATEGIES.values())


def strictly(text: str | bytes) -> Any:
    """What the cattrs path makes of ``text``: a message, or the ProtocolError it raises."""
    try:
        return protocol._decode_strictly(text)
    except ProtocolError as exc:
        return exc


@pytest.mark.parametrize("tag", sorted(protocol.message_types()))
@SETTINGS
@given(data=st.data())
def test_the_fast_path_encodes_and_decodes_every_message_as_the_cattrs_path(
        tag: str, data: st.DataObject) -> None:
    msg = data.draw(MESSAGE_STRATEGIES[tag], label="message")
    slow_text = protocol._COMPACT.encode(protocol.to_wire(msg))
    fast_text = FAST.encode(msg)
    assert fast_text is not None  # (nothing drawn here is out of its reach)
    assert json.loads(fast_text) == json.loads(slow_text)
    assert fast_text.startswith(f'{{"type":"{tag}"')
    assert strictly(fast_text) == msg
    assert FAST.decode(slow_text) == msg
    assert FAST.decode_frame(slow_text) == [msg]


json_leaves = (st.none() | st.booleans() | st.integers(-(2**70), 2**70)
               | st.floats(allow_nan=False, allow_infinity=False) | st.text(max_size=5)
               | st.sampled_from(["", "task", "running", "pause", "client", "ok"]))
json_values = st.recursive(
    json_leaves,
    lambda children: st.lists(children, max_size=3)
    | st.dictionaries(st.text(max_size=4), children, max_size=3),
    max_leaves=6)


def _containers(value: Any) -> list[Any]:
    """Every dict and list inside ``value``, itself first."""
    if isinstance(value, dict):
        value_children = list(value.values())
    elif isinstance(value, list):
        value_children = value
    else:
        return []
    return [value, *(found for child in value_children for found in _containers(child))]


def _mutate(wire: dict[str, Any], data: st.DataObject) -> None:
    """One change somewhere in ``wire``: a value replaced, a key dropped or one added."""
    target = data.draw(st.sampled_from(_containers(wire)), label="where")
    if isinstance(target, list):
        if not target:
            target.append(data.draw(json_values, label="item"))
            return
        i = data.draw(st.integers(0, len(target) - 1), label="index")
        target[i] = data.draw(json_values, label="item")
        return
    how = data.draw(st.sampled_from(["replace", "drop", "add"]), label="how")
    if how == "add" or not target:
        target[data.draw(st.text(max_size=8), label="key")] = data.draw(json_values)
    elif how == "drop":
        del target[data.draw(st.sampled_from(sorted(target)), label="key")]
    else:
        key = data.draw(st.sampled_from(sorted(target)), label="key")
        target[key] = data.draw(json_values, label="value")


@SETTINGS
@given(msg=ANY_MESSAGE, data=st.data())
def test_the_fast_path_never_accepts_what_the_cattrs_path_refuses(
        msg: Any, data: st.DataObject) -> None:
    wire = protocol.to_wire(msg)
    for _ in range(data.draw(st.integers(1, 3), label="changes")):
        _mutate(wire, data)
    text = json.dumps(wire, separators=(",", ":"))
    judged = strictly(text)
    fast = FAST.decode(text)
    assert fast is None or fast == judged, f"fast {fast!r}, cattrs {judged!r}"
    # Decoded through the codec's front door, the answer is the cattrs path's, whichever
    # path gave it.
    try:
        got: Any = protocol.decode(text)
    except ProtocolError as exc:
        got = exc
    assert type(got) is type(judged)
    assert got == judged or str(got) == str(judged)
    # In a batch beside a good message, the bad one spoils nothing.
    [first, second] = protocol.decode_frame(f"[{protocol.encode(protocol.Ok(1))},{text}]")
    assert first == protocol.Ok(1)
    assert type(second) is type(judged) and (second == judged or str(second) == str(judged))


@pytest.mark.parametrize("text", [
    '{"type":"ok","req":1,"req":2}',  # a key twice: the last one counts in both paths
    '{"req":1,"type":"ok"}',  # the tag anywhere
    '{"type":"ok","type":"ok","req":3}',
    '{"type":"ok","req":-0}',
    '{"type":"ok","req":123456789012345678901234567890}',  # beyond 64 bits: handed over
    '{"type":"goodbye","reason":"\\ud800"}',  # a lone surrogate: msgspec refuses, json not
    '{"type":"ok","type":"refused","req":1}',  # two tags: the last one, for json
    '\ufeff{"type":"ok","req":1}',  # a byte order mark: refused
    '{"type":"welcome","req":1,"server_id":"s","lease_ttl":1e400,"heartbeat_interval":1}',
    '{"type":"welcome","req":1,"server_id":"s","lease_ttl":2,"heartbeat_interval":1}',
])
def test_the_edges_of_json_decode_as_the_cattrs_path_decodes_them(text: str) -> None:
    judged = strictly(text)
    fast = FAST.decode(text)
    assert fast is None or fast == judged
    try:
        got: Any = protocol.decode(text)
    except ProtocolError as exc:
        got = exc
    assert type(got) is type(judged) and (got == judged or str(got) == str(judged))


def test_a_float_out_of_json_is_left_to_the_cattrs_path_which_refuses_it() -> None:
    for bad in (float("nan"), float("inf"), float("-inf")):
        msg = protocol.WaitRun(1, Lease("r", 1, "w"), (WaitFor("0", "retry", None, bad),), "r")
        assert FAST.encode(msg) is None  # msgspec would have written null
        with pytest.raises(ProtocolError, match="cannot encode WaitRun"):
            protocol.encode(msg)
    step = StepRecord("0", "sleep", "s", "h", "[]", None, "running", 1,
                      next_attempt_at=float("nan"))
    nested = protocol.StartStep(1, Lease("r", 1, "w"), step, saved=(step,))
    assert FAST.encode(nested) is None
    with pytest.raises(ProtocolError, match="cannot encode StartStep"):
        protocol.encode(nested)


def test_a_string_msgspec_refuses_still_travels() -> None:
    msg = protocol.Goodbye(reason="half a pair \ud800")
    assert protocol.decode(protocol.encode(msg)) == msg
    assert protocol.decode_frame(protocol.encode_frame([protocol.encode(msg)] * 2)) == [msg] * 2
