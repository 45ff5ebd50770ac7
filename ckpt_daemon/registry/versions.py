"""The versions a registry holds: each version's tensors and shards, its state (from its
shards', by the transition tables), the checksums its owners or trainer reported."""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import asdict

from ckpt_daemon.model import (
    CheckpointState,
    CheckpointVersion,
    RankRef,
    ShardState,
    TensorInfo,
    with_checksum,
)
from ckpt_daemon.plan.placement import HIDDEN_PREFIX
from ckpt_daemon.registry import schema
from ckpt_daemon.registry.owner import Owned, writes
from ckpt_daemon.registry.serialize import shard_rows, signed, tensor_rows
from ckpt_daemon.registry.transitions import SHARD, VERSION, IllegalTransition, check, version_state


def checksummed(
    tensors: Sequence[TensorInfo], r: RankRef, sums: Sequence[int]
) -> list[tuple[int, TensorInfo]]:
    """(index, tensor with its checksum) for r's tensors, given r's checksums in the order
    its tensors appear (pure: a million tensors take a thread). ValueError: a count unlike
    r's tensors."""
    idx = [i for i, t in enumerate(tensors) if t.owner == r]
    if len(idx) != len(sums):
        raise ValueError(f"{r} reported {len(sums)} checksums for {len(idx)} tensors")
    return [
        (i, with_checksum(tensors[i], int(c) & schema.U64)) for i, c in zip(idx, sums, strict=True)
    ]


