"""Starts one worker process per device, relays bytes both ways, notices deaths (and
silence: a worker heartbeats; `silent_for` says how long one has said nothing). A dead
worker's shared-memory segments are unlinked before it is restarted."""

from __future__ import annotations

import asyncio
import multiprocessing as mp
import threading
import time
from collections.abc import Callable
from multiprocessing.connection import Connection
from multiprocessing.process import BaseProcess

import structlog

from ckpt.v1 import agent_pb2 as apb
from ckpt_agent import shm
from ckpt_agent.config import StoreOptions, WorkerSpec
from ckpt_agent.host_store import device_prefix
from ckpt_agent.tunables import Tunables
from ckpt_agent.worker import READY_ID, worker_main

log = structlog.get_logger("ckpt_agent.supervisor")


class WorkerHandle:
    def __init__(self, device: int, proc: BaseProcess, conn: Connection) -> None:
        self.device = device
        self.proc = proc
        self.conn = conn
        self.ready = threading.Event()
        self.ceilings: dict[str, float] = {}  # what the worker measured of its device
        self.last_seen = time.monotonic()
        self._lock = threading.Lock()

    def send(self, cmd: apb.Command) -> None:
        data = cmd.SerializeToString()
        with self._lock:
            self.conn.send_bytes(data)


class Supervisor:
    """on_message(device, AgentMessage) and on_death(device) run on the event loop."""

    def __init__(
        self,
        *,
        node_id: str,
        kind: str,
        devices: list[int],
        ipc_dir: str,
        host: str,
        log_level: str,
        p2p: bool,
        source_roots: tuple[str, ...],
        stores: StoreOptions | None = None,
        tunables: Tunables | None = None,
        loop: asyncio.AbstractEventLoop,
        on_message: Callable[[int, apb.AgentMessage], None],
        on_death: Callable[[int], None],
    ) -> None:
        self._specs = {
            d: WorkerSpec(
                node_id=node_id,
                device=d,
                kind=kind,
                ipc_dir=ipc_dir,
                host=host,
                log_level=log_level,
                p2p=p2p,
                source_roots=source_roots,
                stores=stores or StoreOptions(),
                tunables=tunables or Tunables(),
            )
            for d in devices
        }
        self._loop = loop
        self._on_message = on_message
        self._on_death = on_death
        self._ctx = mp.get_context("spawn")
        self.workers: dict[int, WorkerHandle] = {}
        self._stopping = False
        for d in devices:
            self._start(d)

    def _start(self, device: int) -> None:
        parent, child = self._ctx.Pipe(duplex=True)
        proc = self._ctx.Process(
            target=worker_main,
            name=f"ckpt-worker-{device}",
            daemon=True,
            args=(child, self._specs[device]),
        )
        proc.start()
        child.close()
        h = WorkerHandle(device, proc, parent)
        self.workers[device] = h
        threading.Thread(
            target=self._read, args=(h,), daemon=True, name=f"worker-reader-{device}"
        ).start()

    def _read(self, h: WorkerHandle) -> None:
        while True:
            try:
                data = h.conn.recv_bytes()
            except (EOFError, OSError, TypeError):  # TypeError: closed under us at stop
                break
            h.last_seen = time.monotonic()
            msg = apb.AgentMessage.FromString(data)
            if msg.WhichOneof("body") == "heartbeat":
                continue
            if msg.WhichOneof("body") == "result" and msg.result.command_id == READY_ID:
                h.ceilings = dict(msg.result.ready.ceilings)
                h.ready.set()
                continue
            self._loop.call_soon_threadsafe(self._on_message, h.device, msg)
        h.proc.join(timeout=5)
        if not self._stopping:
            log.error("worker_died", device=h.device, exitcode=h.proc.exitcode)
            self._loop.call_soon_threadsafe(self._restart, h.device)

    def _restart(self, device: int) -> None:
        if self._stopping:
            return
        old = self.workers[device]
        if old.proc.is_alive():  # its pipe broke, yet it runs: it must not touch the segments
            old.proc.kill()
            old.proc.join(5)
        removed = shm.remove_prefix(device_prefix(self._specs[device].node_id, device))
        log.warning("worker_restarting", device=device, segments_removed=removed)
        self._on_death(device)
        self._start(device)

    def silent_for(self, device: int) -> float:
        """Seconds since the worker of `device` last said anything (heartbeats included)."""
        h = self.workers.get(device)
        if h is None or not h.ready.is_set():
            return 0.0
        return time.monotonic() - h.last_seen

    async def wait_ready(self, timeout: float) -> None:
        for h in list(self.workers.values()):
            ok = await asyncio.to_thread(h.ready.wait, timeout)
            if not ok:
                raise TimeoutError(f"worker for device {h.device} did not start in {timeout}s")

    def send(self, device: int, cmd: apb.Command) -> None:
        h = self.workers.get(device)
        if h is None:
            raise KeyError(device)
        h.send(cmd)

    def stop(self) -> None:
        self._stopping = True
        for h in self.workers.values():
            try:
                h.conn.close()
            except OSError:
                pass
        for h in self.workers.values():
            h.proc.join(timeout=5)
            if h.proc.is_alive():
                h.proc.kill()
                h.proc.join(timeout=5)
