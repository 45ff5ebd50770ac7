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

import time
from collections.abc import Callable
from typing import TYPE_CHECKING

import structlog

from ckpt.v1 import agent_pb2 as apb
from ckpt.v1 import types_pb2 as tpb
from ckpt_agent import group_abort as ga
from ckpt_agent.backends.base import Backend, Collective, InFlight, drain
from ckpt_agent.begin_barrier import all_begun
from ckpt_agent.bucket_copies import coalesce, copy_flags
from ckpt_agent.engine_session import EngineSession
from ckpt_agent.group_abort import Abort, UpdateFailed, abort_origin, abort_reason
from ckpt_agent.host_store import HostStore, Store, StoreError
from ckpt_agent.phase_times import Timer, elapsed
from ckpt_agent.receiver_link import LinkError, ReceiverLink
from ckpt_agent.schedule import COPY, FORGET, LOAD, REAP, SEND, STAGE, Step, bucket_schedule
from ckpt_agent.step_deadlines import StepDeadlines
from ckpt_agent.stream_wait import await_written, bucket_end
from ckpt_common import delta

if TYPE_CHECKING:
    import torch
    import torch.distributed as dist

    Event = torch.cuda.Event

log = structlog.get_logger("ckpt_agent.pipeline")

OK, FAILED = 0, 1
DRAIN_S = 30.0


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
) -> apb.UpdateDone:
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
        self.me = cmd.rendezvous.group_rank
        self.B = cmd.plan.bucket_bytes
        self.buckets = cmd.plan.buckets
        self.coll: Collective | None = None
        self.local_fail = ""
        self.local_origin: apb.FailureOrigin = apb.ORIGIN_UNSPECIFIED  # where local_fail began
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
        self.mine = [k for k, b in enumerate(self.buckets) if b.owner == self.me]
        self.pos = {k: m for m, k in enumerate(self.mine)}  # bucket -> index among mine

    # ------------------------------------------------------------------ the update

    def run(self) -> apb.UpdateDone:
        cmd = self.cmd
        try:
            self._setup()
            self._start()
            self.timer.setup_s = time.monotonic() - self.t0
            self.flags = copy_flags(cmd.plan) if cmd.is_target else []
            lag = 0 if self.backend.kind == "cpu" else max(1, cmd.plan.nbuf) - 1
            owners = [b.owner for b in self.buckets]
            plan = bucket_schedule(
                owners, self.me, nslots=self.nslots, nstage=self.nstage, lag=lag,
                target=cmd.is_target,
            )  # fmt: skip
            for step in plan:
                self._do(step)
            return self._finish()
        except (UpdateFailed, StoreError, LinkError) as e:
            why = getattr(e, "message", None) or str(e)
            reason, origin = self.settle(why, getattr(e, "origin", apb.ORIGIN_SELF))
        except Exception as e:  # gloo/NCCL errors (a peer died, timeouts) land here
            reason, origin = self.settle(f"{type(e).__name__}: {e}", apb.ORIGIN_SELF)
            if self.coll is not None:
                self.coll.mark_failed()
        finally:
            self._release()
        if cmd.is_target:
            self.engine.end_failed(reason)
        log.warning("update_failed", job=cmd.job_id, rank=self.me, reason=reason)
        result = tpb.RankResult(
            ok=False,
            reason=reason,
            bytes=self.sent_bytes,
            times=self.timer.pb(time.monotonic() - self.t0),
            engine_untouched=cmd.is_target and not self.engine.proceeded,
        )
        return apb.UpdateDone(result=result, origin=origin)

    def _setup(self) -> None:
        cmd, backend = self.cmd, self.backend
        owns = bool(self.mine)
        if owns and self.stores is not None:
            base = cmd.plan.delta_base  # a delta update reads the delta store (ckpt_agent.diff)
            name = delta.store_name(cmd.checkpoint, base) if base else cmd.checkpoint
            self.store = self.stores.get(name, cmd.version)
            self.store_t = backend.store_tensor(self.store)
        self.nslots, self.nstage = backend.plan_slots(max(1, cmd.plan.nbuf), self.B, owns)
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
                n, first_s = self.cmd.rendezvous.world_size, self.dl.first_s
                problem, origin = all_begun(self.group_store, n, self.abort, first_s)
            else:
                origin = ga.origin_of(self.abort, problem)
            if problem:
                self.fail(problem, origin)
                raise UpdateFailed(problem, origin)
            cmd = self.cmd
            self.coll = self.backend.new_group(
                self.group_store,
                self.me,
                cmd.rendezvous.world_size,
                cmd.deadlines.timeout_s,
                cmd.job_id,
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
        if self.cmd.plan.streamed and self.store is not None:
            t = time.monotonic()
            need = bucket_end(self.buckets[k].entries)
            why = await_written(self.store.mem, need, self.abort, self.dl.base_s, self.dl.job_end)
            self.timer.marks["stream_wait_s"] = (
                self.timer.marks.get("stream_wait_s", 0.0) + time.monotonic() - t
            )
            if why:
                self.fail(why, ga.origin_of(self.abort, why))
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
            self.fail(abort_reason(self.abort), abort_origin(self.abort))
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
            raise self._failed()
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

    def _finish(self) -> apb.UpdateDone:
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
            self.timer.copy_s = elapsed(self.gpu_h2d) or self.timer.copy_s
            self.timer.broadcast_s = elapsed(self.gpu_bcast) or self.timer.broadcast_s
        total_s = time.monotonic() - self.t0
        log.info(
            "update_done", job=self.cmd.job_id, rank=self.me, buckets=len(self.buckets),
            bytes=self.sent_bytes, seconds=round(total_s, 4), slots=self.nslots,
            staging=self.nstage, engine_version=version_seen,
        )  # fmt: skip
        result = tpb.RankResult(
            ok=True, bytes=self.sent_bytes, copy_bytes=self.copied_bytes,
            times=self.timer.pb(total_s),
        )  # fmt: skip
        return apb.UpdateDone(result=result, layout=self.engine.layout)

    def _release(self) -> None:
        if self.coll is not None:
            drain(self.steps.values(), self.coll, time.monotonic() + DRAIN_S)
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

    def fail(self, problem: str, origin: apb.FailureOrigin = apb.ORIGIN_SELF) -> None:
        """This rank cannot go on: remember why, and tell the group (unless ckptd aborted)."""
        if not self.local_fail:
            self.local_fail, self.local_origin = problem, origin
            if not self.abort.is_set():
                self.tell_peers(problem)

    def _failed(self) -> UpdateFailed:
        """What ends this rank once the group agreed that someone failed."""
        if self.local_fail:
            return UpdateFailed(self.local_fail, self.local_origin)
        return UpdateFailed(ga.PEER_FAILED, apb.ORIGIN_PEER)

    def check(self, flag_reason: str) -> None:
        """Everyone agrees now (host-synchronous); raises if anyone failed."""
        assert self.coll is not None
        origin = apb.ORIGIN_SELF
        if self.abort.is_set() and not flag_reason:
            flag_reason, origin = abort_reason(self.abort), abort_origin(self.abort)
        if flag_reason:
            self.fail(flag_reason, origin)
        if self.local_fail and not self.abort.is_set():
            self.tell_peers(self.local_fail)  # a failure noted while the group was not told
        if self.coll.agree(FAILED if self.local_fail else OK) != OK:
            raise self._failed()

    def tell_peers(self, why: str) -> None:
        if self.publish is not None and not self.told_peers:
            self.told_peers = True
            self.publish(why)

    def settle(self, why: str, origin: apb.FailureOrigin) -> tuple[str, apb.FailureOrigin]:
        """The reason this rank reports and where it began: its own failure (its engine's,
        even when ckptd's abort came first: the engine's reason is the one the job needs),
        or what ended the update from outside (ckptd, a peer) rather than how a wait ended."""
        if self.local_fail:
            return self.local_fail, self.local_origin
        if self.told_peers:
            return why, origin
        if self.abort.is_set():
            return abort_reason(self.abort), abort_origin(self.abort)
        if origin != apb.ORIGIN_PEER:
            self.tell_peers(why)
        return why, origin
