"""The registry: checkpoints, their tensor layout per rank, agents, instances and jobs.

In memory for reads, written through to SQLite under --state-dir so it survives a restart.
All methods are synchronous and thread-safe; callers on the event loop hand the heavy ones
(recording a whole checkpoint) to a thread.
"""

from __future__ import annotations

import functools
import hashlib
import json
import os
import sqlite3
import threading
import time
from collections.abc import Sequence
from dataclasses import asdict
from typing import Any

from ckpt_common.pieces import Piece
from ckpt_daemon.model import (
    AgentInfo,
    CheckpointState,
    CheckpointVersion,
    DeviceInfo,
    Instance,
    Job,
    JobState,
    RankRef,
    Shard,
    ShardState,
    TensorInfo,
    with_checksum,
)
from ckpt_daemon.plan.planner import MIRROR_PREFIX, rank_order
from ckpt_daemon.registry.serialize import (
    instance_from_json,
    instance_to_json,
    job_from_json,
    job_to_json,
    probe_from_json,
    tensor_rows,
)
from ckpt_daemon.registry.serialize import signed as _signed
from ckpt_daemon.registry.writer import DbWriter

DB_FILE = "registry.sqlite3"
_U64 = (1 << 64) - 1


_SCHEMA = """
CREATE TABLE IF NOT EXISTS checkpoints (
  name TEXT NOT NULL, version INTEGER NOT NULL, state INTEGER NOT NULL,
  created REAL NOT NULL, ready REAL NOT NULL, reason TEXT NOT NULL,
  PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS tensors (
  name TEXT NOT NULL, version INTEGER NOT NULL, idx INTEGER NOT NULL, tensor TEXT NOT NULL,
  dtype TEXT NOT NULL, shape TEXT NOT NULL, nbytes INTEGER NOT NULL, node TEXT NOT NULL,
  device INTEGER NOT NULL, store_offset INTEGER NOT NULL, path TEXT NOT NULL,
  file_offset INTEGER NOT NULL, checksum INTEGER, piece TEXT,
  PRIMARY KEY (name, version, idx));
CREATE TABLE IF NOT EXISTS shards (
  name TEXT NOT NULL, version INTEGER NOT NULL, node TEXT NOT NULL, device INTEGER NOT NULL,
  nbytes INTEGER NOT NULL, tensor_count INTEGER NOT NULL, state INTEGER NOT NULL,
  segment TEXT NOT NULL, reason TEXT NOT NULL, p2p_session TEXT NOT NULL,
  p2p_addr INTEGER NOT NULL, PRIMARY KEY (name, version, node, device));
CREATE TABLE IF NOT EXISTS probes (
  name TEXT NOT NULL, version INTEGER NOT NULL, body TEXT NOT NULL,
  PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS agents (
  node_id TEXT PRIMARY KEY, host TEXT NOT NULL, devices TEXT NOT NULL, last_seen REAL NOT NULL,
  version TEXT NOT NULL, pid INTEGER NOT NULL, ipc_dir TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS instances (
  name TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS layouts (
  id TEXT PRIMARY KEY, body TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS jobs (
  id TEXT PRIMARY KEY, created REAL NOT NULL, body TEXT NOT NULL);
"""


def _commits(method: Any) -> Any:
    """A registry call that writes: its statements (Registry._sql) are queued while the lock
    is held (the database changes in the order memory did) and waited for once the lock is
    let go; a call made inside another joins the outer call's transaction."""

    @functools.wraps(method)
    def call(self: Registry, *args: Any, **kwargs: Any) -> Any:
        if getattr(self._tl, "batch", None) is not None:
            return method(self, *args, **kwargs)
        self._tl.batch = []
        try:
            with self._lock:
                result = method(self, *args, **kwargs)
                done = self._writer.submit(self._tl.batch)
        finally:
            self._tl.batch = None
        done.result()
        return result

    return call


