"""One rank's part of a broadcast update.

Three stages overlap, ordered by events rather than host waits (CUDA):
  H2D        the owner copies its next buckets from the pinned host store into staging slots
             (copy stream; up to `nstage` of its own buckets ahead),
  broadcast  bucket k goes from the owner's staging slot into every rank's hand-off slot
             (comm stream, after a one-int all-reduce of everyone's failure flag),
  reload     the engine loads bucket k - 1 from its slot while k is broadcast.
The host waits only for bucket k - lag's broadcast to finish before telling the engine, and
for the engine to free a slot before reusing it. On CPU every stage is synchronous (lag 0,
no staging), which is the serial fallback too.

Failure agreement: each bucket's all-reduce carries every rank's flag, and every rank reads
bucket j's flag at the same point (after issuing bucket j + lag), so all ranks stop after
the same bucket with the same collectives issued: no rank is left waiting in NCCL. The cost
is one tiny all-reduce per bucket, on the comm stream, with no extra host sync.
Before the first bucket every engine validates the tensor list; after the last, every rank
agrees on the outcome (two host-synchronous agreements per update).

Deadlines are per step, not per job (`StepDeadlines`): each wait for the engine and each
collective gets seconds derived from the bytes it moves, so a frozen or dead peer fails the
update in seconds. A rank that fails publishes its reason to the group (group_abort.py) and
every other rank's waits end at once, collectives included.
"""

from __future__ import annotations

import os
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

import structlog

from ckpt.v1 import agent_pb2 as apb
from ckpt.v1 import ipc_pb2 as ipb
from ckpt.v1 import types_pb2 as tpb
from ckpt_agent.backend import Backend, Collective, Done, InFlight
from ckpt_agent.group_abort import PEER_FAILED
from ckpt_agent.host_store import HostStore, StoreError
from ckpt_agent.receiver_link import LinkError, ReceiverLink
from ckpt_common.layers import layer_key

log = structlog.get_logger("ckpt_agent.pipeline")

OK, FAILED = 0, 1
MERGE_GAP = 4096  # entries this close, laid out alike, are copied as one range
DRAIN_S = 30.0
STEP_TIMEOUT_ENV = "CKPT_STEP_TIMEOUT_S"  # base seconds of one step (engine or collective)
STEP_S = 5.0
STEP_RATE = 100e6  # bytes/s a step moves at the least (its deadline grows with its size)
DONE_RATE = 1e9  # bytes/s of the engine's post-load processing at the least


@dataclass(frozen=True, kw_only=True)
class StepDeadlines:
    """Seconds each step of one update may take: a frozen or dead peer (engine, rank) is
    noticed after one step's deadline, never the whole job's. Capped by the job's end."""

    base_s: float
    job_end: float  # time.monotonic() at which the whole job must be over
    first_s: float  # the first agreement also waits for every engine to connect

    def __post_init__(self) -> None:
        if self.base_s <= 0:
            raise ValueError("a step's base deadline must be positive")

    @staticmethod
    def for_update(cmd: apb.RunUpdate, t0: float) -> StepDeadlines:
        base = float(os.environ.get(STEP_TIMEOUT_ENV, "") or STEP_S)
        return StepDeadlines(
            base_s=base, job_end=t0 + cmd.timeout_s, first_s=cmd.receiver_timeout_s + 2 * base
        )

    def _cap(self, s: float) -> float:
        return max(0.1, min(s, self.job_end - time.monotonic()))

    def engine(self, nbytes: int) -> float:
        """The engine loading one bucket."""
        return self._cap(self.base_s + nbytes / STEP_RATE)

    def engine_done(self, nbytes: int) -> float:
        """The engine's post-load processing (after the last bucket)."""
        return self._cap(self.base_s + nbytes / DONE_RATE)

    def collective(self, nbytes: int) -> float:
        """One agreement + broadcast: a peer may first wait for its own engine's step."""
        return self._cap(2 * self.base_s + 2 * nbytes / STEP_RATE)


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


def coalesce(entries: Any) -> list[tuple[int, int, int]]:
    """Copy ranges (bucket offset, store offset, bytes): consecutive entries laid out the same
    way in the store and the bucket become one copy (the padding between them rides along)."""
    out: list[list[int]] = []
    for e in sorted(entries, key=lambda e: e.bucket_offset):
        if e.nbytes == 0:
            continue
        if out:
            d, o, n = out[-1]
            gap = e.bucket_offset - (d + n)
            if 0 <= gap < MERGE_GAP and e.store_offset - o == e.bucket_offset - d:
                out[-1][2] = e.bucket_offset + e.nbytes - d
                continue
        out.append([e.bucket_offset, e.store_offset, e.nbytes])
    return [(d, o, n) for d, o, n in out]


