"""The agent: attaches to ckptd (re-attaching by itself), heartbeats, relays commands to its
device workers, scans push sources, and remembers which stores it holds.

A worker that stops heartbeating for WORKER_SILENCE_S (frozen) fails the commands it owes
at once and is refused new ones until it speaks again. A store whose load was ordered on an
earlier attach session (ckptd restarted, or gave the load up) is dropped when it completes:
nobody is waiting for it."""

from __future__ import annotations

import asyncio
import os
import time

import grpc
import structlog

from ckpt.v1 import agent_pb2 as apb
from ckpt.v1 import agent_pb2_grpc
from ckpt.v1 import types_pb2 as tpb
from ckpt_agent import __version__, shm
from ckpt_agent.backends.cpu import free_host_bytes
from ckpt_agent.config import AgentConfig
from ckpt_agent.devices import node_devices, refreshed
from ckpt_agent.host_store import StoreError, segment_prefix
from ckpt_agent.scan import scan_paths
from ckpt_agent.stale import JOB_COMMANDS
from ckpt_agent.supervisor import Supervisor
from ckpt_agent.worker import READY_ID
from ckpt_common.credentials import channel_args
from ckpt_common.delta import store_name as delta_store
from ckpt_common.ipc import ipc_dir, path_length_problem, worker_endpoint
from ckpt_common.rendezvous import RendezvousError, ensure_private_dir, others_allowed