class Registry:
    def __init__(self, state_dir: str) -> None:
        os.makedirs(state_dir, exist_ok=True)
        self._lock = threading.RLock()
        self._db = sqlite3.connect(
            os.path.join(state_dir, DB_FILE), check_same_thread=False, isolation_level=None
        )
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        cols = {row[1] for row in self._db.execute("PRAGMA table_info(tensors)")}
        if "checksum" not in cols:  # a registry written before checksums existed
            self._db.execute("ALTER TABLE tensors ADD COLUMN checksum INTEGER")
        if "piece" not in cols:  # a registry written before pieces existed
            self._db.execute("ALTER TABLE tensors ADD COLUMN piece TEXT")
        self.checkpoints: dict[tuple[str, int], CheckpointVersion] = {}
        self.agents: dict[str, AgentInfo] = {}
        self.instances: dict[str, Instance] = {}
        self.jobs: dict[str, Job] = {}
        self._layouts: dict[str, list[dict]] = {}
        self._tl = threading.local()  # the statements of the call under way on this thread
        self._writer = DbWriter(self._db)  # the only user of the connection after _load
        self._load()

    def _sql(self, stmt: str, params: Sequence[Any] = ()) -> None:
        self._tl.batch.append((False, stmt, params))

    def _sql_many(self, stmt: str, rows: Sequence[Any]) -> None:
        self._tl.batch.append((True, stmt, rows))

    # ------------------------------------------------------------------ loading

    @_commits
    def _load(self) -> None:
        db = self._db
        tensors: dict[tuple[str, int], list[TensorInfo]] = {}
        for row in db.execute(
            "SELECT name, version, tensor, dtype, shape, nbytes, node, device, store_offset, "
            "path, file_offset, checksum, piece FROM tensors ORDER BY name, version, idx"
        ):
            name, version, tname, dtype, shape, nbytes, node, device, off, path, foff, csum = row[
                :12
            ]
            box = json.loads(row[12]) if row[12] else None
            tensors.setdefault((name, version), []).append(
                TensorInfo(
                    name=tname,
                    dtype=dtype,
                    shape=tuple(json.loads(shape)),
                    nbytes=nbytes,
                    owner=RankRef(node, device),
                    store_offset=off,
                    path=path,
                    file_offset=foff,
                    checksum=None if csum is None else csum & _U64,
                    piece=None if box is None else Piece(tuple(box[0]), tuple(box[1])),
                )
            )
        shards: dict[tuple[str, int], dict[RankRef, Shard]] = {}
        for row in db.execute(
            "SELECT name, version, node, device, nbytes, tensor_count, state, segment, reason, "
            "p2p_session, p2p_addr FROM shards"
        ):
            name, version, node, device, nbytes, count, state, segment, reason, sess, addr = row
            r = RankRef(node, device)
            shards.setdefault((name, version), {})[r] = Shard(
                owner=r,
                nbytes=nbytes,
                tensor_count=count,
                state=ShardState(state),
                segment=segment,
                reason=reason,
                p2p_session=sess,
                p2p_addr=addr,
            )
        for name, version, state, created, ready, reason in db.execute(
            "SELECT name, version, state, created, ready, reason FROM checkpoints"
        ):
            key = (name, version)
            self.checkpoints[key] = CheckpointVersion(
                name=name,
                version=version,
                state=CheckpointState(state),
                tensors=tensors.get(key, []),
                shards=shards.get(key, {}),
                created=created,
                ready=ready,
                reason=reason,
            )
        for name, version, body in db.execute("SELECT name, version, body FROM probes"):
            if (name, version) in self.checkpoints:
                self.checkpoints[name, version].probe = probe_from_json(json.loads(body))
        for node_id, host, devices, last_seen, version, pid, ipc_dir in db.execute(
            "SELECT node_id, host, devices, last_seen, version, pid, ipc_dir FROM agents"
        ):
            self.agents[node_id] = AgentInfo(
                node_id=node_id,
                host=host,
                devices=[DeviceInfo(**d) for d in json.loads(devices)],
                attached=False,
                last_seen=last_seen,
                version=version,
                pid=pid,
                ipc_dir=ipc_dir,
            )
        for (body,) in db.execute("SELECT body FROM instances"):
            inst = instance_from_json(json.loads(body))
            if inst.pending and inst.ready:  # a job was cut short: what it holds is unknown
                inst.ready = False
                inst.reason = f"ckptd restarted during job {inst.pending}: restoring"
            self.instances[inst.name] = inst
        now = time.time()
        for (body,) in db.execute("SELECT body FROM jobs ORDER BY created"):
            job = job_from_json(json.loads(body))
            if not job.state.done:
                job.state = JobState.FAILED
                job.reason = "ckptd restarted while the job ran"
                job.finished = now
                self._save_job(job)
            self.jobs[job.id] = job

    # ------------------------------------------------------------------ agents

    def rank_order(self, *, attached_only: bool = True) -> list[RankRef]:
        with self._lock:
            return rank_order(
                RankRef(a.node_id, d.index)
                for a in self.agents.values()
                if a.attached or not attached_only
                for d in a.devices
            )

    @_commits
    def agent_attached(
        self, info: AgentInfo, held: dict[tuple[str, int, int], tuple[int, str, int]]
    ) -> None:
        """Records an attaching agent and reconciles the shards it should hold.

        held maps (checkpoint, version, device) to (bytes, p2p session, p2p address) of
        what the agent still has.
        """
        with self._lock:
            self.agents[info.node_id] = info
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
            for cv in self.checkpoints.values():
                changed = False
                for r, shard in cv.shards.items():
                    if r.node_id != info.node_id or shard.state not in (
                        ShardState.READY,
                        ShardState.LOST,
                    ):
                        continue
                    have = held.get((cv.name, cv.version, r.device))
                    if have is None or have[0] != shard.nbytes:
                        if shard.state == ShardState.READY:
                            shard.state = ShardState.LOST
                            shard.reason = f"agent {info.node_id} no longer holds this shard"
                            changed = True
                        continue
                    if shard.state == ShardState.LOST:  # its agent is back and still holds it
                        shard.state, shard.reason = ShardState.READY, ""
                        shard.p2p_session, shard.p2p_addr = have[1], have[2]
                        changed = True
                    elif (have[1], have[2]) != (shard.p2p_session, shard.p2p_addr):
                        shard.p2p_session, shard.p2p_addr = have[1], have[2]
                        changed = True
                if changed:
                    self._save_shards(cv)
                    self._refresh_state(cv)

    def shard_keys(self, node_id: str) -> set[tuple[str, int, int]]:
        """(checkpoint, version, device) of every shard recorded on node_id, in any state."""
        with self._lock:
            return {
                (cv.name, cv.version, r.device)
                for cv in self.checkpoints.values()
                for r in cv.shards
                if r.node_id == node_id
            }

    def agent_detached(self, node_id: str) -> None:
        with self._lock:
            a = self.agents.get(node_id)
            if a:
                a.attached = False
                a.last_seen = time.time()

    def agent_heartbeat(
        self,
        node_id: str,
        free: dict[int, int],
        host_free: int = 0,
        ceilings: dict[int, dict[str, float]] | None = None,
    ) -> None:
        """Free memory now, and the ceilings of workers that (re)started since."""
        with self._lock:
            a = self.agents.get(node_id)
            if not a:
                return
            a.last_seen = time.time()
            a.host_free_bytes = max(0, host_free)
            for d in a.devices:
                if d.index in free:
                    d.free_bytes = free[d.index]
                if ceilings and d.index in ceilings:
                    d.ceilings = ceilings[d.index]

    def ceiling(self, r: RankRef, phase: str) -> float:
        """What r's device measured for phase (bytes/s); 0 when unknown."""
        with self._lock:
            a = self.agents.get(r.node_id)
            d = next((d for d in a.devices if d.index == r.device), None) if a else None
            return d.ceilings.get(phase, 0.0) if d else 0.0

    def free_bytes(self, r: RankRef) -> int:
        with self._lock:
            a = self.agents.get(r.node_id)
            if not a:
                return 0
            for d in a.devices:
                if d.index == r.device:
                    return d.free_bytes
            return 0

    # ------------------------------------------------------------------ checkpoints

    @_commits
    def add_checkpoint(self, cv: CheckpointVersion) -> None:
        rows = tensor_rows(cv)  # before the lock: it is held while the loop waits for it
        with self._lock:
            key = (cv.name, cv.version)
            if key in self.checkpoints:
                raise KeyError(key)
            self.checkpoints[key] = cv
            self._sql(
                "INSERT INTO checkpoints VALUES (?,?,?,?,?,?)",
                (cv.name, cv.version, int(cv.state), cv.created, cv.ready, cv.reason),
            )
            self._sql_many("INSERT INTO tensors VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?)", rows)
            if cv.probe is not None:
                self._sql(
                    "INSERT INTO probes VALUES (?,?,?)",
                    (cv.name, cv.version, json.dumps(asdict(cv.probe))),
                )
            self._save_shards(cv)

    def _save_shards(self, cv: CheckpointVersion) -> None:
        self._sql_many(
            "INSERT OR REPLACE INTO shards VALUES (?,?,?,?,?,?,?,?,?,?,?)",
            [
                (
                    cv.name,
                    cv.version,
                    s.owner.node_id,
                    s.owner.device,
                    s.nbytes,
                    s.tensor_count,
                    int(s.state),
                    s.segment,
                    s.reason,
                    s.p2p_session,
                    s.p2p_addr,
                )
                for s in cv.shards.values()
            ],
        )

    def _refresh_state(self, cv: CheckpointVersion) -> None:
        states = {s.state for s in cv.shards.values()}
        if ShardState.FAILED in states:
            new = CheckpointState.FAILED
        elif ShardState.LOST in states:
            new = CheckpointState.LOST
        elif states <= {ShardState.READY}:
            new = CheckpointState.READY
        else:
            new = CheckpointState.LOADING
        if new == CheckpointState.READY and not cv.ready:
            cv.ready = time.time()
        if new != CheckpointState.READY and cv.state != new:
            reasons = [s.reason for s in cv.shards.values() if s.reason]
            cv.reason = reasons[0] if reasons else cv.reason
        cv.state = new
        self._sql(
            "UPDATE checkpoints SET state=?, ready=?, reason=? WHERE name=? AND version=?",
            (int(cv.state), cv.ready, cv.reason, cv.name, cv.version),
        )

    @_commits
    def set_shard(
        self,
        name: str,
        version: int,
        r: RankRef,
        state: ShardState,
        segment: str = "",
        reason: str = "",
        p2p: tuple[str, int] = ("", 0),
    ) -> CheckpointVersion | None:
        with self._lock:
            cv = self.checkpoints.get((name, version))
            if not cv or r not in cv.shards:
                return None
            s = cv.shards[r]
            s.state, s.reason = state, reason
            if segment:
                s.segment = segment
            if p2p[0]:
                s.p2p_session, s.p2p_addr = p2p
            self._save_shards(cv)
            self._refresh_state(cv)
            return cv

    @_commits
    def set_checksums(self, name: str, version: int, r: RankRef, sums: list[int]) -> None:
        """Records the checksums an owner reported for its tensors, in the order they appear
        in the version's tensor list. A count that does not match records nothing."""
        with self._lock:
            cv = self.checkpoints.get((name, version))
            if not cv:
                return
            idx = [i for i, t in enumerate(cv.tensors) if t.owner == r]
            if len(idx) != len(sums):
                raise ValueError(f"{r} reported {len(sums)} checksums for {len(idx)} tensors")
            for i, c in zip(idx, sums, strict=True):
                cv.tensors[i] = with_checksum(cv.tensors[i], int(c) & _U64)
            self._sql_many(
                "UPDATE tensors SET checksum=? WHERE name=? AND version=? AND idx=?",
                [(_signed(c), name, version, i) for i, c in zip(idx, sums, strict=True)],
            )

    @_commits
    def fail_checkpoint(self, name: str, version: int, reason: str) -> None:
        with self._lock:
            cv = self.checkpoints.get((name, version))
            if not cv:
                return
            cv.state, cv.reason = CheckpointState.FAILED, reason
            self._sql(
                "UPDATE checkpoints SET state=?, reason=? WHERE name=? AND version=?",
                (int(cv.state), reason, name, version),
            )

    def get_checkpoint(self, name: str, version: int = 0) -> CheckpointVersion | None:
        """version 0: the newest READY version."""
        with self._lock:
            if version:
                return self.checkpoints.get((name, version))
            ready = [
                cv
                for (n, _), cv in self.checkpoints.items()
                if n == name and cv.state == CheckpointState.READY
            ]
            return max(ready, key=lambda c: c.version) if ready else None

    def versions(self, name: str) -> list[CheckpointVersion]:
        with self._lock:
            return sorted(
                (cv for (n, _), cv in self.checkpoints.items() if n == name),
                key=lambda c: c.version,
            )

    def list_checkpoints(self, name: str = "") -> list[CheckpointVersion]:
        """Every version of `name` (all names when empty; mirrors only when asked by name)."""
        with self._lock:
            return sorted(
                (
                    cv
                    for (n, _), cv in self.checkpoints.items()
                    if (n == name if name else not n.startswith(MIRROR_PREFIX))
                ),
                key=lambda c: (c.name, c.version),
            )

    @_commits
    def remove_checkpoint(self, name: str, version: int) -> CheckpointVersion | None:
        with self._lock:
            cv = self.checkpoints.pop((name, version), None)
            if cv:
                for table in ("checkpoints", "tensors", "shards", "probes"):
                    self._sql(f"DELETE FROM {table} WHERE name=? AND version=?", (name, version))
            return cv

    # ------------------------------------------------------------------ instances

    def counts(self) -> tuple[int, int]:
        """(attached agents, READY versions), consistent, for threads other than the loop's
        (the metrics server): every change to the registry's maps holds this lock."""
        with self._lock:
            attached = sum(a.attached for a in self.agents.values())
            ready = sum(cv.state == CheckpointState.READY for cv in self.checkpoints.values())
            return attached, ready

    @_commits
    def put_instance(self, inst: Instance) -> None:
        with self._lock:
            self.instances[inst.name] = inst
            self._sql(
                "INSERT OR REPLACE INTO instances VALUES (?,?)",
                (inst.name, json.dumps(instance_to_json(inst))),
            )

    @_commits
    def remove_agent(self, node_id: str) -> AgentInfo | None:
        """Forgets an agent; the shards it held are LOST."""
        with self._lock:
            a = self.agents.pop(node_id, None)
            if a is None:
                return None
            self._sql("DELETE FROM agents WHERE node_id=?", (node_id,))
            for cv in self.checkpoints.values():
                lost = [s for r, s in cv.shards.items() if r.node_id == node_id]
                for sh in lost:
                    if sh.state != ShardState.LOST:
                        sh.state, sh.reason = ShardState.LOST, f"agent {node_id} was removed"
                if lost:
                    self._save_shards(cv)
                    self._refresh_state(cv)
            return a

    @_commits
    def remove_instance(self, name: str) -> Instance | None:
        with self._lock:
            inst = self.instances.pop(name, None)
            if inst:
                self._sql("DELETE FROM instances WHERE name=?", (name,))
            return inst

    # ------------------------------------------------------------------ layouts

    @_commits
    def put_layout(self, maps: list[dict]) -> str:
        """Stores a sharding layout (each engine rank's map, vllm_ext.layout, in the
        instance's rank order) under its digest; instances of one layout share it."""
        body = json.dumps(maps, sort_keys=True, separators=(",", ":"))
        lid = hashlib.sha256(body.encode()).hexdigest()[:24]
        with self._lock:
            if lid not in self._layouts:
                self._sql("INSERT OR REPLACE INTO layouts VALUES (?,?)", (lid, body))
                self._layouts[lid] = json.loads(body)
        return lid

    def layout(self, lid: str) -> list[dict] | None:
        with self._lock:
            got = self._layouts.get(lid)
            if got is None and lid:
                row = self._writer.call(
                    lambda db: db.execute("SELECT body FROM layouts WHERE id=?", (lid,)).fetchone()
                )
                if row:
                    got = self._layouts[lid] = json.loads(row[0])
            return got

    # ------------------------------------------------------------------ jobs

    @_commits
    def put_job(self, job: Job) -> None:
        with self._lock:
            self.jobs[job.id] = job
            self._save_job(job)

    def _save_job(self, job: Job) -> None:
        self._sql(
            "INSERT OR REPLACE INTO jobs VALUES (?,?,?)",
            (job.id, job.created, json.dumps(job_to_json(job))),
        )

    def close(self) -> None:
        self._writer.close()
