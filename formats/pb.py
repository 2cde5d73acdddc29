"""Protobuf (proto2) wire codec for CRIU's messages, built on construct.

Messages are ``attrs`` classes deriving from :class:`Message`; each field is declared with
:func:`required`, :func:`optional` or :func:`repeated`, which record the protobuf field number
and scalar kind in the attrs metadata.  :func:`parse` and :func:`build` are generic.

Rules (docs: shared criu-image-format.md section 3, protobuf-c / python-protobuf behaviour):

* reader: any field order, packed or unpacked repeated scalars, last value wins for scalars,
  repeated occurrences of a sub-message merge, unknown fields are kept verbatim (key included);
* writer: ascending field number, required fields always, optional fields only when not None,
  repeated fields unpacked; unknown fields are merged back by field number, so
  ``build(parse(b)) == b`` for anything protobuf-c or python-protobuf wrote;
* corruption (truncated varint or payload, wire types 3/4, a varint longer than 10 bytes,
  a missing required field, a wire type that does not fit the declared kind) raises
  :class:`~formats.errors.ImageError` with the absolute byte offset.
"""

from __future__ import annotations

import enum
import os
from collections.abc import Callable
from typing import Any, ClassVar, TypeVar

import attrs
from construct import GreedyBytes, Int32ul, Int64ul, Prefixed, VarInt, ZigZag

from formats.errors import ImageError

__all__ = [
    "ExtraMessage",
    "Kind",
    "Label",
    "Message",
    "RawField",
    "build",
    "field_default",
    "optional",
    "parse",
    "repeated",
    "required",
]

# The construct primitives of the wire format (section 3 of the format doc).
PbVarInt = VarInt
PbFixed64 = Int64ul
PbFixed32 = Int32ul
PbLengthDelimited = Prefixed(VarInt, GreedyBytes)
PbZigZag = ZigZag

WT_VARINT, WT_FIXED64, WT_LEN, WT_FIXED32 = 0, 1, 2, 5
_U64 = (1 << 64) - 1
_U32 = (1 << 32) - 1


class Kind(enum.Enum):
    """Scalar kind of a field: decides wire type and value conversion."""

    UINT32 = "uint32"
    UINT64 = "uint64"
    INT32 = "int32"
    INT64 = "int64"
    SINT32 = "sint32"
    SINT64 = "sint64"
    BOOL = "bool"
    ENUM = "enum"
    FIXED32 = "fixed32"
    FIXED64 = "fixed64"
    STRING = "string"
    BYTES = "bytes"
    MESSAGE = "message"

    @property
    def wire_type(self) -> int:
        """The wire type of one unpacked value of this kind."""
        if self in (Kind.STRING, Kind.BYTES, Kind.MESSAGE):
            return WT_LEN
        if self is Kind.FIXED32:
            return WT_FIXED32
        if self is Kind.FIXED64:
            return WT_FIXED64
        return WT_VARINT


class Label(enum.Enum):
    """proto2 field label."""

    REQUIRED = "required"
    OPTIONAL = "optional"
    REPEATED = "repeated"


@attrs.frozen
class FieldSpec:
    """What a message field declares: number, kind, label, default, sub-message class."""

    number: int
    kind: Kind
    label: Label
    default: Any = None
    message: type[Message] | None = None


@attrs.frozen
class _BoundSpec:
    name: str
    spec: FieldSpec


@attrs.frozen
class RawField:
    """An unknown field kept verbatim: its number and its bytes on the wire (key included)."""

    number: int
    raw: bytes


@attrs.define(kw_only=True)
class Message:
    """Base of every message; ``unknown_fields`` holds what the class does not declare."""

    unknown_fields: list[RawField] = attrs.field(factory=list, repr=False)


@attrs.define(kw_only=True)
class ExtraMessage(Message):
    """A message its image follows with raw bytes ("EXTRA", format doc section 2.1: pipes-data,
    fifo-data, sk-queues...).  ``extra`` holds those bytes and the field named by
    ``EXTRA_LENGTH`` announces how many there are.  :func:`parse` and :func:`build` never touch
    ``extra``: the image framing (:mod:`formats.imagefile`) reads and writes it."""

    EXTRA_LENGTH: ClassVar[str]
    extra: bytes = attrs.field(default=b"")

    def extra_length(self) -> int:
        """The number of extra bytes the message announces."""
        value: int = getattr(self, self.EXTRA_LENGTH)
        return value


M = TypeVar("M", bound=Message)

_ZERO: dict[Kind, Any] = {
    Kind.STRING: "",
    Kind.BYTES: b"",
    Kind.BOOL: False,
}


