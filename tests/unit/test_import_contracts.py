"""ckpt_daemon's rooms and the contracts between them (issue 22), read from the source:
the rooms import one another without a cycle, planning is pure, protobuf stays at the edges
(`api/` and `agents/`: no other room builds or reads a wire message), and the client and the
daemon start without torch."""

from __future__ import annotations

import ast
from collections import defaultdict
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2] / "ckpt_daemon"
PB_ROOMS = ("api", "agents")  # the edges: the only rooms that may import ckpt.v1
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
    found = sorted(
        str(p.relative_to(ROOT))
        for p in ROOT.rglob("*.py")
        if room_of(p) not in PB_ROOMS and any(m.startswith("ckpt.v1") for m in imports(p))
    )
    assert not found, f"protobuf in the core (build or read it in agents/ or api/): {found}"


def test_agent_commands_are_built_in_agents_only() -> None:
    """agents/commands.py is the only builder of agent commands (`Command(` of agent_pb2)."""
    builders = sorted(
        str(p.relative_to(ROOT))
        for p in ROOT.rglob("*.py")
        if "apb.Command(" in p.read_text() and p.relative_to(ROOT) != Path("agents/commands.py")
    )
    assert not builders, f"agent commands built outside agents/commands.py: {builders}"


PLAIN = {"model", "config", "__init__"}  # plain data and settings every room may read


def test_a_job_reaches_at_most_five_other_rooms() -> None:
    """jobs/ drives a job through the registry, the planner, the agents, the engines and the
    pushes it may stream from: nothing else (it once imported 12 of 28 modules)."""
    reached = room_graph()["jobs"] - PLAIN
    assert reached <= {"registry", "plan", "agents", "engines", "push"}, sorted(reached)
