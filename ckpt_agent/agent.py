"""The agent: attaches to ckptd (re-attaching by itself), heartbeats, relays commands to its
device workers, scans push sources, and remembers which stores it holds."""

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
from ckpt_agent.backend import free_host_bytes
from ckpt_agent.config import AgentConfig
from ckpt_agent.host_store import StoreError, segment_prefix
from ckpt_agent.scan import scan_paths
from ckpt_agent.supervisor import Supervisor
from ckpt_common.ipc import ensure_private_dir, ipc_dir

log = structlog.get_logger("ckpt_agent")


class Agent:
    def __init__(self, cfg: AgentConfig) -> None:
        self.cfg = cfg
        self.ipc_dir = ensure_private_dir(ipc_dir(cfg.ipc_dir or None))
        self.devices = self._devices()
        self.held: dict[tuple[str, int, int], tuple[int, str, apb.P2PSource]] = {}
        self._pending: dict[int, apb.Command] = {}
        self._outbox: asyncio.Queue[apb.AgentMessage] | None = None
        self._stop = asyncio.Event()
        self._reattach = asyncio.Event()
        self.supervisor: Supervisor | None = None
        self.attached = asyncio.Event()

    def _devices(self) -> list[tpb.Device]:
        if self.cfg.device == "cuda":
            from ckpt_agent.cuda_backend import list_devices

            devs = list_devices()
            return devs[: self.cfg.slots] if self.cfg.slots else devs
        total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
        return [
            tpb.Device(
                index=i,
                kind="cpu",
                uuid=f"{self.cfg.node_id}/{i}",
                total_bytes=total // self.cfg.slots,
                free_bytes=free_host_bytes() // self.cfg.slots,
            )
            for i in range(self.cfg.slots)
        ]

    def _free(self) -> list[tpb.Device]:
        if self.cfg.device == "cpu":
            free = free_host_bytes() // self.cfg.slots
            for d in self.devices:
                d.free_bytes = free
        else:
            from ckpt_agent.cuda_backend import free_bytes

            for d in self.devices:
                d.free_bytes = free_bytes(d.index)
        return list(self.devices)

    # ---------------------------------------------------------------- workers

    def _on_worker_message(self, device: int, msg: apb.AgentMessage) -> None:
        if msg.WhichOneof("body") == "result":
            cmd = self._pending.pop(msg.result.command_id, None)
            if cmd is not None and msg.result.ok:
                kind = cmd.WhichOneof("body")
                if kind == "load":
                    key = (cmd.load.checkpoint, cmd.load.version, cmd.load.device)
                    st = msg.result.store
                    self.held[key] = (st.nbytes, st.segment, st.p2p)
                elif kind == "drop":
                    self.held.pop((cmd.drop.checkpoint, cmd.drop.version, cmd.drop.device), None)
        if self._outbox is not None:
            self._outbox.put_nowait(msg)

    def _on_worker_death(self, device: int) -> None:
        lost = [k for k in self.held if k[2] == device]
        for k in lost:
            del self.held[k]
        for cid, cmd in list(self._pending.items()):
            body = getattr(cmd, cmd.WhichOneof("body"))
            if getattr(body, "device", -1) == device:
                self._pending.pop(cid)
                self._send_result(
                    apb.CommandResult(
                        command_id=cid,
                        ok=False,
                        code="UNAVAILABLE",
                        message=f"worker of device {device} on {self.cfg.node_id} died",
                    )
                )
        self._reattach.set()  # tell ckptd what this node holds now

    def _send_result(self, res: apb.CommandResult) -> None:
        if self._outbox is not None:
            self._outbox.put_nowait(apb.AgentMessage(result=res))

    async def _handle(self, cmd: apb.Command) -> None:
        kind = cmd.WhichOneof("body")
        if kind == "scan":
            try:
                result = await asyncio.to_thread(scan_paths, list(cmd.scan.paths))
                self._send_result(apb.CommandResult(command_id=cmd.id, ok=True, scan=result))
            except StoreError as e:
                self._send_result(
                    apb.CommandResult(command_id=cmd.id, ok=False, code=e.code, message=e.message)
                )
            return
        body = getattr(cmd, kind)
        device = getattr(body, "device", None)
        assert self.supervisor is not None
        if kind == "abort":
            for d in self.supervisor.workers:
                self.supervisor.send(d, cmd)
            return
        if device is None or device not in self.supervisor.workers:
            self._send_result(
                apb.CommandResult(
                    command_id=cmd.id,
                    ok=False,
                    code="NOT_FOUND",
                    message=f"no device {device} on this node",
                )
            )
            return
        self._pending[cmd.id] = cmd
        self.supervisor.send(device, cmd)

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
            )
        )

    async def _session(self, stub: agent_pb2_grpc.AgentLinkStub) -> None:
        outbox: asyncio.Queue[apb.AgentMessage] = asyncio.Queue()
        outbox.put_nowait(self._hello())
        self._outbox = outbox
        self._reattach.clear()

        async def outgoing():
            while True:
                yield await outbox.get()

        call = stub.Attach(outgoing())

        async def heartbeats() -> None:
            while True:
                await asyncio.sleep(self.cfg.heartbeat_s)
                outbox.put_nowait(apb.AgentMessage(heartbeat=apb.Heartbeat(devices=self._free())))

        async def reattach() -> None:
            await self._reattach.wait()
            call.cancel()

        hb = asyncio.create_task(heartbeats())
        ra = asyncio.create_task(reattach())
        try:
            async for msg in call:
                kind = msg.WhichOneof("body")
                if kind == "welcome":
                    log.info("attached", daemon=self.cfg.daemon)
                    self.attached.set()
                elif kind == "command":
                    await self._handle(msg.command)
        finally:
            hb.cancel()
            ra.cancel()
            self._outbox = None
            self.attached.clear()
            self._pending.clear()

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
            loop=loop,
            devices=[d.index for d in self.devices],
            on_message=self._on_worker_message,
            on_death=self._on_worker_death,
        )
        try:
            await self.supervisor.wait_ready(120)
            log.info("workers_ready", devices=len(self.devices))
            backoff = 0.2
            while not self._stop.is_set():
                started = time.monotonic()
                async with grpc.aio.insecure_channel(
                    self.cfg.daemon,
                    options=[
                        ("grpc.max_send_message_length", 512 << 20),
                        ("grpc.max_receive_message_length", 512 << 20),
                        ("grpc.keepalive_time_ms", 10_000),
                    ],
                ) as channel:
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
            self.supervisor.stop()

    def _p2p_enabled(self) -> bool:
        if self.cfg.p2p == "off":
            return False
        from ckpt_agent.p2p import available

        if available():
            return True
        if self.cfg.p2p == "on":
            raise RuntimeError("--p2p on, but Mooncake is not installed (pip install ckptd[p2p])")
        return False

    def stop(self) -> None:
        self._stop.set()
