"""The wire codec's fast path: msgspec, in C, accepting exactly what the cattrs path accepts.

:mod:`aiki.protocol` encodes and decodes every message through one cattrs converter: strict
(no coercion, no unknown field, every required field present) and precise in what it says
is wrong, but some 25 µs to decode a task start and 13 µs to encode it, a fifth of a
WebSocket worker's CPU. This module builds, for every message class, a msgspec ``Struct``
that mirrors it: the same fields and types (nested records mirrored too), tagged by the
message's tag under ``"type"``, unknown fields forbidden. A frame is first checked against
the mirrors, in C, with the same strictness rules; what passes is then decoded by msgspec
straight into its attrs class (which alone would let unknown fields through). Encoding hands
the attrs message to msgspec as it is and puts the tag first, after a generated check that
no float is NaN or infinite (msgspec would write null).

The fast path only ever accepts: whatever it refuses or cannot handle (a malformed frame,
a string with a lone surrogate, a number out of range) goes to the cattrs path, which
decides, and names what is wrong. ``tests/transport/test_protocol_fast.py`` checks that
the two agree on every message type and on mutated frames.
"""

from __future__ import annotations

import math
import types
import typing
from collections.abc import Callable
from typing import Any, Literal, Union

import attrs
import msgspec


class FastCodec:
    """Mirrors of ``messages`` (tag -> attrs class), built once."""

    def __init__(self, messages: dict[str, type[Any]]) -> None:
        self._mirrors: dict[type[Any], type[msgspec.Struct]] = {}
        self._checks: dict[type[Any], Callable[[Any], bool] | None] = {}
        self._decoders: dict[type[Any], msgspec.json.Decoder[Any]] = {}
        self._tags: dict[type[Any], bytes] = {}
        tagged: list[type[msgspec.Struct]] = []
        for tag, cls in messages.items():
            mirror = self._mirror(cls, tag)
            tagged.append(mirror)
            self._decoders[mirror] = msgspec.json.Decoder(cls)
            self._tags[cls] = b'{"type":' + msgspec.json.encode(tag)
            self._check(cls)
        one: Any = Union[tuple(tagged)]  # noqa: UP007 (a Union built at run time)
        self._one = msgspec.json.Decoder(one)
        self._frame = msgspec.json.Decoder(Union[one, list[msgspec.Raw]])  # noqa: UP007
        self._encoder = msgspec.json.Encoder()

    # -- the hot path ----------------------------------------------------------------------
    def encode(self, msg: Any) -> str | None:
        """``msg`` as compact JSON text with its tag first, or None when this path cannot
        tell (a non-finite float, a value msgspec refuses): the caller encodes it."""
        cls = type(msg)
        tag = self._tags.get(cls)
        if tag is None:
            return None
        try:
            check = self._checks[cls]
            if check is not None and not check(msg):
                return None
            body = self._encoder.encode(msg)
        except Exception:
            return None
        if len(body) == 2:  # b"{}"
            return (tag + b"}").decode()
        return (tag + b"," + body[1:]).decode()

    def decode(self, text: str | bytes) -> Any | None:
        """One message, or None when this path refuses it (the caller then decides)."""
        try:
            return self._decoders[type(self._one.decode(text))].decode(text)
        except Exception:
            return None

    def decode_frame(self, text: str | bytes) -> list[Any] | None:
        """A frame's messages: each a message, or a ``bytes`` item this path refused (the
        caller decodes that one); None when it refuses the frame as a whole."""
        try:
            out = self._frame.decode(text)
            if type(out) is not list:
                return [self._decoders[type(out)].decode(text)]
        except Exception:
            return None
        if not out:
            return None
        items: list[Any] = []
        for raw in out:
            try:
                items.append(self._decoders[type(self._one.decode(raw))].decode(raw))
            except Exception:
                items.append(bytes(raw))
        return items

    # -- building --------------------------------------------------------------------------
    def _mirror(self, cls: type[Any], tag: str | None = None) -> type[msgspec.Struct]:
        known = self._mirrors.get(cls)
        if known is not None:
            return known
        hints = typing.get_type_hints(cls)
        fields: list[tuple[Any, ...]] = []
        for f in attrs.fields(cls):
            kind = self._mirror_type(hints[f.name])
            if f.default is attrs.NOTHING:
                fields.append((f.name, kind))
            elif isinstance(f.default, attrs.Factory):  # type: ignore[arg-type]
                factory = f.default.factory
                fields.append((f.name, kind, msgspec.field(default_factory=factory)))
            else:
                fields.append((f.name, kind, f.default))
        options: dict[str, Any] = {"forbid_unknown_fields": True}
        if tag is not None:
            options.update(tag=tag, tag_field="type")
        mirror = msgspec.defstruct(f"Wire{cls.__name__}", fields, **options)
        self._mirrors[cls] = mirror
        return mirror

    def _mirror_type(self, t: Any) -> Any:
        if attrs.has(t):
            return self._mirror(t)
        origin, args = typing.get_origin(t), typing.get_args(t)
        if origin is None or origin is Literal:
            return t
        mapped = tuple(a if a is Ellipsis else self._mirror_type(a) for a in args)
        if origin in (Union, types.UnionType):
            return Union[mapped]  # noqa: UP007 (a Union built at run time)
        if origin in (tuple, dict):
            generic: Any = origin
            return generic[mapped]
        raise TypeError(f"the fast codec cannot mirror {t!r}")

    def _check(self, cls: type[Any]) -> Callable[[Any], bool] | None:
        """A function telling whether every float in a ``cls`` is finite (None passes),
        generated from its fields; None when ``cls`` holds no float at all."""
        if cls in self._checks:
            return self._checks[cls]
        self._checks[cls] = None  # (a record holding itself would end here)
        hints = typing.get_type_hints(cls)
        names: dict[str, Any] = {"_isfinite": math.isfinite}
        lines: list[str] = []
        for f in attrs.fields(cls):
            lines += self._check_lines(hints[f.name], f"m.{f.name}", names, 0)
        if not lines:
            return None
        source = "def check(m):\n" + "".join(f"    {line}\n" for line in lines)
        source += "    return True\n"
        namespace: dict[str, Any] = {}
        exec(compile(source, f"<finite floats of {cls.__name__}>", "exec"), names, namespace)
        check: Callable[[Any], bool] = namespace["check"]
        self._checks[cls] = check
        return check

    def _check_lines(self, t: Any, var: str, names: dict[str, Any], depth: int) -> list[str]:
        """Statements that ``return False`` when ``var``, of type ``t``, holds a non-finite
        float."""
        origin, args = typing.get_origin(t), typing.get_args(t)
        if t is float:
            return [f"if {var} is not None and not _isfinite({var}): return False"]
        if attrs.has(t):
            check = self._check(t)
            if check is None:
                return []
            names[f"_check_{t.__name__}"] = check
            return [f"if {var} is not None and not _check_{t.__name__}({var}): return False"]
        if origin in (Union, types.UnionType):
            return [line for a in args for line in self._check_lines(a, var, names, depth)]
        if origin is tuple:
            item = f"_x{depth}"
            inner = [line for a in args if a is not Ellipsis
                     for line in self._check_lines(a, item, names, depth + 1)]
            if not inner:
                return []
            return [f"for {item} in {var}:", *(f"    {line}" for line in inner)]
        if origin is dict:
            item = f"_x{depth}"
            inner = self._check_lines(args[1], item, names, depth + 1)
            if not inner:
                return []
            return [f"for {item} in {var}.values():", *(f"    {line}" for line in inner)]
        return []