def _per_entry(entries: Any) -> list[tuple[int, int, int]]:
    return [(e.bucket_offset, e.store_offset, e.nbytes) for e in entries]


def _elapsed(pairs: list[tuple[Any, Any]]) -> float:
    total = 0.0
    for t0, t1 in pairs:
        if t0 is not None and t1 is not None:
            try:
                total += t0.elapsed_time(t1) / 1000.0
            except RuntimeError:
                pass
    return total


class _Legacy:
    """Adapts a backend with only the one-copy interface (copy/sync/broadcast, e.g. the P2P
    reader) to the staged one: serial, per-entry copies, host-synchronous steps."""

    def __init__(self, inner: Any) -> None:
        self._inner = inner
        self.kind = inner.kind

    def store_tensor(self, store: Any) -> Any:
        return self._inner.store_tensor(store)

    def plan_slots(self, nbuf: int, bucket_bytes: int, owns: bool) -> tuple[int, int]:
        return nbuf, 0

    def ipc_buffer(self, nbytes: int, share: bool = True) -> tuple[str, Any]:
        return self._inner.ipc_buffer(nbytes)

    def device_buffer(self, nbytes: int) -> Any:
        raise NotImplementedError

    def h2d(self, dst: Any, src: Any, ranges: list[tuple[int, int, int]], after: list[Any]) -> Any:
        for d, o, n in ranges:
            self._inner.copy(dst[d : d + n], src[o : o + n])
        return None, None

    def end_update(self, shared_never_opened: bool = False) -> None:
        fn = getattr(self._inner, "end_update", None)
        if fn is not None:
            fn(shared_never_opened)

    def new_group(
        self, store: Any, rank: int, world: int, timeout_s: float, job_id: str = ""
    ) -> Collective:
        return _LegacyCollective(self._inner.new_group(store, rank, world, timeout_s), self._inner)


class _LegacyCollective:
    def __init__(self, inner: Any, backend: Any) -> None:
        self._inner = inner
        self._backend = backend

    def broadcast(self, tensor: Any, root: int) -> None:
        self._inner.broadcast(tensor, root)

    def agree(self, flag: int) -> int:
        return self._inner.agree(flag)

    def bind(self, abort: Any, op_s: float) -> None:
        _bind(self._inner, abort, op_s)

    def step(
        self,
        flag: int,
        tensor: Any,
        root: int,
        *,
        after: Any = None,
        side_copy: tuple[Any, Any] | None = None,
    ) -> InFlight:
        worst = self._inner.agree(flag)
        if worst == OK:
            self._inner.broadcast(tensor, root)
            self._backend.sync()
        return Done(worst)

    def close(self) -> None:
        self._inner.close()


def _bind(coll: Any, abort: threading.Event, op_s: float) -> None:
    """Gives a collective its abort and the deadline of its next operations (where it
    takes them: gloo; NCCL steps are bounded by the waits on their events)."""
    bind = getattr(coll, "bind", None)
    if bind is not None:
        bind(abort, op_s)


def abort_reason(abort: threading.Event) -> str:
    return getattr(abort, "reason", "") or "aborted by ckptd"