def _meta(spec: FieldSpec) -> dict[str, FieldSpec]:
    return {"pb": spec}


def required(number: int, kind: Kind, *, default: Any = None, message: Any = None) -> Any:
    """A required field; defaults to the kind's zero (or a default-built sub-message)."""
    spec = FieldSpec(number, kind, Label.REQUIRED, default, message)
    if kind is Kind.MESSAGE:
        factory: Callable[[], Any] = message
        return attrs.field(factory=factory, metadata=_meta(spec))
    value = default if default is not None else _ZERO.get(kind, 0)
    return attrs.field(default=value, metadata=_meta(spec))


def optional(number: int, kind: Kind, *, default: Any = None, message: Any = None) -> Any:
    """An optional field: ``None`` means "not set" (``default`` is the proto default)."""
    spec = FieldSpec(number, kind, Label.OPTIONAL, default, message)
    return attrs.field(default=None, metadata=_meta(spec))


def repeated(number: int, kind: Kind, *, message: Any = None) -> Any:
    """A repeated field, a list (written unpacked, read packed or unpacked)."""
    spec = FieldSpec(number, kind, Label.REPEATED, None, message)
    return attrs.field(factory=list, metadata=_meta(spec))


_SCHEMAS: dict[type[Message], dict[int, _BoundSpec]] = {}


def schema(cls: type[Message]) -> dict[int, _BoundSpec]:
    """Field number -> (attribute name, spec) of a message class, ascending by number."""
    found = _SCHEMAS.get(cls)
    if found is None:
        specs = [
            _BoundSpec(a.name, a.metadata["pb"]) for a in attrs.fields(cls) if "pb" in a.metadata
        ]
        found = {b.spec.number: b for b in sorted(specs, key=lambda b: b.spec.number)}
        _SCHEMAS[cls] = found
    return found


def field_default(obj: Message, name: str) -> Any:
    """The value of ``name`` with the declared proto default applied when it is unset."""
    value = getattr(obj, name)
    if value is not None:
        return value
    for bound in schema(type(obj)).values():
        if bound.name == name:
            spec = bound.spec
            if spec.kind is Kind.MESSAGE and spec.message is not None:
                return spec.message()  # protobuf's default instance
            return spec.default if spec.default is not None else _ZERO.get(spec.kind, 0)
    raise AttributeError(name)


# --------------------------------------------------------------------------------------------
# reading


class _Reader:
    """Reads wire primitives from one buffer, translating errors to offsets.

    Varints are decoded here in a loop over the bytes (the protobuf rule: 7 bits a byte,
    little-endian, high bit "more follows", at most 10 bytes): construct's ``VarInt`` is the
    definition, and ``tests/test_formats_pb.py`` checks both agree on every length; the loop
    is what makes opening a directory of core images cheap (a few thousand varints)."""

    __slots__ = ("base", "data", "entry", "path", "pos", "size")

    def __init__(self, data: bytes, path: str, base: int, entry: int | None) -> None:
        self.data = data
        self.size = len(data)
        self.pos = 0
        self.path = path
        self.base = base
        self.entry = entry

    def error(self, message: str, pos: int) -> ImageError:
        return ImageError(self.path, message, offset=self.base + pos, entry=self.entry)

    def varint(self, what: str) -> int:
        data, pos, size = self.data, self.pos, self.size
        start = pos
        value = shift = 0
        while True:
            if pos >= size:
                raise self.error(f"truncated varint ({what})", start)
            byte = data[pos]
            pos += 1
            value |= (byte & 0x7F) << shift
            if byte < 0x80:
                break
            shift += 7
            if shift >= 70:
                raise self.error(f"varint longer than 10 bytes ({what})", start)
        if value > _U64:
            raise self.error(f"varint longer than 10 bytes ({what})", start)
        self.pos = pos
        return value

    def fixed(self, size: int, what: str) -> int:
        start = self.pos
        if start + size > self.size:
            raise self.error(f"truncated fixed{size * 8} value ({what})", start)
        self.pos = start + size
        return int.from_bytes(self.data[start : start + size], "little")

    def chunk(self, what: str, start: int) -> bytes:
        length = self.varint(what)
        if self.pos + length > self.size:
            raise self.error(
                f"length-delimited {what} of {length} bytes runs past the end of the message",
                start,
            )
        value = self.data[self.pos : self.pos + length]
        self.pos += length
        return value


def _to_signed(value: int, bits: int) -> int:
    value &= (1 << bits) - 1
    return value - (1 << bits) if value >> (bits - 1) else value