log = structlog.get_logger("ckpt_agent")
WORKER_SILENCE_S = 3.0  # a worker silent this long is frozen: what it owes fails
WATCH_S = 0.25
FLUSH_S = 1.0  # before a re-attach, how long queued messages get to leave


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        cfg.credentials.resolved(read_token=False).check_transport(cfg.daemon)
        self._creds = cfg.credentials  # resolved at each attach: a token file may come later
        self.ipc_dir = ensure_private_dir(
            ipc_dir(cfg.ipc_dir or None), 0o711 if others_allowed() else 0o700
        )  # this user's alone (RendezvousError otherwise); 0711: others' engines are checked
        self.devices = node_devices(self.cfg)
        for d in self.devices:
            why = path_length_problem(worker_endpoint(cfg.node_id, d.index, self.ipc_dir))
            if why:
                raise RendezvousError(why)
        self.held: dict[tuple[str, int, int], tuple[int, str, apb.P2PSource]] = {}
        # command id -> (command, attach session it came on); kept across sessions
        self._pending: dict[int, tuple[apb.Command, int]] = {}
        self._session_no = 0
        self._frozen: set[int] = set()
        self._heartbeat_s = cfg.heartbeat_s
        self._outbox: asyncio.Queue[apb.AgentMessage] | None = None
        self._stop = asyncio.Event()
        self._reattach = asyncio.Event()
        self.supervisor: Supervisor | None = None
        self.attached = asyncio.Event()

    def _free(self) -> list[tpb.Device]:
        """The devices as reported: free memory now, the ceilings their workers measured."""
        workers = self.supervisor.workers if self.supervisor is not None else {}
        ceilings = {d: h.ceilings for d, h in workers.items() if h.ceilings}
        return refreshed(self.devices, self.cfg, ceilings)

    # ---------------------------------------------------------------- workers

    def _on_worker_message(self, device: int, msg: apb.AgentMessage) -> None:
        if msg.WhichOneof("body") == "result":
            entry = self._pending.pop(msg.result.command_id, None)
            cmd = entry[0] if entry is not None else None
            if entry is not None and entry[1] != self._session_no and msg.result.ok:
                self._orphaned(device, entry[0])
                cmd = None
            if cmd is not None and msg.result.ok:
                kind = cmd.WhichOneof("body")
                if kind in ("load", "patch"):
                    made = getattr(cmd, kind)
                    key = (made.checkpoint, made.version, made.device)
                    st = msg.result.store
                    self.held[key] = (st.nbytes, st.segment, st.p2p)
                elif kind == "diff":  # a delta store: held (and dropped) like any other
                    d = cmd.diff
                    key = (delta_store(d.checkpoint, d.base), d.version, d.device)
                    self.held[key] = (
                        msg.result.diff.nbytes,
                        msg.result.diff.segment,
                        apb.P2PSource(),
                    )
                elif kind == "drop":
                    self.held.pop((cmd.drop.checkpoint, cmd.drop.version, cmd.drop.device), None)
        if self._outbox is not None:
            self._outbox.put_nowait(msg)

    def _orphaned(self, device: int, cmd: apb.Command) -> None:
        """A store loaded for a session that has ended: ckptd no longer waits for it."""
        if cmd.WhichOneof("body") != "load":
            return
        ld = cmd.load
        key = (ld.checkpoint, ld.version, device)
        if any(  # a later load of the same version replaces this store: keep that one
            c.WhichOneof("body") == "load"
            and (c.load.checkpoint, c.load.version, c.load.device) == key
            for c, _ in self._pending.values()
        ):
            return
        log.warning(
            "orphan_store_dropped", checkpoint=ld.checkpoint, version=ld.version, device=device
        )
        drop = apb.Drop(checkpoint=ld.checkpoint, version=ld.version, device=device)
        if self.supervisor is not None:  # its result comes back as READY_ID: not relayed
            self.supervisor.send(device, apb.Command(id=READY_ID, drop=drop))

    def _fail_pending(self, device: int, code: str, message: str, tell: bool = False) -> None:
        """Fails what `device`'s worker owes; tell: the worker lives on (frozen) and is told
        to drop the jobs of what failed (it reads that before their commands, see stale)."""
        for cid, (cmd, _) in list(self._pending.items()):
            body = getattr(cmd, cmd.WhichOneof("body"))
            if getattr(body, "device", -1) == device:
                self._pending.pop(cid)
                self._send_result(
                    apb.CommandResult(command_id=cid, ok=False, code=code, message=message)
                )
                if tell and cmd.WhichOneof("body") in JOB_COMMANDS:
                    self._abort_locally(device, body.job_id, message)

    def _abort_locally(self, device: int, job_id: str, reason: str) -> None:
        """Ends a job on one worker without ckptd: what ckptd no longer waits for."""
        if self.supervisor is None:
            return
        try:
            self.supervisor.send(
                device, apb.Command(id=READY_ID, abort=apb.Abort(job_id=job_id, reason=reason))
            )
        except (KeyError, OSError):  # the worker is gone: its commands went with it
            pass

    def _abort_orphans(self) -> None:
        """On a new attach session: the jobs of commands sent on an earlier one were failed
        by ckptd when that session closed; their workers drop them."""
        for cmd, session in list(self._pending.values()):
            kind = cmd.WhichOneof("body")
            if session != self._session_no and kind in JOB_COMMANDS:
                body = getattr(cmd, kind)
                self._abort_locally(body.device, body.job_id, "its attach session ended")

    def _on_worker_death(self, device: int) -> None:
        lost = [k for k in self.held if k[2] == device]
        for k in lost:
            del self.held[k]
        self._frozen.discard(device)
        self._fail_pending(
            device, "UNAVAILABLE", f"worker of device {device} on {self.cfg.node_id} died"
        )
        self._reattach.set()  # tell ckptd what this node holds now

    async def _watch_workers(self) -> None:
        """Notices frozen workers (no heartbeat) and ones that came back."""
        assert self.supervisor is not None
        while True:
            await asyncio.sleep(WATCH_S)
            for d in list(self.supervisor.workers):
                silent = self.supervisor.silent_for(d)
                if silent > WORKER_SILENCE_S and d not in self._frozen:
                    self._frozen.add(d)
                    log.error("worker_unresponsive", device=d, seconds=round(silent, 2))
                    self._fail_pending(d, "UNAVAILABLE", self._frozen_message(d, silent), True)
                elif silent <= WORKER_SILENCE_S and d in self._frozen:
                    self._frozen.discard(d)
                    log.warning("worker_responsive", device=d)

    def _frozen_message(self, device: int, silent: float) -> str:
        return (
            f"worker of device {device} on {self.cfg.node_id} is not responding "
            f"({silent:.1f}s without a heartbeat: frozen?)"
        )

    def _send_result(self, res: apb.CommandResult) -> None:
        if self._outbox is not None:
            self._outbox.put_nowait(apb.AgentMessage(result=res))

    async def _handle(self, cmd: apb.Command) -> None:
        kind = cmd.WhichOneof("body")
        if kind == "scan":
            try:
                result = await asyncio.wait_for(
                    asyncio.to_thread(scan_paths, cmd.scan, self.cfg.source_roots),
                    self.cfg.command_timeout_s,
                )
                self._send_result(apb.CommandResult(command_id=cmd.id, ok=True, scan=result))
            except StoreError as e:
                self._fail(cmd.id, e.code, e.message)
            except TimeoutError:  # a source that blocks (a hung mount): the thread is lost
                self._fail(
                    cmd.id,
                    "DEADLINE_EXCEEDED",
                    f"the scan took over {self.cfg.command_timeout_s:g}s",
                )
            return
        body = getattr(cmd, kind)
        device = getattr(body, "device", None)
        assert self.supervisor is not None
        if kind == "abort":
            for d in self.supervisor.workers:
                self.supervisor.send(d, cmd)
            return
        if device in self._frozen and self.supervisor.silent_for(device) > WORKER_SILENCE_S:
            self._refuse_frozen(cmd, kind, device)
            return
        if device is None or device not in self.supervisor.workers:
            self._fail(cmd.id, "NOT_FOUND", f"no device {device} on this node")
            return
        self._pending[cmd.id] = (cmd, self._session_no)
        self.supervisor.send(device, cmd)

    def _fail(self, command_id: int, code: str, message: str) -> None:
        self._send_result(
            apb.CommandResult(command_id=command_id, ok=False, code=code, message=message)
        )

    def _refuse_frozen(self, cmd: apb.Command, kind: str, device: int) -> None:
        """Fails a command for a frozen worker at once; a drop is still queued for it (it
        runs when the worker wakes up) and forgotten here already."""
        assert self.supervisor is not None
        if kind == "drop":
            self.held.pop((cmd.drop.checkpoint, cmd.drop.version, device), None)
            self.supervisor.send(device, apb.Command(id=READY_ID, drop=cmd.drop))
        silent = self.supervisor.silent_for(device)
        self._send_result(
            apb.CommandResult(
                command_id=cmd.id,
                ok=False,
                code="UNAVAILABLE",
                message=self._frozen_message(device, silent),
            )
        )

    # ---------------------------------------------------------------- the stream

    def _hello(self) -> apb.AgentMessage:
        return apb.AgentMessage(
            hello=apb.Hello(
                node_id=self.cfg.node_id,
                host=self.cfg.host,
                devices=self._free(),
                stores=[
                    apb.HeldStore(checkpoint=c, version=v, device=d, nbytes=n, segment=s, p2p=p)
                    for (c, v, d), (n, s, p) in self.held.items()
                ],
                version=__version__,
                pid=os.getpid(),
                ipc_dir=self.ipc_dir,
                host_free_bytes=free_host_bytes(),
            )
        )

    def _channel(self) -> grpc.aio.Channel:
        try:
            self._creds = self.cfg.credentials.resolved()
        except OSError as e:  # e.g. ckptd has not written its local token yet: the next try
            log.warning("credentials_unreadable", error=str(e))
        opts = [*channel_args(), ("grpc.keepalive_time_ms", 10_000)]
        if self._creds.tls:
            return grpc.aio.secure_channel(
                self.cfg.daemon, self._creds.channel_credentials(), options=opts
            )
        return grpc.aio.insecure_channel(self.cfg.daemon, options=opts)

    async def _session(self, stub: agent_pb2_grpc.AgentLinkStub) -> None:
        outbox: asyncio.Queue[apb.AgentMessage] = asyncio.Queue()
        outbox.put_nowait(self._hello())
        self._outbox = outbox
        self._reattach.clear()
        self._session_no += 1
        self._abort_orphans()

        async def outgoing():
            while True:
                yield await outbox.get()

        call = stub.Attach(outgoing(), metadata=self._creds.metadata())

        async def heartbeats() -> None:
            while True:
                await asyncio.sleep(self._heartbeat_s)
                outbox.put_nowait(
                    apb.AgentMessage(
                        heartbeat=apb.Heartbeat(
                            devices=self._free(), host_free_bytes=free_host_bytes()
                        )
                    )
                )

        async def reattach() -> None:
            await self._reattach.wait()
            # what was queued first (results failed by a worker's death) leaves first
            deadline = time.monotonic() + FLUSH_S
            while not outbox.empty() and time.monotonic() < deadline:
                await asyncio.sleep(0.02)
            await asyncio.sleep(0.1)
            call.cancel()

        hb = asyncio.create_task(heartbeats())
        ra = asyncio.create_task(reattach())
        try:
            async for msg in call:
                kind = msg.WhichOneof("body")
                if kind == "welcome":
                    # ckptd judges silence by its own period: beat at least as often
                    beat = msg.welcome.heartbeat_s
                    if beat > 0:
                        self._heartbeat_s = min(self.cfg.heartbeat_s, beat)
                    log.info("attached", daemon=self.cfg.daemon, heartbeat_s=self._heartbeat_s)
                    self.attached.set()
                elif kind == "command":
                    await self._handle(msg.command)
        finally:
            hb.cancel()
            ra.cancel()
            self._outbox = None
            self.attached.clear()

    async def run(self) -> None:
        removed = shm.remove_prefix(segment_prefix(self.cfg.node_id))
        if removed:
            log.warning("stale_segments_removed", count=removed)
        loop = asyncio.get_running_loop()
        self.supervisor = Supervisor(
            node_id=self.cfg.node_id,
            kind=self.cfg.device,
            ipc_dir=self.ipc_dir,
            host=self.cfg.host,
            log_level=self.cfg.log_level,
            p2p=self._p2p_enabled(),
            source_roots=self.cfg.source_roots,
            stores=self.cfg.stores,
            tunables=self.cfg.tunables,
            loop=loop,
            devices=[d.index for d in self.devices],
            on_message=self._on_worker_message,
            on_death=self._on_worker_death,
        )
        watch: asyncio.Task[None] | None = None
        try:
            await self.supervisor.wait_ready(120)
            watch = asyncio.create_task(self._watch_workers())
            log.info("workers_ready", devices=len(self.devices))
            backoff = 0.2
            while not self._stop.is_set():
                started = time.monotonic()
                async with self._channel() as channel:
                    stub = agent_pb2_grpc.AgentLinkStub(channel)
                    session = asyncio.create_task(self._session(stub))
                    stop = asyncio.create_task(self._stop.wait())
                    await asyncio.wait({session, stop}, return_when=asyncio.FIRST_COMPLETED)
                    stop.cancel()
                    if not session.done():
                        session.cancel()
                    try:
                        await session
                    except (asyncio.CancelledError, grpc.aio.AioRpcError) as e:
                        if isinstance(e, grpc.aio.AioRpcError):
                            log.warning("detached", code=e.code().name, details=e.details())
                if self._stop.is_set():
                    break
                if time.monotonic() - started > 5:
                    backoff = 0.2
                await asyncio.sleep(backoff)
                backoff = min(backoff * 2, 5.0)
        finally:
            if watch is not None:
                watch.cancel()
            self.supervisor.stop()
            removed = shm.remove_prefix(segment_prefix(self.cfg.node_id))
            log.info("agent_stopped", segments_removed=removed)

    def _p2p_enabled(self) -> bool:
        if self.cfg.p2p == "off":
            return False
        if not self.cfg.trusted_fabric:
            log.info("p2p_off", reason="the fabric is not declared trusted (--trusted-fabric)")
            return False
        from ckpt_agent.p2p import available

        if available():
            return True
        if self.cfg.p2p == "on":
            raise RuntimeError("--p2p on, but Mooncake is not installed (pip install ckptd[p2p])")
        return False

    def stop(self) -> None:
        self._stop.set()
