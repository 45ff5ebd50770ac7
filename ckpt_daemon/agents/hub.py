"""The agents' attach streams: who is attached, commands down, results and progress up.

`AgentHub.command` sends one command to an agent and waits for its result with a timeout.
A stream that closes, or an agent whose heartbeats stop, fails every command pending on it
at once: a dead peer becomes an error with a reason, never a hang. Jobs and pushes watch
their agents more closely (`watch`): one silent for `silence_limit` fails them.

An attaching agent is told to drop the stores it reports that the registry does not know
(a push given up, or interrupted by a ckptd restart).
"""

from __future__ import annotations

import asyncio
import itertools
import math
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Mapping
from dataclasses import dataclass, field
from typing import TypeVar

import structlog

from ckpt.v1 import agent_pb2 as apb
from ckpt_common.errors import (
    AlreadyExists,
    CkptError,
    DeadlineExceeded,
    InvalidArgument,
    PermissionDenied,
    Unavailable,
    error_for,
)
from ckpt_daemon.admission import check_device, check_name, check_text
from ckpt_daemon.agents import commands
from ckpt_daemon.agents.results import BucketProgress, progress
from ckpt_daemon.model import AgentInfo, DeviceInfo
from ckpt_daemon.registry.store import Registry
from ckpt_daemon.security.auth import PRINCIPAL, Principal

log = structlog.get_logger("ckptd.agents")

ProgressFn = Callable[[str, BucketProgress], None]
T = TypeVar("T")
HEARTBEAT_GRACE_S = 30.0
JOB_SILENCE_BEATS = 4  # a job fails on an agent silent for this many heartbeats
JOB_SILENCE_MIN_S = 4.0  # a loaded machine delays heartbeats by seconds: no false alarms
WATCH_S = 0.25


CEILING_PHASES = ("copy",)
MAX_RATE = 1e13  # bytes/s: 10 TB/s, beyond any device's copy engine


def check_ceilings(ceilings: Mapping[str, float]) -> None:
    """Measured rates: known phases, finite, within what hardware does."""
    for phase, rate in ceilings.items():
        if phase not in CEILING_PHASES or not (0.0 <= rate <= MAX_RATE):
            raise InvalidArgument(f"bad device ceiling {phase!r}: {rate}")


def check_hello(hello: apb.Hello) -> None:
    """An agent's Hello is input too: refused (INVALID_ARGUMENT) before it touches anything."""
    check_name("node_id", hello.node_id)
    check_text("host", hello.host, 255)
    check_text("ipc_dir", hello.ipc_dir)
    check_text("version", hello.version, 100)
    if not hello.devices or len(hello.devices) > 1024:
        raise InvalidArgument("an agent has 1-1024 devices")
    if len({d.index for d in hello.devices}) != len(hello.devices):
        raise InvalidArgument("an agent lists a device twice")
    for d in hello.devices:
        check_device(d.index)
        check_text("device kind", d.kind, 16)
        check_text("device uuid", d.uuid, 200)
        if d.total_bytes < 0 or d.free_bytes < 0:
            raise InvalidArgument("device byte counts must not be negative")
        check_ceilings(d.ceilings)
    if hello.host_free_bytes < 0 or len(hello.stores) > 1 << 16:
        raise InvalidArgument("bad host memory or store count")
    for st in hello.stores:
        check_text("store checkpoint", st.checkpoint, 300)
        check_device(st.device)
        if st.nbytes < 0:
            raise InvalidArgument("store byte counts must not be negative")


@dataclass(eq=False)
class _Session:
    node_id: str
    outbox: asyncio.Queue[apb.DaemonMessage | None] = field(default_factory=asyncio.Queue)
    pending: dict[int, asyncio.Future[apb.CommandResult]] = field(default_factory=dict)
    last_seen: float = field(default_factory=time.monotonic)
    closed: bool = False
    error: CkptError | None = None  # why ckptd ended the stream (its status)
    heard: bool = False  # the agent sent something after its Hello

    def close(self, reason: str) -> None:
        if self.closed:
            return
        self.closed = True
        for fut in self.pending.values():
            if not fut.done():
                fut.set_exception(Unavailable(f"agent {self.node_id} {reason}"))
        self.pending.clear()
        self.outbox.put_nowait(None)


