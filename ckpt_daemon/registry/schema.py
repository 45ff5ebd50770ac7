"""The registry's SQLite file: its tables, the migrations of files written by older ckptd,
and reading a file back into model objects (once, at start)."""

from __future__ import annotations

import json
import sqlite3
from dataclasses import dataclass, field

from ckpt_common.pieces import Piece
from ckpt_daemon.model import (
    AgentInfo,
    CheckpointState,
    CheckpointVersion,
    DeltaRef,
    DeviceInfo,
    Instance,
    Job,
    RankRef,
    Shard,
    ShardState,
    TensorInfo,
)
from ckpt_daemon.registry.serialize import instance_from_json, job_from_json, probe_from_json

DB_FILE = "registry.sqlite3"
U64 = (1 << 64) - 1

SCHEMA = """
CREATE TABLE IF NOT EXISTS checkpoints (
  name TEXT NOT NULL, version INTEGER NOT NULL, state INTEGER NOT NULL,
  created REAL NOT NULL, ready REAL NOT NULL, reason TEXT NOT NULL,
  PRIMARY KEY (name, version));
CREATE TABLE IF NOT EXISTS tensors (
  name TEXT NOT NULL, version INTEGER NOT NULL, idx INTEGER NOT NULL, tensor TEXT NOT NULL,
  dtype TEXT NOT NULL, shape TEXT NOT NULL, nbytes INTEGER NOT NULL, node TEXT NOT NULL,
  device INTEGER NOT NULL, store_offset INTEGER NOT NULL, path TEXT NOT NULL,
  file_offset INTEGER NOT NULL, checksum INTEGER, piece TEXT, delta TEXT,
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


def open_db(path: str) -> sqlite3.Connection:
    """The file at path with today's tables (older files migrated in place)."""
    db = sqlite3.connect(path, check_same_thread=False, isolation_level=None)
    db.execute("PRAGMA journal_mode=WAL")
    db.execute("PRAGMA synchronous=NORMAL")
    db.executescript(SCHEMA)
    cols = {row[1] for row in db.execute("PRAGMA table_info(tensors)")}
    if "checksum" not in cols:  # a registry written before checksums existed
        db.execute("ALTER TABLE tensors ADD COLUMN checksum INTEGER")
    if "piece" not in cols:  # a registry written before pieces existed
        db.execute("ALTER TABLE tensors ADD COLUMN piece TEXT")
    if "delta" not in cols:  # a registry written before delta stores existed
        db.execute("ALTER TABLE tensors ADD COLUMN delta TEXT")
    return db


@dataclass
class Loaded:
    """What a registry file holds, as it was written (load)."""

    checkpoints: dict[tuple[str, int], CheckpointVersion] = field(default_factory=dict)
    agents: dict[str, AgentInfo] = field(default_factory=dict)
    instances: dict[str, Instance] = field(default_factory=dict)
    jobs: dict[str, Job] = field(default_factory=dict)
    layouts: dict[str, list[dict]] = field(default_factory=dict)


def load(db: sqlite3.Connection) -> Loaded:
    out = Loaded()
    tensors = _tensors(db)
    shards = _shards(db)
    for name, version, state, created, ready, reason in db.execute(
        "SELECT name, version, state, created, ready, reason FROM checkpoints"
    ):
        key = (name, version)
        out.checkpoints[key] = CheckpointVersion(
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
        if (name, version) in out.checkpoints:
            out.checkpoints[name, version].probe = probe_from_json(json.loads(body))
    for node_id, host, devices, last_seen, version, pid, ipc_dir in db.execute(
        "SELECT node_id, host, devices, last_seen, version, pid, ipc_dir FROM agents"
    ):
        out.agents[node_id] = AgentInfo(
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
        out.instances[inst.name] = inst
    for (body,) in db.execute("SELECT body FROM jobs ORDER BY created"):
        job = job_from_json(json.loads(body))
        out.jobs[job.id] = job
    for lid, body in db.execute("SELECT id, body FROM layouts"):
        out.layouts[lid] = json.loads(body)
    return out


def _tensors(db: sqlite3.Connection) -> dict[tuple[str, int], list[TensorInfo]]:
    tensors: dict[tuple[str, int], list[TensorInfo]] = {}
    for row in db.execute(
        "SELECT name, version, tensor, dtype, shape, nbytes, node, device, store_offset, "
        "path, file_offset, checksum, piece, delta FROM tensors ORDER BY name, version, idx"
    ):
        name, version, tname, dtype, shape, nbytes, node, device, off, path, foff, csum = row[:12]
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
                checksum=None if csum is None else csum & U64,
                piece=None if box is None else Piece(tuple(box[0]), tuple(box[1])),
                delta=DeltaRef(*json.loads(row[13])) if row[13] else None,
            )
        )
    return tensors


def _shards(db: sqlite3.Connection) -> dict[tuple[str, int], dict[RankRef, Shard]]:
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
    return shards
