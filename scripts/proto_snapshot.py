"""Writes (or prints) the public protos' shape: every message's fields as name ->
[number, type, label], every enum's values, every service's methods. Committed as
proto/ckpt/v1/released.json at a release; tests/unit/test_proto_compat.py compares the current
descriptors against it and fails on what would break a client of that release.

Only the public API is snapshot: ckptd.proto (the Ckpt service and its messages) and
types.proto. agent.proto and ipc.proto are internal (ckptd, its agents and the engine
extension ship together, one release), free to change.

    python scripts/proto_snapshot.py [--write]
"""

from __future__ import annotations

import json
import sys
from pathlib import Path
from typing import Any

from google.protobuf.descriptor import Descriptor, EnumDescriptor, FieldDescriptor

PUBLIC = ("ckpt.v1.ckptd_pb2", "ckpt.v1.types_pb2")
SNAPSHOT = Path(__file__).resolve().parent.parent / "proto" / "ckpt" / "v1" / "released.json"

_TYPE_NAMES = {
    v: k[len("TYPE_") :].lower() for k, v in vars(FieldDescriptor).items() if k.startswith("TYPE_")
}


def _type(f: FieldDescriptor) -> str:
    if f.message_type is not None:
        return f.message_type.full_name
    if f.enum_type is not None:
        return f.enum_type.full_name
    return _TYPE_NAMES[f.type]


def _label(f: FieldDescriptor) -> str:
    if f.is_repeated:
        return "repeated"
    oneof = f.containing_oneof
    if oneof is not None and not oneof.name.startswith("_"):  # not proto3 `optional`
        return f"oneof {oneof.name}"
    return "optional" if f.has_presence and f.message_type is None else "singular"


def _enum(e: EnumDescriptor) -> dict[str, int]:
    return {v.name: v.number for v in e.values}


def _message(m: Descriptor, out: dict[str, Any]) -> None:
    out["messages"][m.full_name] = {f.name: [f.number, _type(f), _label(f)] for f in m.fields}
    for e in m.enum_types:
        out["enums"][e.full_name] = _enum(e)
    for n in m.nested_types:
        _message(n, out)


def snapshot() -> dict[str, Any]:
    """The current public descriptors, as released.json holds them."""
    import importlib

    out: dict[str, Any] = {"messages": {}, "enums": {}, "services": {}}
    for name in PUBLIC:
        fd = importlib.import_module(name).DESCRIPTOR
        for m in fd.message_types_by_name.values():
            _message(m, out)
        for e in fd.enum_types_by_name.values():
            out["enums"][e.full_name] = _enum(e)
        for s in fd.services_by_name.values():
            out["services"][s.full_name] = {
                m.name: [
                    ("stream " if m.client_streaming else "") + m.input_type.full_name,
                    ("stream " if m.server_streaming else "") + m.output_type.full_name,
                ]
                for m in s.methods
            }
    return out


def main() -> None:
    text = json.dumps(snapshot(), indent=1, sort_keys=True) + "\n"
    if "--write" in sys.argv[1:]:
        SNAPSHOT.write_text(text)
        print(f"wrote {SNAPSHOT}")
    else:
        sys.stdout.write(text)


if __name__ == "__main__":
    main()
