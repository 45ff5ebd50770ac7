"""The registry: checkpoints, their tensor layout per rank, agents, instances and jobs.

One owner (owner.py): the event loop's thread reads and writes it; a write changes memory
at once and reaches the SQLite file under --state-dir behind it (`await synced()` waits for
the disk), so it survives a restart. Every change of state goes through the transition
tables (transitions.py): an illegal one raises and records nothing. Other threads read
`view`, a frozen picture published after each change (view.py). Instances are handed out
as copies: what an instance serves changes only through put_instance. Versions, their
shards and checksums: versions.py.
"""

from __future__ import annotations

import hashlib
import json
import os
import time
from dataclasses import asdict, replace

from ckpt_daemon.model import AgentInfo, DeviceInfo, Instance, Job, JobState, RankRef
from ckpt_daemon.plan.placement import rank_order
from ckpt_daemon.registry import schema, transitions
from ckpt_daemon.registry.owner import writes
from ckpt_daemon.registry.serialize import instance_to_json, job_to_json
from ckpt_daemon.registry.transitions import JOB, check
from ckpt_daemon.registry.versions import Versions, checksummed
from ckpt_daemon.registry.view import build

DB_FILE = schema.DB_FILE
__all__ = ["DB_FILE", "Registry", "checksummed"]


def _copy(inst: Instance) -> Instance:
    return replace(inst, ranks=list(inst.ranks), overlays=[dict(o) for o in inst.overlays])


