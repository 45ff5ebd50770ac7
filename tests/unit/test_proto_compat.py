"""No breaking change to the public protos: the current ckptd.proto and types.proto keep
every message field (number, type, label), enum value and RPC of the last release
(proto/ckpt/v1/released.json, written by scripts/proto_snapshot.py --write at a release).
Additions are fine.

agent.proto and ipc.proto are exempt on purpose: they are internal protocols (ckptd <->
its agents, a worker <-> its engine) that ship together in one release, so their fields may
be regrouped and renumbered between releases (as RunUpdate was)."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path
from typing import Any

REPO = Path(__file__).resolve().parents[2]


def _snapshot_module() -> Any:
    spec = importlib.util.spec_from_file_location(
        "proto_snapshot", REPO / "scripts" / "proto_snapshot.py"
    )
    assert spec is not None and spec.loader is not None
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def breaking_changes(released: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """What a client of `released` would break on in `now`."""
    out = []
    for msg, fields in released["messages"].items():
        cur = now["messages"].get(msg)
        if cur is None:
            out.append(f"message {msg} removed")
            continue
        for name, was in fields.items():
            if name not in cur:
                out.append(f"{msg}.{name} removed")
            elif cur[name] != was:
                out.append(f"{msg}.{name} changed: {was} -> {cur[name]}")
    for enum, values in released["enums"].items():
        cur = now["enums"].get(enum)
        if cur is None:
            out.append(f"enum {enum} removed")
            continue
        for name, number in values.items():
            if cur.get(name) != number:
                out.append(f"{enum}.{name} removed or renumbered")
    for svc, methods in released["services"].items():
        cur = now["services"].get(svc, {})
        for name, sig in methods.items():
            if cur.get(name) != sig:
                out.append(f"rpc {svc}.{name} removed or changed: {sig} -> {cur.get(name)}")
    return out


def test_the_public_protos_keep_what_the_last_release_had() -> None:
    mod = _snapshot_module()
    released = json.loads(mod.SNAPSHOT.read_text())
    assert breaking_changes(released, mod.snapshot()) == []


def test_the_check_sees_a_removed_field_a_new_number_and_a_lost_enum_value() -> None:
    released = {
        "messages": {"m.A": {"x": [1, "int64", "singular"], "y": [2, "string", "singular"]}},
        "enums": {"m.E": {"E_ZERO": 0, "E_ONE": 1}},
        "services": {"m.S": {"Get": ["m.A", "m.A"]}},
    }
    now = {
        "messages": {
            "m.A": {"x": [3, "int64", "singular"], "z": [4, "bool", "singular"]},
            "m.B": {"w": [1, "int32", "singular"]},  # new: fine
        },
        "enums": {"m.E": {"E_ZERO": 0, "E_TWO": 2}},
        "services": {"m.S": {"Get": ["m.A", "stream m.A"]}},
    }
    got = breaking_changes(released, now)
    assert got == [
        "m.A.x changed: [1, 'int64', 'singular'] -> [3, 'int64', 'singular']",
        "m.A.y removed",
        "m.E.E_ONE removed or renumbered",
        "rpc m.S.Get removed or changed: ['m.A', 'm.A'] -> ['m.A', 'stream m.A']",
    ]
    assert breaking_changes(released, released) == []
