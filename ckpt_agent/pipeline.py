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
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING

import structlog

from ckpt.v1 import agent_pb2 as apb
from ckpt.v1 import types_pb2 as tpb
from ckpt_agent.backends.base import Backend, Collective, Copy, InFlight
from ckpt_agent.begin_barrier import all_begun
from ckpt_agent.engine_session import EngineSession
from ckpt_agent.group_abort import PEER_FAILED, Abort, abort_reason
from ckpt_agent.host_store import HostStore, Store, StoreError
from ckpt_agent.receiver_link import LinkError, ReceiverLink
from ckpt_agent.schedule import COPY, FORGET, LOAD, REAP, SEND, STAGE, Step, bucket_schedule
from ckpt_agent.stream_wait import await_written, bucket_end
from ckpt_common.layers import layer_key

if TYPE_CHECKING:
    from collections.abc import Iterable

    import torch
    import torch.distributed as dist

    Event = torch.cuda.Event

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


def coalesce(entries: Iterable[apb.BucketEntry]) -> list[Copy]:
    """The bucket's copies: consecutive entries laid out the same way in the store and the
    bucket become one copy (the padding between them rides along); strided reads (kept
    parts, rows > 1) stay as they are."""
    out: list[Copy] = []
    for e in sorted(entries, key=lambda e: e.bucket_offset):
        if e.nbytes == 0:
            continue
        rows = max(1, e.rows)
        if rows > 1:
            out.append(Copy(e.bucket_offset, e.store_offset, e.nbytes // rows, rows, e.stride))
            continue
        if out and out[-1].rows == 1:
            d, o, n = out[-1][:3]
            gap = e.bucket_offset - (d + n)
            if 0 <= gap < MERGE_GAP and e.store_offset - o == e.bucket_offset - d:
                out[-1] = Copy(d, o, e.bucket_offset + e.nbytes - d)
                continue
        out.append(Copy(e.bucket_offset, e.store_offset, e.nbytes))
    return out


def _elapsed(pairs: list[tuple[torch.cuda.Event | None, torch.cuda.Event | None]]) -> float:
    total = 0.0
    for t0, t1 in pairs:
        if t0 is not None and t1 is not None:
            try:
                total += t0.elapsed_time(t1) / 1000.0
            except RuntimeError:
                pass
    return total


def run_update(
    cmd: apb.RunUpdate,
    *,
    backend: Backend,
    stores: HostStore | None,
    link: ReceiverLink,
    group_store: dist.Store,
    abort: Abort,
    progress: Callable[[int, int], None],
    publish: Callable[[str], None] | None = None,
) -> tpb.RankResult:
    """publish(reason): tells the other ranks that this one failed (they stop at once).
    stores None: the backend reads its own sources (P2P), this rank's stores are not read."""
    return UpdateRun(cmd, backend, stores, link, group_store, abort, progress, publish).run()


class UpdateRun:
    """One rank's update: set-up, the bucket schedule (ckpt_agent.schedule) executed step by
    step, the engine's end, and the failure protocol around them."""

    def __init__(
        self,
        cmd: apb.RunUpdate,
        backend: Backend,
        stores: HostStore | None,
        link: ReceiverLink,
        group_store: dist.Store,
        abort: Abort,
        progress: Callable[[int, int], None],
        publish: Callable[[str], None] | None,
    ) -> None:
        self.t0 = time.monotonic()
        self.cmd, self.backend, self.stores = cmd, backend, stores
        self.group_store, self.abort = group_store, abort
        self.progress, self.publish = progress, publish
        self.dl = StepDeadlines.for_update(cmd, self.t0)
        self.engine = EngineSession(link, cmd, abort, self.dl.engine)
        self.timer = Timer()
        self.me = cmd.group_rank
        self.B = cmd.bucket_bytes
        self.buckets = cmd.buckets
        self.coll: Collective | None = None
        self.local_fail = ""
        self.told_peers = False  # this rank published its failure to the group
        self.sent_bytes = 0
        self.copied_bytes = 0
        self.steps: dict[int, InFlight] = {}
        self.staged: dict[int, Event | None] = {}  # bucket -> its H2D's done event
        self.gpu_h2d: list[tuple[Event | None, Event | None]] = []
        self.gpu_bcast: list[tuple[Event | None, Event | None]] = []
        self.store_t: torch.Tensor | None = None
        self.store: Store | None = None  # this rank's (streamed: its progress mark is watched)
        self.buf_name = ""
        self.buf: torch.Tensor | None = None
        self.staging: torch.Tensor | None = None
        self.nslots = self.nstage = 0
        self.flags: list[list[bool]] = []
        self.mine = [k for k, b in enumerate(cmd.buckets) if b.owner == self.me]
        self.pos = {k: m for m, k in enumerate(self.mine)}  # bucket -> index among mine

    # ------------------------------------------------------------------ the update

    def run(self) -> tpb.RankResult:
        cmd = self.cmd
        try:
            self._setup()
            self._start()
            self.timer.setup_s = time.monotonic() - self.t0
            self.flags = copy_flags(cmd) if cmd.is_target else []
            lag = 0 if self.backend.kind == "cpu" else max(1, cmd.nbuf) - 1
            owners = [b.owner for b in self.buckets]
            plan = bucket_schedule(
                owners, self.me, nslots=self.nslots, nstage=self.nstage, lag=lag,
                target=cmd.is_target,
            )  # fmt: skip
            for step in plan:
                self._do(step)
            return self._finish()
        except (UpdateFailed, StoreError, LinkError) as e:
            reason = self.settle(getattr(e, "message", None) or str(e))
        except Exception as e:  # gloo/NCCL errors (a peer died, timeouts) land here
            reason = self.settle(f"{type(e).__name__}: {e}")
            if self.coll is not None:
                self.coll.mark_failed()
        finally:
            self._release()
        if cmd.is_target:
            self.engine.end_failed(reason)
        log.warning("update_failed", job=cmd.job_id, rank=self.me, reason=reason)
        return tpb.RankResult(
            ok=False,
            reason=reason,
            bytes=self.sent_bytes,
            times=self.timer.pb(time.monotonic() - self.t0),
            engine_untouched=cmd.is_target and not self.engine.proceeded,
        )

    def _setup(self) -> None:
        cmd, backend = self.cmd, self.backend
        owns = bool(self.mine)
        if owns and self.stores is not None:
            self.store = self.stores.get(cmd.checkpoint, cmd.version)
            self.store_t = backend.store_tensor(self.store)
        self.nslots, self.nstage = backend.plan_slots(max(1, cmd.nbuf), self.B, owns)
        self.buf_name, self.buf = backend.ipc_buffer(self.nslots * self.B, share=cmd.is_target)
        if self.nstage:
            self.staging = backend.device_buffer(self.nstage * self.B)

    def _start(self) -> None:
        """The engine validates the update; once every rank has (an abortable wait), the
        group is made (its rendezvous is not abortable) and every rank agrees to go on (on
        NCCL the first collective also connects the group)."""
        problem = self.engine.begin(self.buf_name, self.nslots) if self.cmd.is_target else ""
        try:
            if not problem:  # no rank enters a collective before all have begun
                n, first_s = self.cmd.world_size, self.dl.first_s
                problem = all_begun(self.group_store, n, self.abort, first_s)
            if problem:
                self.fail(problem)
                raise UpdateFailed(problem)
            cmd = self.cmd
            self.coll = self.backend.new_group(
                self.group_store, self.me, cmd.world_size, cmd.timeout_s, cmd.job_id
            )
            self.coll.bind(self.abort, self.dl.collective(self.B))
            self.check(problem)
        except UpdateFailed as e:
            if self.cmd.is_target:
                self.engine.refuse(str(e))
            raise
        if self.cmd.is_target:
            self.engine.proceed()

    def _do(self, step: Step) -> None:
        kind, k = step
        if kind == SEND:
            self._send(k)
        elif kind == REAP:
            self._reap(k)
        elif kind == STAGE:
            if self._written(k):
                self.staged[k] = self._h2d(k, self._stage_view(k), self._stage_after(k))
        elif kind == COPY:
            if self._written(k):
                prev = self.steps.get(k - self.nslots)
                self.staged[k] = self._h2d(k, self._slot(k), prev.events if prev else [])
        elif kind == LOAD:
            if not self.local_fail:
                try:
                    self._wait_loaded(k)
                except LinkError as e:
                    self.fail(str(e))
        elif kind == FORGET:
            self.steps.pop(k, None)

    def _written(self, k: int) -> bool:
        """Whether bucket k can be copied: nothing failed here, and (streamed) the trainer's
        bytes of it have landed in the store; a push that stops writing fails this rank."""
        if self.local_fail:
            return False
        if self.cmd.streamed and self.store is not None:
            t = time.monotonic()
            need = bucket_end(self.buckets[k].entries)
            why = await_written(self.store.mem, need, self.abort, self.dl.base_s, self.dl.job_end)
            self.timer.marks["stream_wait_s"] = (
                self.timer.marks.get("stream_wait_s", 0.0) + time.monotonic() - t
            )
            if why:
                self.fail(why)
                return False
        return True

    def _slot(self, k: int) -> torch.Tensor:
        assert self.buf is not None  # from _setup until _release
        s0 = (k % self.nslots) * self.B
        return self.buf[s0 : s0 + self.buckets[k].nbytes]

    def _stage_view(self, k: int) -> torch.Tensor:
        assert self.staging is not None  # staged only when nstage > 0
        s0 = (self.pos[k] % self.nstage) * self.B
        return self.staging[s0 : s0 + self.buckets[k].nbytes]

    def _stage_after(self, k: int) -> list[Event]:
        """The send that last used k's staging slot (my bucket nstage before k)."""
        m = self.pos[k]
        prev = self.steps.get(self.mine[m - self.nstage]) if m >= self.nstage else None
        return prev.events if prev else []

    def _h2d(self, k: int, dst: torch.Tensor, after: list[Event]) -> Event | None:
        t = time.monotonic()
        done, start = self.backend.h2d(dst, self.store_t, coalesce(self.buckets[k].entries), after)
        self.timer.copy_s += time.monotonic() - t
        self.copied_bytes += self.buckets[k].nbytes
        self.gpu_h2d.append((start, done))
        return done

    def _send(self, k: int) -> None:
        assert self.coll is not None
        if self.abort.is_set() and not self.local_fail:
            self.fail(abort_reason(self.abort))
        b = self.buckets[k]
        view = self._slot(k)
        src, after, side = view, None, None
        if b.owner == self.me and not self.local_fail and k in self.staged:
            after = self.staged.pop(k)
            if self.nstage:
                src = self._stage_view(k)
                side = (view, src) if self.cmd.is_target else None
        t = time.monotonic()
        flag = FAILED if self.local_fail else OK
        self.steps[k] = self.coll.step(flag, src, b.owner, after=after, side_copy=side)
        self.timer.broadcast_s += time.monotonic() - t

    def _reap(self, j: int) -> None:
        st = self.steps[j]
        t = time.monotonic()
        worst = st.wait(time.monotonic() + self.dl.collective(self.buckets[j].nbytes), self.abort)
        self.timer.broadcast_s += time.monotonic() - t
        self.gpu_bcast.append((st.t_start, st.t_end))
        if worst != OK:
            raise UpdateFailed(self.local_fail or PEER_FAILED)
        self.sent_bytes += self.buckets[j].nbytes
        if not self.cmd.is_target:
            return
        try:
            self.engine.bucket_ready(j, j % self.nslots, self.buckets[j], self.flags[j])
        except LinkError as e:
            self.local_fail = self.local_fail or str(e)

    def _wait_loaded(self, k: int) -> None:
        t = time.monotonic()
        try:
            self.engine.wait_loaded(k, self.progress)
        finally:
            self.timer.reload_s += time.monotonic() - t

    def _finish(self) -> tpb.RankResult:
        problem, version_seen = "", 0
        if self.cmd.is_target:
            try:
                if self.buckets:
                    self._wait_loaded(len(self.buckets) - 1)
            except LinkError as e:
                problem = str(e)
            if not problem:
                total = sum(b.nbytes for b in self.buckets)
                problem, version_seen = self.engine.end(self.dl.engine_done(total))
        self.check(problem)
        self.steps.clear()
        if self.gpu_h2d or self.gpu_bcast:  # device time of the stages (they overlap)
            self.timer.copy_s = _elapsed(self.gpu_h2d) or self.timer.copy_s
            self.timer.broadcast_s = _elapsed(self.gpu_bcast) or self.timer.broadcast_s
        total_s = time.monotonic() - self.t0
        log.info(
            "update_done", job=self.cmd.job_id, rank=self.me, buckets=len(self.buckets),
            bytes=self.sent_bytes, seconds=round(total_s, 4), slots=self.nslots,
            staging=self.nstage, engine_version=version_seen,
        )  # fmt: skip
        return tpb.RankResult(
            ok=True, bytes=self.sent_bytes, copy_bytes=self.copied_bytes,
            times=self.timer.pb(total_s), layout=self.engine.layout,
        )  # fmt: skip

    def _release(self) -> None:
        if self.coll is not None:
            _drain(self.steps, self.coll)
            self.coll.close()
        self.steps.clear()
        self.staged.clear()
        # These are the last references to the update's device buffers: drop them first,
        # or end_update can only hand them to the allocator's cache, where they stay (the
        # memory would not return to its level before the update).
        self.buf = self.staging = None
        self.backend.end_update(
            shared_never_opened=self.cmd.is_target and not self.engine.proceeded
        )

    # ------------------------------------------------------------------ failures

    def fail(self, problem: str) -> None:
        """This rank cannot go on: remember why, and tell the group (unless ckptd aborted)."""
        if not self.local_fail:
            self.local_fail = problem
            if not self.abort.is_set():
                self.tell_peers(problem)

    def check(self, flag_reason: str) -> None:
        """Everyone agrees now (host-synchronous); raises if anyone failed."""
        assert self.coll is not None
        if self.abort.is_set() and not flag_reason:
            flag_reason = abort_reason(self.abort)
        if flag_reason:
            self.fail(flag_reason)
        if self.local_fail and not self.abort.is_set():
            self.tell_peers(self.local_fail)  # a failure noted while the group was not told
        if self.coll.agree(FAILED if self.local_fail else OK) != OK:
            raise UpdateFailed(self.local_fail or PEER_FAILED)

    def tell_peers(self, why: str) -> None:
        if self.publish is not None and not self.told_peers:
            self.told_peers = True
            self.publish(why)

    def settle(self, why: str) -> str:
        """The reason this rank reports: its own failure (its engine's, even when ckptd's
        abort came first: the engine's reason is the one the job needs), or what ended the
        update from outside (ckptd, a peer) rather than how a wait ended."""
        if self.local_fail:
            return self.local_fail
        if self.told_peers:
            return why
        if self.abort.is_set():
            return abort_reason(self.abort)
        if not why.startswith(PEER_FAILED):
            self.tell_peers(why)
        return why


def _drain(steps: dict[int, InFlight], coll: Collective) -> None:
    """Lets collectives already issued finish before their buffers go; a group whose
    collectives never finish (a peer died) is marked unhealthy and dropped."""
    deadline = time.monotonic() + DRAIN_S
    for st in steps.values():
        try:
            st.wait(deadline)
        except Exception:
            coll.mark_failed()
            return