class Versions(Owned):
    _checkpoints: dict[tuple[str, int], CheckpointVersion]

    def checkpoints(self) -> list[CheckpointVersion]:
        return list(self._checkpoints.values())

    def checkpoint(self, name: str, version: int) -> CheckpointVersion | None:
        return self._checkpoints.get((name, version))

    def has_checkpoint(self, name: str, version: int) -> bool:
        return (name, version) in self._checkpoints

    def checkpoint_keys(self) -> set[tuple[str, int]]:
        return set(self._checkpoints)

    def get_checkpoint(self, name: str, version: int = 0) -> CheckpointVersion | None:
        """version 0: the newest READY version."""
        if version:
            return self._checkpoints.get((name, version))
        ready = [
            cv
            for (n, _), cv in self._checkpoints.items()
            if n == name and cv.state == CheckpointState.READY
        ]
        return max(ready, key=lambda c: c.version) if ready else None

    def versions(self, name: str) -> list[CheckpointVersion]:
        return sorted(
            (cv for (n, _), cv in self._checkpoints.items() if n == name),
            key=lambda c: c.version,
        )

    def list_checkpoints(self, name: str = "") -> list[CheckpointVersion]:
        """Every version of `name` (all names when empty; hidden ones, mirrors and delta
        stores, only when asked by name)."""
        return sorted(
            (
                cv
                for (n, _), cv in self._checkpoints.items()
                if (n == name if name else not n.startswith(HIDDEN_PREFIX))
            ),
            key=lambda c: (c.name, c.version),
        )

    @writes
    def add_checkpoint(self, cv: CheckpointVersion, rows: list[tuple] | None = None) -> None:
        """A new version. rows: tensor_rows(cv), made ahead off the loop for a big one."""
        key = (cv.name, cv.version)
        if key in self._checkpoints:
            raise KeyError(key)
        if cv.state != CheckpointState.LOADING and cv.state != version_state(
            s.state for s in cv.shards.values()
        ):
            raise IllegalTransition(
                f"version {cv.name}@{cv.version}: {cv.state.name} unlike its shards"
            )
        self._checkpoints[key] = cv
        self._sql(
            "INSERT INTO checkpoints VALUES (?,?,?,?,?,?)",
            (cv.name, cv.version, int(cv.state), cv.created, cv.ready, cv.reason),
        )
        self._sql_many(
            "INSERT INTO tensors VALUES (?,?,?,?,?,?,?,?,?,?,?,?,?,?,?)",
            tensor_rows(cv) if rows is None else rows,
        )
        if cv.probe is not None:
            self._sql(
                "INSERT INTO probes VALUES (?,?,?)",
                (cv.name, cv.version, json.dumps(asdict(cv.probe))),
            )
        self._save_shards(cv)

    def _save_shards(self, cv: CheckpointVersion) -> None:
        self._sql_many(
            "INSERT OR REPLACE INTO shards VALUES (?,?,?,?,?,?,?,?,?,?,?)", shard_rows(cv)
        )

    def _refresh_state(self, cv: CheckpointVersion) -> None:
        new = version_state(s.state for s in cv.shards.values())
        if cv.state == CheckpointState.FAILED:  # failed by name (fail_checkpoint): the end
            new = CheckpointState.FAILED
        check(VERSION, f"version {cv.name}@{cv.version}", cv.state, new)
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

    @writes
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
        cv = self._checkpoints.get((name, version))
        if not cv or r not in cv.shards:
            return None
        s = cv.shards[r]
        check(SHARD, f"shard {r} of {name}@{version}", s.state, state)
        s.state, s.reason = state, reason
        if segment:
            s.segment = segment
        if p2p[0]:
            s.p2p_session, s.p2p_addr = p2p
        self._save_shards(cv)
        self._refresh_state(cv)
        return cv

    @writes
    def put_checksums(self, cv: CheckpointVersion, got: list[tuple[int, TensorInfo]]) -> None:
        """Records checksummed(...) made for cv (off the loop for a big version); nothing
        when cv is no longer the registry's."""
        if self._checkpoints.get((cv.name, cv.version)) is not cv:
            return
        for i, t in got:
            cv.tensors[i] = t
        self._sql_many(
            "UPDATE tensors SET checksum=? WHERE name=? AND version=? AND idx=?",
            [(signed(t.checksum), cv.name, cv.version, i) for i, t in got],
        )

    @writes
    def fail_checkpoint(self, name: str, version: int, reason: str) -> None:
        cv = self._checkpoints.get((name, version))
        if not cv:
            return
        check(VERSION, f"version {name}@{version}", cv.state, CheckpointState.FAILED)
        cv.state, cv.reason = CheckpointState.FAILED, reason
        self._sql(
            "UPDATE checkpoints SET state=?, reason=? WHERE name=? AND version=?",
            (int(cv.state), reason, name, version),
        )

    @writes
    def remove_checkpoint(self, name: str, version: int) -> CheckpointVersion | None:
        cv = self._checkpoints.pop((name, version), None)
        if cv:
            for table in ("checkpoints", "tensors", "shards", "probes"):
                self._sql(f"DELETE FROM {table} WHERE name=? AND version=?", (name, version))
        return cv

    def _shards_held(
        self, node_id: str, held: dict[tuple[str, int, int], tuple[int, str, int]]
    ) -> None:
        """node_id's agent (re)attached holding `held` ((checkpoint, version, device) ->
        (bytes, p2p session, p2p address)): its READY shards it no longer holds are LOST,
        its LOST ones it holds again are READY."""
        for cv in self._checkpoints.values():
            changed = False
            for r, shard in cv.shards.items():
                if r.node_id != node_id or shard.state not in (ShardState.READY, ShardState.LOST):
                    continue
                have = held.get((cv.name, cv.version, r.device))
                if have is None or have[0] != shard.nbytes:
                    if shard.state == ShardState.READY:
                        shard.state = ShardState.LOST
                        shard.reason = f"agent {node_id} no longer holds this shard"
                        changed = True
                    continue
                if shard.state == ShardState.LOST:  # its agent is back and still holds it
                    shard.state, shard.reason = ShardState.READY, ""
                    changed = True
                changed |= (have[1], have[2]) != (shard.p2p_session, shard.p2p_addr)
                shard.p2p_session, shard.p2p_addr = have[1], have[2]
            if changed:
                self._save_shards(cv)
                self._refresh_state(cv)

    def _shards_lost(self, node_id: str, why: str) -> None:
        """Every shard on node_id is LOST (a FAILED one stays FAILED)."""
        for cv in self._checkpoints.values():
            lost = [s for r, s in cv.shards.items() if r.node_id == node_id]
            for sh in lost:
                if sh.state not in (ShardState.LOST, ShardState.FAILED):
                    sh.state, sh.reason = ShardState.LOST, why
            if lost:
                self._save_shards(cv)
                self._refresh_state(cv)

    def shard_keys(self, node_id: str) -> set[tuple[str, int, int]]:
        """(checkpoint, version, device) of every shard recorded on node_id, in any state."""
        return {
            (cv.name, cv.version, r.device)
            for cv in self._checkpoints.values()
            for r in cv.shards
            if r.node_id == node_id
        }