def run_update(
    cmd: apb.RunUpdate,
    *,
    backend: Backend,
    stores: HostStore,
    link: ReceiverLink,
    group_store: Any,
    abort: threading.Event,
    progress: Callable[[int, int], None],
    publish: Callable[[str], None] | None = None,
) -> tpb.RankResult:
    """publish(reason): tells the other ranks that this one failed (they stop at once)."""
    t0 = time.monotonic()
    dl = StepDeadlines.for_update(cmd, t0)
    timer = Timer()
    me = cmd.group_rank
    nbuf = max(1, cmd.nbuf)
    B = cmd.bucket_bytes
    reason = ""
    sent_bytes = 0
    coll: Collective | None = None
    local_fail = ""
    told = False  # the engine already knows this update will not happen
    told_peers = False  # this rank published its failure to the group
    proceeded = False  # the engine was told to map the buffer
    steps: dict[int, InFlight] = {}
    gpu_h2d: list[tuple[Any, Any]] = []
    gpu_bcast: list[tuple[Any, Any]] = []

    def check(flag_reason: str) -> None:
        """Everyone agrees now (host-synchronous); raises if anyone failed."""
        assert coll is not None
        nonlocal local_fail
        if abort.is_set() and not flag_reason:
            flag_reason = abort_reason(abort)
        if flag_reason and not local_fail:
            local_fail = flag_reason
        if local_fail and not abort.is_set():
            tell_peers(local_fail)
        worst = coll.agree(FAILED if local_fail else OK)
        if worst != OK:
            raise UpdateFailed(local_fail or PEER_FAILED)

    def tell_peers(why: str) -> None:
        nonlocal told_peers
        if publish is not None and not told_peers:
            told_peers = True
            publish(why)

    def settle(why: str) -> str:
        """The reason this rank reports: its own failure (told to its peers), or what
        ended the update from outside (ckptd, a peer) rather than how a wait ended."""
        if told_peers:
            return local_fail or why
        if abort.is_set():
            return abort_reason(abort)
        if not why.startswith(PEER_FAILED):
            tell_peers(why)
        return why

    staged = hasattr(backend, "h2d")
    if not staged:
        backend = _Legacy(backend)  # type: ignore[assignment]
    ranges = coalesce if staged else _per_entry
    link.peer = None
    try:
        owns = any(b.owner == me for b in cmd.buckets)
        store_t = None
        if owns:
            store_t = backend.store_tensor(stores.get(cmd.checkpoint, cmd.version))
        nslots, nstage = backend.plan_slots(nbuf, B, owns)
        buf_name, buf = backend.ipc_buffer(nslots * B, share=cmd.is_target)
        staging = backend.device_buffer(nstage * B) if nstage else None
        coll = backend.new_group(group_store, me, cmd.world_size, cmd.timeout_s, cmd.job_id)
        _bind(coll, abort, dl.first_s)
        # Every rank reads bucket j's agreed flag after issuing bucket j + lag.
        lag = 0 if backend.kind == "cpu" else nbuf - 1
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
                        slot_bytes=B,
                        nbuf=nslots,
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
        try:
            check(problem)  # on NCCL the first collective also connects the group
        except UpdateFailed as e:
            if cmd.is_target and link.peer is not None:
                told = True
                try:
                    link.send(ipb.WorkerMessage(proceed=ipb.Proceed(ok=False, reason=str(e))))
                except LinkError:
                    pass
            raise
        _bind(coll, abort, dl.collective(B))
        if cmd.is_target:
            link.send(ipb.WorkerMessage(proceed=ipb.Proceed(ok=True)))
            proceeded = True
        timer.setup_s = time.monotonic() - t0

        flags = copy_flags(cmd) if cmd.is_target else []
        loaded = -1  # highest bucket the engine has loaded
        buckets = cmd.buckets
        mine = [k for k, b in enumerate(buckets) if b.owner == me]
        pos = {k: m for m, k in enumerate(mine)}
        h2d_done: dict[int, Any] = {}
        next_h2d = 0

        def wait_loaded(k: int) -> None:
            nonlocal loaded
            t = time.monotonic()
            while loaded < k:
                msg = link.expect("loaded", dl.engine(buckets[loaded + 1].nbytes), abort)
                loaded = max(loaded, msg.loaded.bucket)
                progress(msg.loaded.bucket, buckets[msg.loaded.bucket].nbytes)
            timer.reload_s += time.monotonic() - t

        def stage_view(k: int) -> Any:
            assert staging is not None
            s0 = (pos[k] % nstage) * B
            return staging[s0 : s0 + buckets[k].nbytes]

        def issue_h2d(issued: int) -> None:
            """H2D of my buckets whose staging slot's previous bucket has been issued
            (buckets < issued): the copy stream waits on that broadcast, not the host."""
            nonlocal next_h2d
            while next_h2d < len(mine) and not local_fail:
                m = next_h2d
                prev = mine[m - nstage] if m >= nstage else -1
                if prev >= issued:
                    return
                k = mine[m]
                after = steps[prev].events if prev >= 0 else []
                t = time.monotonic()
                done, start = backend.h2d(stage_view(k), store_t, ranges(buckets[k].entries), after)
                timer.copy_s += time.monotonic() - t
                gpu_h2d.append((start, done))
                h2d_done[k] = done
                next_h2d += 1

        def reap(j: int) -> None:
            nonlocal local_fail, sent_bytes
            st = steps[j]
            t = time.monotonic()
            worst = st.wait(time.monotonic() + dl.collective(buckets[j].nbytes), abort)
            timer.broadcast_s += time.monotonic() - t
            gpu_bcast.append((getattr(st, "t_start", None), getattr(st, "t_end", None)))
            if worst != OK:
                raise UpdateFailed(local_fail or PEER_FAILED)
            b = buckets[j]
            sent_bytes += b.nbytes
            if not cmd.is_target:
                return
            try:
                link.send(
                    ipb.WorkerMessage(
                        bucket=ipb.BucketReady(
                            bucket=j,
                            slot=j % nslots,
                            entries=[
                                ipb.IpcTensor(
                                    tensor=e.tensor,
                                    offset=e.bucket_offset,
                                    nbytes=e.nbytes,
                                    chunk_offset=e.chunk_offset,
                                    copy=flags[j][i],
                                )
                                for i, e in enumerate(b.entries)
                            ],
                        )
                    )
                )
            except LinkError as e:
                local_fail = local_fail or str(e)

        for k, b in enumerate(buckets):
            problem = ""
            if cmd.is_target and k >= nslots and not local_fail:
                try:
                    wait_loaded(k - nslots)
                except LinkError as e:
                    problem = str(e)
            if abort.is_set() and not problem:
                problem = abort_reason(abort)
            if problem and not local_fail:
                local_fail = problem
                if not abort.is_set():
                    tell_peers(problem)
            s0 = (k % nslots) * B
            view = buf[s0 : s0 + b.nbytes]
            src, after, side = view, None, None
            if b.owner == me and not local_fail:
                assert store_t is not None
                if nstage:
                    issue_h2d(k)
                    src, after = stage_view(k), h2d_done.pop(k)
                    if cmd.is_target:
                        side = (view, src)
                else:  # serial: straight into the slot, once its last broadcast is done
                    prev = steps.get(k - nslots)
                    t = time.monotonic()
                    after, start = backend.h2d(
                        view, store_t, ranges(b.entries), prev.events if prev else []
                    )
                    timer.copy_s += time.monotonic() - t
                    gpu_h2d.append((start, after))
            t = time.monotonic()
            steps[k] = coll.step(
                FAILED if local_fail else OK, src, b.owner, after=after, side_copy=side
            )
            timer.broadcast_s += time.monotonic() - t
            if nstage:
                issue_h2d(k + 1)
            if k - lag >= 0:
                reap(k - lag)
            steps.pop(k - lag - nslots - nstage - 1, None)
        for j in range(max(0, len(buckets) - lag), len(buckets)):
            reap(j)
        problem = ""
        version_seen = 0
        if cmd.is_target:
            try:
                if buckets:
                    wait_loaded(len(buckets) - 1)
                link.send(ipb.WorkerMessage(end=ipb.End(ok=True)))
                total = sum(b.nbytes for b in buckets)
                done = link.expect("done", dl.engine_done(total), abort).done
                if not done.ok:
                    problem = f"engine failed: {done.reason}"
                version_seen = done.version
            except LinkError as e:
                problem = str(e)
        check(problem)
        steps.clear()
        if gpu_h2d or gpu_bcast:  # device time of the stages (they overlap)
            timer.copy_s = _elapsed(gpu_h2d) or timer.copy_s
            timer.broadcast_s = _elapsed(gpu_bcast) or timer.broadcast_s
        log.info(
            "update_done",
            job=cmd.job_id,
            rank=me,
            buckets=len(buckets),
            bytes=sent_bytes,
            seconds=round(time.monotonic() - t0, 4),
            slots=nslots,
            staging=nstage,
            engine_version=version_seen,
        )
        return tpb.RankResult(ok=True, bytes=sent_bytes, times=timer.pb(time.monotonic() - t0))
    except (UpdateFailed, StoreError, LinkError) as e:
        reason = settle(getattr(e, "message", None) or str(e))
    except Exception as e:  # gloo/NCCL errors (a peer died, timeouts) land here
        reason = settle(f"{type(e).__name__}: {e}")
        if coll is not None and hasattr(coll, "healthy"):
            coll.healthy = False
    finally:
        if coll is not None:
            _drain(steps, coll)
            coll.close()
        steps.clear()
        # This frame's views are the last references to the update's device buffers: drop
        # them first, or end_update can only hand them to the allocator's cache, where they
        # stay (the memory would not return to its level before the update).
        buf = staging = view = src = side = None
        backend.end_update(shared_never_opened=cmd.is_target and not proceeded)
    if cmd.is_target and link.peer is not None and not told:
        try:
            link.send(ipb.WorkerMessage(end=ipb.End(ok=False, reason=reason)))
        except LinkError:
            pass
    log.warning("update_failed", job=cmd.job_id, rank=me, reason=reason)
    return tpb.RankResult(
        ok=False,
        reason=reason,
        bytes=sent_bytes,
        times=timer.pb(time.monotonic() - t0),
        engine_untouched=cmd.is_target and not proceeded,
    )


def _drain(steps: dict[int, InFlight], coll: Collective) -> None:
    """Lets collectives already issued finish before their buffers go; a group whose
    collectives never finish (a peer died) is marked unhealthy and dropped."""
    deadline = time.monotonic() + DRAIN_S
    for st in steps.values():
        try:
            st.wait(deadline)
        except Exception:
            if hasattr(coll, "healthy"):
                coll.healthy = False  # type: ignore[attr-defined]
            return
