"""One rank's part of a broadcast update.

For bucket k: wait until its slot is free (the engine loaded bucket k - nbuf), agree with
every rank that nobody failed, copy the owner's bytes into the slot, broadcast the slot into
every rank's hand-off buffer, tell the engine. With nbuf >= 2 the broadcast of k+1 overlaps
the engine loading k. Before the first bucket every engine validates the tensor list; after
the last, every rank agrees on the outcome.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from ckpt.v1 import agent_pb2 as apb
from ckpt.v1 import ipc_pb2 as ipb
from ckpt.v1 import types_pb2 as tpb
from ckpt_agent.backend import Backend, Collective
from ckpt_agent.host_store import HostStore, StoreError
from ckpt_agent.receiver_link import LinkError, ReceiverLink
from ckpt_common.layers import layer_key

log = structlog.get_logger("ckpt_agent.pipeline")

OK, FAILED = 0, 1
PEER_FAILED = "another rank failed"


class UpdateFailed(Exception):
    pass


@dataclass
class Timer:
    copy_s: float = 0.0
    broadcast_s: float = 0.0
    reload_s: float = 0.0
    setup_s: float = 0.0
    marks: dict[str, float] = field(default_factory=dict)

    def pb(self, total: float) -> tpb.PhaseTimes:
        return tpb.PhaseTimes(
            copy_s=self.copy_s,
            broadcast_s=self.broadcast_s,
            reload_s=self.reload_s,
            setup_s=self.setup_s,
            total_s=total,
        )


def copy_flags(cmd: apb.RunUpdate) -> list[list[bool]]:
    """Per bucket entry: does the tensor's layer continue in a later bucket?"""
    last: dict[str, int] = {}
    for k, b in enumerate(cmd.buckets):
        for e in b.entries:
            last[layer_key(cmd.tensors[e.tensor].name)] = k
    return [
        [last[layer_key(cmd.tensors[e.tensor].name)] > k for e in b.entries]
        for k, b in enumerate(cmd.buckets)
    ]


