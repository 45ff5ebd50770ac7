"""How ckptctl prints API messages: JSON with every field (zeros, empty lists and false
included, as proto3 `always_print_fields_with_no_presence` gives them) and 64-bit integers
as JSON numbers (protobuf's JSON mapping writes them as strings), YAML the same data."""

from __future__ import annotations

import json
from typing import Any

from google.protobuf.descriptor import FieldDescriptor
from google.protobuf.message import Message

_INT64 = {
    FieldDescriptor.TYPE_INT64,
    FieldDescriptor.TYPE_UINT64,
    FieldDescriptor.TYPE_SINT64,
    FieldDescriptor.TYPE_FIXED64,
    FieldDescriptor.TYPE_SFIXED64,
}


def _value(fd: FieldDescriptor, v: Any) -> Any:
    if fd.type == FieldDescriptor.TYPE_MESSAGE:
        return to_dict(v)
    if fd.type == FieldDescriptor.TYPE_ENUM:
        return fd.enum_type.values_by_number[v].name if v in fd.enum_type.values_by_number else v
    if fd.type == FieldDescriptor.TYPE_BYTES:
        return v.hex()
    if fd.type in _INT64:
        return int(v)
    return v


def to_dict(m: Message) -> dict[str, Any]:
    """Every field of m: set or not (optional fields only when set), by proto field name."""
    out: dict[str, Any] = {}
    for fd in m.DESCRIPTOR.fields:
        v = getattr(m, fd.name)
        if fd.is_repeated:
            if fd.message_type is not None and fd.message_type.GetOptions().map_entry:
                vf = fd.message_type.fields_by_name["value"]
                out[fd.name] = {str(k): _value(vf, x) for k, x in v.items()}
            else:
                out[fd.name] = [_value(fd, x) for x in v]
        elif fd.has_presence and not m.HasField(fd.name):
            if fd.containing_oneof is None and fd.type == FieldDescriptor.TYPE_MESSAGE:
                out[fd.name] = to_dict(v)  # an unset sub-message: its fields, all default
        else:
            out[fd.name] = _value(fd, v)
    return out


def plain(x: Any) -> Any:
    if isinstance(x, Message):
        return to_dict(x)
    if isinstance(x, (list, tuple)):
        return [plain(i) for i in x]
    if isinstance(x, dict):
        return {k: plain(v) for k, v in x.items()}
    return x


def render(x: Any, fmt: str) -> str:
    """x (a message, a list of them, or a dict of those) as json or yaml."""
    data = plain(x)
    if fmt == "yaml":
        import yaml

        return yaml.safe_dump(data, sort_keys=False).rstrip()
    return json.dumps(data, indent=2)