def _scalar_from_int(kind: Kind, value: int) -> Any:
    if kind in (Kind.UINT32, Kind.FIXED32):
        return value & _U32
    if kind is Kind.INT32 or kind is Kind.ENUM:
        return _to_signed(value, 32)
    if kind is Kind.INT64:
        return _to_signed(value, 64)
    if kind in (Kind.SINT32, Kind.SINT64):
        return (value >> 1) ^ -(value & 1)
    if kind is Kind.BOOL:
        return value != 0
    return value  # UINT64, FIXED64


def _read_packed(reader: _Reader, kind: Kind, body_start: int, body: bytes) -> list[int]:
    sub = _Reader(body, reader.path, reader.base + body_start, reader.entry)
    out: list[int] = []
    while sub.pos < len(body):
        if kind is Kind.FIXED32:
            out.append(sub.fixed(4, "packed element"))
        elif kind is Kind.FIXED64:
            out.append(sub.fixed(8, "packed element"))
        else:
            out.append(sub.varint("packed element"))
    return out


@attrs.frozen
class _Field:
    """What ``parse`` needs to know of one declared field, looked up once per class."""

    name: str
    spec: FieldSpec
    wire: int  # the wire type of one unpacked value
    convert: Callable[[int], Any] | None  # int -> value for varint/fixed kinds; None: as is
    repeated: bool


def _converter(kind: Kind) -> Callable[[int], Any] | None:
    if kind in (Kind.UINT64, Kind.FIXED64):
        return None
    return lambda value: _scalar_from_int(kind, value)


_PARSE_TABLES: dict[type[Message], dict[int, _Field]] = {}


def _parse_table(cls: type[Message]) -> dict[int, _Field]:
    table = _PARSE_TABLES.get(cls)
    if table is None:
        table = {
            number: _Field(
                b.name,
                b.spec,
                b.spec.kind.wire_type,
                _converter(b.spec.kind),
                b.spec.label is Label.REPEATED,
            )
            for number, b in schema(cls).items()
        }
        _PARSE_TABLES[cls] = table
    return table


def parse(
    cls: type[M],
    data: bytes,
    *,
    path: str | os.PathLike[str] = "<bytes>",
    offset: int = 0,
    entry: int | None = None,
) -> M:
    """Decode ``data`` as message ``cls``; ``path``/``offset``/``entry`` locate errors."""
    reader = _Reader(bytes(data), os.fspath(path), offset, entry)
    fields = _parse_table(cls)
    values: dict[str, Any] = {}
    pieces: dict[int, list[tuple[int, bytes]]] = {}  # sub-message occurrences, merged at the end
    unknown: list[RawField] = []
    size = reader.size
    while reader.pos < size:
        start = reader.pos
        key = reader.varint("field key")
        number, wire = key >> 3, key & 7
        if number == 0:
            raise reader.error("field number 0", start)
        field = fields.get(number)
        if wire == WT_VARINT:
            raw_value: int | bytes = reader.varint(f"field {number}")
            if field is not None and field.wire == WT_VARINT:
                convert = field.convert
                if field.repeated:
                    # unpacked repeated: the same key again and again; read the whole run
                    out = values.setdefault(field.name, [])
                    out.append(raw_value if convert is None else convert(raw_value))  # type: ignore[arg-type]
                    data = reader.data
                    while reader.pos < size and data[reader.pos] == key and key < 0x80:
                        reader.pos += 1
                        got = reader.varint(f"field {number}")
                        out.append(got if convert is None else convert(got))
                else:
                    values[field.name] = raw_value if convert is None else convert(raw_value)  # type: ignore[arg-type]
                continue
        elif wire == WT_FIXED64:
            raw_value = reader.fixed(8, f"field {number}")
        elif wire == WT_FIXED32:
            raw_value = reader.fixed(4, f"field {number}")
        elif wire == WT_LEN:
            raw_value = reader.chunk(f"field {number}", start)
            body_start = reader.pos - len(raw_value)
        else:
            raise reader.error(f"wire type {wire} (group or invalid) in field {number}", start)
        if field is None:
            unknown.append(RawField(number, reader.data[start : reader.pos]))
            continue
        spec = field.spec
        if spec.kind is Kind.MESSAGE:
            if wire != WT_LEN:
                raise reader.error(f"{field.name}: wire type {wire}, expected 2", start)
            assert isinstance(raw_value, bytes)
            pieces.setdefault(number, []).append((body_start, raw_value))
            continue
        if wire == WT_LEN and spec.kind not in (Kind.STRING, Kind.BYTES):
            if not field.repeated:
                raise reader.error(f"{field.name}: wire type 2 for a scalar field", start)
            assert isinstance(raw_value, bytes)
            ints = _read_packed(reader, spec.kind, body_start, raw_value)
            values.setdefault(field.name, []).extend(_scalar_from_int(spec.kind, v) for v in ints)
            continue
        if wire != field.wire:
            raise reader.error(f"{field.name}: wire type {wire}, expected {field.wire}", start)
        if spec.kind is Kind.STRING:
            assert isinstance(raw_value, bytes)
            try:
                value: Any = raw_value.decode("utf-8")
            except UnicodeDecodeError:
                raise reader.error(f"{field.name}: string is not UTF-8", start) from None
        elif spec.kind is Kind.BYTES:
            value = raw_value
        else:
            assert isinstance(raw_value, int)
            value = raw_value if field.convert is None else field.convert(raw_value)
        if field.repeated:
            values.setdefault(field.name, []).append(value)
        else:
            values[field.name] = value
    for number, occurrences in pieces.items():
        field = fields[number]
        sub_cls = field.spec.message
        assert sub_cls is not None
        if field.repeated:
            values[field.name] = [
                parse(sub_cls, body, path=reader.path, offset=offset + at, entry=entry)
                for at, body in occurrences
            ]
        else:
            merged = b"".join(body for _, body in occurrences)
            values[field.name] = parse(
                sub_cls, merged, path=reader.path, offset=offset + occurrences[0][0], entry=entry
            )
    for field in fields.values():
        if field.spec.label is Label.REQUIRED and field.name not in values:
            raise ImageError(
                reader.path,
                f"{cls.__name__}: required field {field.name} ({field.spec.number}) is missing",
                offset=offset,
                entry=entry,
            )
    unknown.sort(key=lambda raw: raw.number)  # the order build() writes them in (stable)
    return cls(unknown_fields=unknown, **values)