class Registry(Versions):
    def __init__(self, state_dir: str) -> None:
        os.makedirs(state_dir, exist_ok=True)
        db = schema.open_db(os.path.join(state_dir, DB_FILE))
        got = schema.load(db)
        self._checkpoints = got.checkpoints
        self._agents = got.agents
        self._instances = got.instances
        self._jobs = got.jobs
        self._layouts = got.layouts
        super().__init__(db)
        self._recover()

    def _publish(self) -> None:
        self.view = build(
            self._agents.values(), self._checkpoints.values(), self._instances.values()
        )

    def counts(self) -> tuple[int, int]:
        """(attached agents, READY versions)."""
        return self.view.attached, self.view.ready_versions

    @writes
    def _recover(self) -> None:
        """What a restart cut short: an instance a job was changing is not ready (ckptd
        restores it); a job that had not ended failed."""
        for inst in self._instances.values():
            if inst.pending and inst.ready:
                inst.ready = False
                inst.reason = f"ckptd restarted during job {inst.pending}: restoring"
        for job in self._jobs.values():
            if not job.state.done:
                self.move_job(job, JobState.FAILED, "ckptd restarted while the job ran")

    # ------------------------------------------------------------------ agents

    def agents(self) -> list[AgentInfo]:
        return list(self._agents.values())

    def agent(self, node_id: str) -> AgentInfo | None:
        return self._agents.get(node_id)

    def rank_order(self, *, attached_only: bool = True) -> list[RankRef]:
        return rank_order(
            RankRef(a.node_id, d.index)
            for a in self._agents.values()
            if a.attached or not attached_only
            for d in a.devices
        )

    @writes
    def agent_attached(
        self, info: AgentInfo, held: dict[tuple[str, int, int], tuple[int, str, int]]
    ) -> None:
        """Records an attaching agent and reconciles the shards it should hold.

        held maps (checkpoint, version, device) to (bytes, p2p session, p2p address) of
        what the agent still has.
        """
        self._agents[info.node_id] = info
        self._sql(
            "INSERT OR REPLACE INTO agents VALUES (?,?,?,?,?,?,?)",
            (
                info.node_id,
                info.host,
                json.dumps([asdict(d) for d in info.devices]),
                info.last_seen,
                info.version,
                info.pid,
                info.ipc_dir,
            ),
        )
        self._shards_held(info.node_id, held)

    @writes
    def agent_detached(self, node_id: str) -> None:
        a = self._agents.get(node_id)
        if a:
            a.attached = False
            a.last_seen = time.time()

    @writes
    def agent_heartbeat(
        self,
        node_id: str,
        free: dict[int, int],
        host_free: int = 0,
        ceilings: dict[int, dict[str, float]] | None = None,
    ) -> None:
        """Free memory now, and the ceilings of workers that (re)started since."""
        a = self._agents.get(node_id)
        if not a:
            return
        a.last_seen = time.time()
        a.host_free_bytes = max(0, host_free)
        for d in a.devices:
            if d.index in free:
                d.free_bytes = free[d.index]
            if ceilings and d.index in ceilings:
                d.ceilings = ceilings[d.index]

    def _device(self, r: RankRef) -> DeviceInfo | None:
        a = self._agents.get(r.node_id)
        return next((d for d in a.devices if d.index == r.device), None) if a else None

    def ceiling(self, r: RankRef, phase: str) -> float:
        """What r's device measured for phase (bytes/s); 0 when unknown."""
        d = self._device(r)
        return d.ceilings.get(phase, 0.0) if d else 0.0

    def free_bytes(self, r: RankRef) -> int:
        d = self._device(r)
        return d.free_bytes if d else 0

    def device_kind(self, r: RankRef) -> str:
        d = self._device(r)
        return d.kind if d else "cpu"

    @writes
    def remove_agent(self, node_id: str) -> AgentInfo | None:
        """Forgets an agent; the shards it held are LOST (a FAILED one stays FAILED)."""
        a = self._agents.pop(node_id, None)
        if a is None:
            return None
        self._sql("DELETE FROM agents WHERE node_id=?", (node_id,))
        self._shards_lost(node_id, f"agent {node_id} was removed")
        return a

    # ------------------------------------------------------------------ instances

    def instances(self) -> list[Instance]:
        """Copies: a change is recorded with put_instance."""
        return [_copy(i) for i in self._instances.values()]

    def instance(self, name: str) -> Instance | None:
        inst = self._instances.get(name)
        return None if inst is None else _copy(inst)

    @writes
    def put_instance(self, inst: Instance) -> None:
        transitions.check_instance(self._instances.get(inst.name), inst)
        self._instances[inst.name] = _copy(inst)
        self._sql(
            "INSERT OR REPLACE INTO instances VALUES (?,?)",
            (inst.name, json.dumps(instance_to_json(inst))),
        )

    @writes
    def remove_instance(self, name: str) -> Instance | None:
        inst = self._instances.pop(name, None)
        if inst:
            self._sql("DELETE FROM instances WHERE name=?", (name,))
        return inst

    # ------------------------------------------------------------------ layouts

    @writes
    def put_layout(self, maps: list[dict]) -> str:
        """Stores a sharding layout (each engine rank's map, vllm_ext.layout, in the
        instance's rank order) under its digest; instances of one layout share it."""
        body = json.dumps(maps, sort_keys=True, separators=(",", ":"))
        lid = hashlib.sha256(body.encode()).hexdigest()[:24]
        if lid not in self._layouts:
            self._sql("INSERT OR REPLACE INTO layouts VALUES (?,?)", (lid, body))
            self._layouts[lid] = json.loads(body)
        return lid

    def layout(self, lid: str) -> list[dict] | None:
        return self._layouts.get(lid) if lid else None

    def engine_layouts(self) -> list[list[dict]]:
        """The layout of each registered instance that reported one (never changed once
        stored: safe to hand to a thread)."""
        return [
            self._layouts[i.layout] for i in self._instances.values() if i.layout in self._layouts
        ]

    # ------------------------------------------------------------------ jobs

    def jobs(self) -> list[Job]:
        return list(self._jobs.values())

    def job(self, job_id: str) -> Job | None:
        return self._jobs.get(job_id)

    @writes
    def put_job(self, job: Job) -> None:
        """A new job, or what a recorded one has done since (its state moves with
        move_job)."""
        old = self._jobs.get(job.id)
        if old is not None and old is not job:
            raise transitions.IllegalTransition(f"job {job.id} is recorded already")
        self._jobs[job.id] = job
        self._save_job(job)

    @writes
    def move_job(self, job: Job, state: JobState, reason: str | None = None) -> None:
        """job's next state (the transition table's), recorded."""
        check(JOB, f"job {job.id}", job.state, state)
        job.state = state
        if reason is not None:
            job.reason = reason
        if state == JobState.RUNNING:
            job.started = time.time()
        elif state.done:
            job.finished = time.time()
        if job.id in self._jobs:
            self._save_job(job)

    def _save_job(self, job: Job) -> None:
        self._sql(
            "INSERT OR REPLACE INTO jobs VALUES (?,?,?)",
            (job.id, job.created, json.dumps(job_to_json(job))),
        )