def run_update(
    cmd: apb.RunUpdate,
    *,
    backend: Backend,
    stores: HostStore,
    link: ReceiverLink,
    group_store: Any,
    abort: threading.Event,
    progress: Callable[[int, int], None],
) -> tpb.RankResult:
    t0 = time.monotonic()
    timer = Timer()
    me = cmd.group_rank
    nbuf = max(1, cmd.nbuf)
    reason = ""
    sent_bytes = 0
    coll: Collective | None = None
    local_fail = ""
    told = False  # the engine already knows this update will not happen

    def check(flag_reason: str) -> None:
        """Everyone agrees; raises if anyone failed."""
        assert coll is not None
        nonlocal local_fail
        if abort.is_set() and not flag_reason:
            flag_reason = "aborted by ckptd"
        if flag_reason and not local_fail:
            local_fail = flag_reason
        worst = coll.agree(FAILED if local_fail else OK)
        if worst != OK:
            raise UpdateFailed(local_fail or PEER_FAILED)

    link.peer = None
    try:
        owns = any(b.owner == me for b in cmd.buckets)
        store_t = None
        if owns:
            store_t = backend.store_tensor(stores.get(cmd.checkpoint, cmd.version))
        buf_name, buf = backend.ipc_buffer(nbuf * cmd.bucket_bytes)
        coll = backend.new_group(group_store, me, cmd.world_size, cmd.timeout_s)
        # The engine: connect, describe the update, let it validate.
        problem = ""
        if cmd.is_target:
            try:
                begin = ipb.WorkerMessage(
                    begin=ipb.Begin(
                        job_id=cmd.job_id,
                        checkpoint=cmd.checkpoint,
                        version=cmd.version,
                        buffer=buf_name,
                        slot_bytes=cmd.bucket_bytes,
                        nbuf=nbuf,
                        bucket_count=len(cmd.buckets),
                        tensors=cmd.tensors,
                        partial=cmd.partial,
                        device=cmd.device,
                    )
                )
                deadline = time.monotonic() + cmd.receiver_timeout_s
                while True:  # a hello from an engine that has since gone is skipped
                    link.wait_hello(cmd.job_id, max(0.0, deadline - time.monotonic()), abort)
                    try:
                        link.send(begin)
                        break
                    except LinkError:
                        continue
                v = link.expect("validated", cmd.receiver_timeout_s, abort).validated
                if not v.ok:
                    problem = f"engine refused the update: {v.reason}"
            except LinkError as e:
                problem = str(e)
        timer.setup_s = time.monotonic() - t0
        try:
            check(problem)
        except UpdateFailed as e:
            if cmd.is_target and link.peer is not None:
                told = True
                try:
                    link.send(ipb.WorkerMessage(proceed=ipb.Proceed(ok=False, reason=str(e))))
                except LinkError:
                    pass
            raise
        if cmd.is_target:
            link.send(ipb.WorkerMessage(proceed=ipb.Proceed(ok=True)))

        flags = copy_flags(cmd) if cmd.is_target else []
        loaded = -1  # highest bucket the engine has loaded

        def wait_loaded(k: int) -> None:
            nonlocal loaded
            t = time.monotonic()
            while loaded < k:
                msg = link.expect("loaded", cmd.timeout_s, abort)
                loaded = max(loaded, msg.loaded.bucket)
                progress(msg.loaded.bucket, cmd.buckets[msg.loaded.bucket].nbytes)
            timer.reload_s += time.monotonic() - t

        for k, b in enumerate(cmd.buckets):
            slot = k % nbuf
            problem = ""
            if cmd.is_target and k >= nbuf:
                try:
                    wait_loaded(k - nbuf)
                except LinkError as e:
                    problem = str(e)
            check(problem)
            view = buf[slot * cmd.bucket_bytes : slot * cmd.bucket_bytes + b.nbytes]
            if b.owner == me:
                t = time.monotonic()
                assert store_t is not None
                for e in b.entries:
                    backend.copy(
                        view[e.bucket_offset : e.bucket_offset + e.nbytes],
                        store_t[e.store_offset : e.store_offset + e.nbytes],
                    )
                timer.copy_s += time.monotonic() - t
            t = time.monotonic()
            coll.broadcast(view, b.owner)
            backend.sync()
            timer.broadcast_s += time.monotonic() - t
            sent_bytes += b.nbytes
            if cmd.is_target:
                try:
                    link.send(
                        ipb.WorkerMessage(
                            bucket=ipb.BucketReady(
                                bucket=k,
                                slot=slot,
                                entries=[
                                    ipb.IpcTensor(
                                        tensor=e.tensor,
                                        offset=e.bucket_offset,
                                        nbytes=e.nbytes,
                                        chunk_offset=e.chunk_offset,
                                        copy=flags[k][i],
                                    )
                                    for i, e in enumerate(b.entries)
                                ],
                            )
                        )
                    )
                except LinkError as e:
                    local_fail = local_fail or str(e)
        problem = ""
        version_seen = 0
        if cmd.is_target:
            try:
                if cmd.buckets:
                    wait_loaded(len(cmd.buckets) - 1)
                link.send(ipb.WorkerMessage(end=ipb.End(ok=True)))
                done = link.expect("done", cmd.timeout_s, abort).done
                if not done.ok:
                    problem = f"engine failed: {done.reason}"
                version_seen = done.version
            except LinkError as e:
                problem = str(e)
        check(problem)
        log.info(
            "update_done",
            job=cmd.job_id,
            rank=me,
            buckets=len(cmd.buckets),
            bytes=sent_bytes,
            seconds=round(time.monotonic() - t0, 4),
            engine_version=version_seen,
        )
        return tpb.RankResult(ok=True, bytes=sent_bytes, times=timer.pb(time.monotonic() - t0))
    except (UpdateFailed, StoreError, LinkError) as e:
        reason = getattr(e, "message", None) or str(e)
    except Exception as e:  # gloo errors (a peer died, timeouts) land here
        reason = f"{type(e).__name__}: {e}"
    finally:
        if coll is not None:
            coll.close()
    if cmd.is_target and link.peer is not None and not told:
        try:
            link.send(ipb.WorkerMessage(end=ipb.End(ok=False, reason=reason)))
        except LinkError:
            pass
    log.warning("update_failed", job=cmd.job_id, rank=me, reason=reason)
    return tpb.RankResult(
        ok=False, reason=reason, bytes=sent_bytes, times=timer.pb(time.monotonic() - t0)
    )