# --------------------------------------------------------------------------------------------
# writing


def varint_bytes(value: int) -> bytes:
    """The protobuf varint of an unsigned ``value`` (< 2**64): construct's ``VarInt`` is the
    definition (tests/test_formats_pb.py checks both agree), this loop the fast way."""
    if value < 0x80:
        return _SMALL[value]
    out = bytearray()
    while value >= 0x80:
        out.append((value & 0x7F) | 0x80)
        value >>= 7
    out.append(value)
    return bytes(out)


_SMALL = [bytes((n,)) for n in range(0x80)]


def _key(number: int, wire: int) -> bytes:
    return varint_bytes((number << 3) | wire)


def _length_delimited(body: bytes) -> bytes:
    return varint_bytes(len(body)) + body


def _encode_value(spec: FieldSpec, value: Any) -> bytes:
    kind = spec.kind
    if kind is Kind.MESSAGE:
        return _length_delimited(build(value))
    if kind is Kind.STRING:
        return _length_delimited(value.encode("utf-8"))
    if kind is Kind.BYTES:
        return _length_delimited(bytes(value))
    if kind is Kind.FIXED32:
        return (int(value) & _U32).to_bytes(4, "little")
    if kind is Kind.FIXED64:
        return (int(value) & _U64).to_bytes(8, "little")
    if kind in (Kind.SINT32, Kind.SINT64):
        v = int(value)
        return varint_bytes(((v << 1) ^ (v >> 63)) & _U64)
    if kind is Kind.BOOL:
        return _SMALL[1 if value else 0]
    # int32/int64/enum negatives are sign-extended to 64 bits (10 bytes), like protobuf-c.
    return varint_bytes(int(value) & _U64)


_KEYS: dict[type[Message], list[tuple[int, str, FieldSpec, bytes]]] = {}


def _build_table(cls: type[Message]) -> list[tuple[int, str, FieldSpec, bytes]]:
    table = _KEYS.get(cls)
    if table is None:
        table = [
            (number, b.name, b.spec, _key(number, b.spec.kind.wire_type))
            for number, b in schema(cls).items()
        ]
        _KEYS[cls] = table
    return table


def build(obj: Message) -> bytes:
    """Encode ``obj``: ascending field numbers, unknown fields merged back by number."""
    chunks: list[tuple[int, bytes]] = []
    for number, name, spec, key in _build_table(type(obj)):
        value = getattr(obj, name)
        if spec.label is Label.REPEATED:
            chunks.extend((number, key + _encode_value(spec, item)) for item in value)
        elif value is not None:
            chunks.append((number, key + _encode_value(spec, value)))
    if obj.unknown_fields:
        chunks.extend((raw.number, raw.raw) for raw in obj.unknown_fields)
        chunks.sort(key=lambda c: c[0])  # stable: repeated and unknown keep their order
    return b"".join(chunk for _, chunk in chunks)