class AgentHub:
    def __init__(self, registry: Registry, *, heartbeat_s: float, daemon_version: str) -> None:
        self._registry = registry
        self._heartbeat_s = heartbeat_s
        self._daemon_version = daemon_version
        self._sessions: dict[str, _Session] = {}
        self._ids = itertools.count(1)
        self._progress: dict[str, ProgressFn] = {}
        self._attach_waiters: list[asyncio.Future[None]] = []
        self.held: dict[str, dict[tuple[str, int, int], apb.HeldStore]] = {}  # last Hello

    # ---------------------------------------------------------------- the stream

    async def serve(
        self, incoming: AsyncIterator[apb.AgentMessage]
    ) -> AsyncIterator[apb.DaemonMessage]:
        first = await anext(incoming, None)
        if first is None or first.WhichOneof("body") != "hello":
            raise InvalidArgument("an agent stream must start with Hello")
        hello = first.hello
        check_hello(hello)
        who = PRINCIPAL.get()
        if who is not None and who.node and who.node != hello.node_id:
            raise PermissionDenied(f"{who.name} may attach as node {who.node!r} only")
        session = self._attach(hello, who)
        reader = asyncio.create_task(self._read(session, incoming))
        try:
            yield apb.DaemonMessage(
                welcome=apb.Welcome(
                    daemon_version=self._daemon_version, heartbeat_s=self._heartbeat_s
                )
            )
            while True:
                msg = await session.outbox.get()
                if msg is None:
                    break
                yield msg
            if session.error is not None:
                raise session.error
        finally:
            reader.cancel()
            session.close("detached")
            if self._sessions.get(hello.node_id) is session:
                del self._sessions[hello.node_id]
                self._registry.agent_detached(hello.node_id)
                log.warning("agent_detached", node=hello.node_id)

    def _attach(self, hello: apb.Hello, who: Principal | None) -> _Session:
        """The agent's new session: it replaces a stream of the same node only when the
        caller's identity is bound to that node, or the old stream went silent; the registry
        records the agent and reconciles the stores it says it holds."""
        old = self._sessions.get(hello.node_id)
        if old and not old.closed:
            # An agent whose identity is bound to this node (its certificate or token) is
            # the node's agent, restarted: it replaces its old stream. Anyone else waits
            # until the old stream is gone or silent, never evicts a live agent.
            silent = time.monotonic() - old.last_seen > 3 * self._heartbeat_s
            if not (who is not None and who.node == hello.node_id) and not silent:
                raise AlreadyExists(f"an agent is attached as node {hello.node_id!r}")
            old.close("re-attached on a new stream")
        session = _Session(hello.node_id)
        self._sessions[hello.node_id] = session
        info = AgentInfo(
            node_id=hello.node_id,
            host=hello.host,
            devices=[
                DeviceInfo(
                    index=d.index,
                    kind=d.kind,
                    uuid=d.uuid,
                    total_bytes=d.total_bytes,
                    free_bytes=d.free_bytes,
                    ceilings=dict(d.ceilings),
                )
                for d in hello.devices
            ],
            attached=True,
            last_seen=time.time(),
            version=hello.version,
            pid=hello.pid,
            ipc_dir=hello.ipc_dir,
            host_free_bytes=hello.host_free_bytes,
        )
        held = {
            (s.checkpoint, s.version, s.device): (s.nbytes, s.p2p.session, s.p2p.addr)
            for s in hello.stores
        }
        self._registry.agent_attached(info, held)
        self.held[hello.node_id] = {(s.checkpoint, s.version, s.device): s for s in hello.stores}
        log.info("agent_attached", node=hello.node_id, devices=len(hello.devices), host=hello.host)
        self._drop_unknown(session, hello.stores)
        for w in self._attach_waiters:
            if not w.done():
                w.set_result(None)
        return session

    def _drop_unknown(self, session: _Session, stores: Iterable[apb.HeldStore]) -> None:
        known = self._registry.shard_keys(session.node_id)
        for s in stores:
            if (s.checkpoint, s.version, s.device) in known:
                continue
            log.warning(
                "unknown_store_dropped",
                node=session.node_id,
                checkpoint=s.checkpoint,
                version=s.version,
                device=s.device,
            )
            cmd = commands.drop(s.checkpoint, s.version, s.device)
            cmd.id = next(self._ids)
            session.outbox.put_nowait(apb.DaemonMessage(command=cmd))

    def _heartbeat(self, node_id: str, hb: apb.Heartbeat) -> None:
        ceilings = {}
        for d in hb.devices:
            try:
                check_ceilings(d.ceilings)
            except InvalidArgument:
                continue  # what a device measured is advisory: a bad report is not kept
            if d.ceilings:
                ceilings[d.index] = dict(d.ceilings)
        free = {d.index: d.free_bytes for d in hb.devices}
        self._registry.agent_heartbeat(node_id, free, hb.host_free_bytes, ceilings)

    async def _read(self, session: _Session, incoming: AsyncIterator[apb.AgentMessage]) -> None:
        try:
            async for msg in incoming:
                session.last_seen, session.heard = time.monotonic(), True
                kind = msg.WhichOneof("body")
                if kind == "heartbeat":
                    self._heartbeat(session.node_id, msg.heartbeat)
                elif kind == "result":
                    fut = session.pending.pop(msg.result.command_id, None)
                    if fut and not fut.done():
                        fut.set_result(msg.result)
                elif kind == "progress":
                    fn = self._progress.get(msg.progress.job_id)
                    if fn:
                        fn(session.node_id, progress(msg.progress))
        except (asyncio.CancelledError, GeneratorExit):
            raise
        except CkptError as e:  # the agent sent what is not a message: its stream ends so
            log.warning("agent_stream_refused", node=session.node_id, error=e.message)
            session.error = e
        except Exception as e:  # the stream broke
            log.warning("agent_stream_error", node=session.node_id, error=str(e))
        session.close("stream closed")

    async def monitor(self) -> None:
        """Drops agents whose heartbeats stopped (3 missed, and at least 30 s: a busy node is
        not a dead one; a closed stream is noticed at once anyway). When this loop itself
        woke up late (ckptd was starved), heartbeats may be waiting unread: skip a round.
        An agent never heard from after its Hello gets no grace: 3 missed beats detach it
        (attached and silent, it would be planned into every push and update)."""
        limit = max(3 * self._heartbeat_s, HEARTBEAT_GRACE_S)
        unheard = 3 * self._heartbeat_s
        last = time.monotonic()
        while True:
            await asyncio.sleep(self._heartbeat_s)
            now = time.monotonic()
            gap, last = now - last, now
            if gap > 2 * self._heartbeat_s:
                log.warning("monitor_late", seconds=round(gap, 3))
                await asyncio.sleep(0)  # let queued stream reads run first
                continue
            for s in list(self._sessions.values()):
                if now - s.last_seen > (limit if s.heard else unheard):
                    log.warning("agent_heartbeat_lost", node=s.node_id)
                    s.close("stopped sending heartbeats")

    # ---------------------------------------------------------------- commands

    def detach(self, node_id: str, reason: str) -> None:
        """Closes an agent's stream (it may attach again)."""
        session = self._sessions.get(node_id)
        if session is not None:
            session.close(reason)

    def attached(self, node_id: str) -> bool:
        s = self._sessions.get(node_id)
        return bool(s and not s.closed)

    def live(self, node_id: str) -> bool:
        """Attached and not silent (a frozen agent's stores are no source to plan reads of)."""
        return self.silence(node_id) <= self.silence_limit

    @property
    def silence_limit(self) -> float:
        return max(JOB_SILENCE_BEATS * self._heartbeat_s, JOB_SILENCE_MIN_S)

    def silence(self, node_id: str) -> float:
        """Seconds since the agent last sent anything (inf when it is not attached)."""
        s = self._sessions.get(node_id)
        if not s or s.closed:
            return math.inf
        return time.monotonic() - s.last_seen

    async def watch(self, nodes: Iterable[str], what: str) -> None:
        """Raises Unavailable once one of `nodes` is silent for silence_limit (frozen, or
        cut off) or detached; runs until cancelled. A round after this loop itself woke up
        late (ckptd was starved or stopped) is skipped: messages may be waiting unread."""
        nodes = sorted(set(nodes))
        limit = self.silence_limit
        last = time.monotonic()
        while True:
            await asyncio.sleep(WATCH_S)
            now = time.monotonic()
            late, last = now - last > limit / 2, now
            if late:
                await asyncio.sleep(0)
                continue
            for n in nodes:
                quiet = self.silence(n)
                if quiet == math.inf:
                    raise Unavailable(f"agent {n} detached during {what}")
                if quiet > limit:
                    raise Unavailable(
                        f"agent {n} sent nothing for {quiet:.1f}s during {what} (frozen or cut off)"
                    )

    async def watched(self, aw: Awaitable[T], nodes: Iterable[str], what: str) -> T:
        """Awaits aw, unless one of `nodes` goes silent first (then aw is cancelled and the
        silence raises)."""
        task = asyncio.ensure_future(aw)
        dog = asyncio.ensure_future(self.watch(nodes, what))
        try:
            await asyncio.wait({task, dog}, return_when=asyncio.FIRST_COMPLETED)
            if task.done():
                return task.result()
            err = dog.exception()
            assert err is not None
            raise err
        finally:
            dog.cancel()
            task.cancel()

    def attached_nodes(self) -> list[str]:
        return sorted(n for n, s in self._sessions.items() if not s.closed)

    async def wait_attached(self, count: int, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while len(self.attached_nodes()) < count:
            left = deadline - time.monotonic()
            if left <= 0:
                raise DeadlineExceeded(f"fewer than {count} agents attached")
            fut: asyncio.Future[None] = asyncio.get_running_loop().create_future()
            self._attach_waiters.append(fut)
            try:
                await asyncio.wait_for(fut, left)
            except TimeoutError:
                pass
            finally:
                self._attach_waiters.remove(fut)

    async def command(self, node_id: str, cmd: apb.Command, timeout: float) -> apb.CommandResult:
        """Sends cmd (its id is set here); returns the result or raises a CkptError."""
        s = self._sessions.get(node_id)
        if not s or s.closed:
            raise Unavailable(f"agent {node_id} is not attached")
        cmd.id = next(self._ids)
        fut: asyncio.Future[apb.CommandResult] = asyncio.get_running_loop().create_future()
        s.pending[cmd.id] = fut
        s.outbox.put_nowait(apb.DaemonMessage(command=cmd))
        try:
            res = await asyncio.wait_for(fut, timeout)
        except TimeoutError:
            raise DeadlineExceeded(
                f"agent {node_id} did not answer {cmd.WhichOneof('body')} within {timeout:.0f}s"
            ) from None
        finally:
            s.pending.pop(cmd.id, None)
        if not res.ok:
            raise error_for(res.code or "INTERNAL", res.message)
        return res

    def send(self, node_id: str, cmd: apb.Command) -> None:
        """Fire and forget (Abort)."""
        s = self._sessions.get(node_id)
        if s and not s.closed:
            cmd.id = next(self._ids)
            s.outbox.put_nowait(apb.DaemonMessage(command=cmd))

    def on_progress(self, job_id: str, fn: ProgressFn | None) -> None:
        if fn is None:
            self._progress.pop(job_id, None)
        else:
            self._progress[job_id] = fn


__all__ = ["AgentHub", "CkptError"]
