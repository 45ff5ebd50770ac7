"""A frozen picture of the registry for threads other than the event loop's (the metrics
server): the loop builds one after each change and publishes it by swapping one reference,
so a reader never sees a registry half-way through a change and never waits for the loop."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass

from ckpt_daemon.model import AgentInfo, CheckpointVersion, Instance, ShardState


@dataclass(frozen=True, slots=True)
class AgentView:
    node_id: str
    attached: bool
    last_seen: float
    # (device, ((phase, bytes/s), ...)) per device, sorted
    ceilings: tuple[tuple[int, tuple[tuple[str, float], ...]], ...]


@dataclass(frozen=True, slots=True)
class RegistryView:
    agents: tuple[AgentView, ...] = ()
    versions: tuple[tuple[str, int], ...] = ()  # (state name, versions), sorted
    store_bytes: tuple[tuple[str, int], ...] = ()  # (node, bytes held in stores), sorted
    ready_versions: int = 0
    instances_ready: int = 0
    instances_not_ready: int = 0

    @property
    def attached(self) -> int:
        return sum(a.attached for a in self.agents)


def build(
    agents: Iterable[AgentInfo],
    checkpoints: Iterable[CheckpointVersion],
    instances: Iterable[Instance],
) -> RegistryView:
    states: dict[str, int] = {}
    per_node: dict[str, int] = {}
    for cv in checkpoints:
        states[cv.state.name.lower()] = states.get(cv.state.name.lower(), 0) + 1
        for rank, sh in cv.shards.items():
            if sh.state != ShardState.LOST:
                per_node[rank.node_id] = per_node.get(rank.node_id, 0) + sh.nbytes
    insts = list(instances)
    return RegistryView(
        agents=tuple(
            AgentView(
                node_id=a.node_id,
                attached=a.attached,
                last_seen=a.last_seen,
                ceilings=tuple(
                    (d.index, tuple(sorted(d.ceilings.items())))
                    for d in sorted(a.devices, key=lambda d: d.index)
                ),
            )
            for a in sorted(agents, key=lambda a: a.node_id)
        ),
        versions=tuple(sorted(states.items())),
        store_bytes=tuple(sorted(per_node.items())),
        ready_versions=states.get("ready", 0),
        instances_ready=sum(i.ready for i in insts),
        instances_not_ready=sum(not i.ready for i in insts),
    )
