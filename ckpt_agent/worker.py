"""One device's worker process: host store, engine hand-off socket, update pipeline.

Talks to its agent over a pipe with protobuf bytes (Command down, AgentMessage up), never
pickle. Dies with its agent: the pipe's EOF ends it, and PR_SET_PDEATHSIG backs that up.
"""

from __future__ import annotations

import ctypes
import os
import signal
import threading
import time
import traceback
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from multiprocessing import shared_memory
from multiprocessing.connection import Connection
from typing import TYPE_CHECKING, Any

import structlog

from ckpt.v1 import agent_pb2 as apb
from ckpt_agent import delta_stores, shm, tunables
from ckpt_agent.backends import Backend, make_backend
from ckpt_agent.config import WorkerSpec
from ckpt_agent.group_abort import Abort, PeerWatch
from ckpt_agent.group_store import finished, group_key, serve_store, store_client
from ckpt_agent.host_store import HostStore, StoreError
from ckpt_agent.receiver_link import ReceiverLink
from ckpt_agent.siblings import SiblingStores
from ckpt_agent.stale import EndedJobs, read_batch
from ckpt_common.ipc import worker_endpoint
from ckpt_common.logs import setup_logging

if TYPE_CHECKING:
    import torch.distributed as dist

    from ckpt_agent.p2p import P2PEngine

log = structlog.get_logger("ckpt_agent.worker")
READY_ID = 0  # command_id of the result a worker sends once it is ready
HEARTBEAT_S = 0.5  # a worker tells its agent it is alive this often (frozen: it stops)


def buffer_address(mem: shared_memory.SharedMemory) -> int:
    """The address of a shared-memory mapping's first byte."""
    c = ctypes.c_char.from_buffer(shm.buffer(mem))
    addr = ctypes.addressof(c)
    del c
    return addr


def die_with_parent() -> None:
    try:
        libc = ctypes.CDLL("libc.so.6", use_errno=True)
        libc.prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
    except OSError:
        pass


class Worker:
    def __init__(self, conn: Connection, spec: WorkerSpec) -> None:
        self._conn = conn
        self._send_lock = threading.Lock()
        node_id, device = spec.node_id, spec.device
        self.node_id, self.device, self.host = node_id, device, spec.host
        self.store_options = spec.stores
        self.backend: Backend = make_backend(
            spec.kind, node_id=node_id, device=device, host=spec.host
        )
        # CUDA: a dropped store stays pinned as a spare for the next version; unpinned when
        # its memory goes (the CPU backend pins nothing)
        self.stores = HostStore(
            node_id,
            device,
            spares=self.store_options.spares_for(spec.kind),
            release=self.backend.unpin_store if self.backend.pins_stores else None,
            roots=spec.source_roots,
        )
        self.link = ReceiverLink(worker_endpoint(node_id, device, spec.ipc_dir))
        self._io = ThreadPoolExecutor(1, thread_name_prefix="store")
        self._group_stores: dict[str, dist.Store] = {}
        self._aborts: dict[str, Abort] = {}
        self.ended = EndedJobs()  # jobs ckptd aborted: their late commands are dropped
        self._update_lock = threading.Lock()
        self._p2p_enabled = spec.p2p
        self._p2p_engine: P2PEngine | None = None
        self.siblings = SiblingStores(node_id, self.backend, self.stores)

    def p2p(self) -> P2PEngine:
        """The transfer engine, started on first use."""
        if self._p2p_engine is None:
            from ckpt_agent.p2p import P2PEngine

            self._p2p_engine = P2PEngine(self.host, self.device)
        return self._p2p_engine

    def send(self, msg: apb.AgentMessage) -> None:
        data = msg.SerializeToString()
        with self._send_lock:
            self._conn.send_bytes(data)

    def reply(self, cid: int, **kw: Any) -> None:
        self.send(apb.AgentMessage(result=apb.CommandResult(command_id=cid, **kw)))

    def fail(self, cid: int, code: str, message: str) -> None:
        self.reply(cid, ok=False, code=code, message=message)

    def _heartbeats(self) -> None:
        beat = apb.AgentMessage(heartbeat=apb.Heartbeat())
        while True:
            time.sleep(HEARTBEAT_S)
            try:
                self.send(beat)
            except (OSError, ValueError):  # the agent is gone
                return

    def serve(self) -> None:
        if self._p2p_enabled:
            self.p2p()  # start the transfer engine now, not inside the first load or join
        from ckpt_agent.ceilings import measure

        ready = apb.WorkerReady(ceilings=measure(self.backend.kind, self.backend.torch_device()))
        self.reply(READY_ID, ok=True, ready=ready)
        if self.store_options.prealloc_bytes:  # loads queue behind it on the store thread
            self._io.submit(self._preallocate)
        threading.Thread(target=self._heartbeats, name="heartbeat", daemon=True).start()
        while True:
            try:  # what waits in the pipe is read first: aborts act before stale commands
                batch = read_batch(self._conn, self._conn.recv_bytes())
            except (EOFError, OSError):
                return
            for cmd in batch:
                try:
                    self.handle(cmd)
                except Exception as e:
                    log.exception("command_crashed", command=cmd.WhichOneof("body"))
                    self.fail(cmd.id, "INTERNAL", f"{type(e).__name__}: {e}")

    def handle(self, cmd: apb.Command) -> None:
        kind = cmd.WhichOneof("body")
        stale = self.ended.stale(cmd)
        if stale is not None:
            log.warning("stale_command_dropped", command=kind, why=stale)
            self.fail(cmd.id, "ABORTED", stale)
            return
        if kind == "load":
            self._io.submit(self._guard, cmd.id, self._load, cmd)
        elif kind == "seal":
            self._io.submit(self._guard, cmd.id, self._seal, cmd)
        elif kind == "drop":
            self._io.submit(self._guard, cmd.id, self._drop, cmd)
        elif kind == "diff":
            self._io.submit(self._guard, cmd.id, self._diff, cmd)
        elif kind == "patch":
            self._io.submit(self._guard, cmd.id, self._patch, cmd)
        elif kind == "prepare_group":
            self._prepare(cmd)
        elif kind == "run_update":
            threading.Thread(
                target=self._guard,
                args=(cmd.id, self._update, cmd),
                name=f"update-{cmd.run_update.job_id}",
                daemon=True,
            ).start()
        elif kind == "abort":
            self._abort(cmd.abort)
        else:
            self.fail(cmd.id, "UNIMPLEMENTED", f"worker cannot {kind}")

    def _abort(self, a: apb.Abort) -> None:
        """Trips the job's running update; remembers the job as ended (its commands still
        on their way are dropped) and closes a group store prepared for it, never used."""
        why = f"aborted by ckptd: {a.reason or 'no reason given'}"
        self.ended.end(a.job_id, why)
        ev = self._aborts.get(a.job_id)
        if ev:
            ev.trip(why, apb.ORIGIN_DAEMON)
        for key in [k for k in self._group_stores if k.split("/", 1)[0] == a.job_id]:
            self._group_stores.pop(key, None)  # its listening socket closes with it

    def _guard(self, cid: int, fn: Callable[[apb.Command], None], cmd: apb.Command) -> None:
        try:
            fn(cmd)
        except StoreError as e:
            self.fail(cid, e.code, e.message)
        except Exception as e:
            log.error("command_failed", error=repr(e), tb=traceback.format_exc())
            self.fail(cid, "INTERNAL", f"{type(e).__name__}: {e}")

    def _load(self, cmd: apb.Command) -> None:
        t_load = time.monotonic()
        ready = self.stores.load(cmd.load)
        if cmd.load.items:  # a file push: checksums of what landed (a direct push: at Seal)
            ready.checksums.extend(
                self.stores.checksums(cmd.load.checkpoint, cmd.load.version, cmd.load.items)
            )
        self._made(cmd.id, cmd.load.checkpoint, cmd.load.version, ready, t_load)

    def _patch(self, cmd: apb.Command) -> None:
        t0 = time.monotonic()
        ready = delta_stores.patch(self.stores, cmd.patch)
        self._made(cmd.id, cmd.patch.checkpoint, cmd.patch.version, ready, t0)

    def _made(
        self, cid: int, checkpoint: str, version: int, ready: apb.StoreReady, t0: float
    ) -> None:
        """A new store is in: pinned (CUDA: the first update runs at DMA speed) and
        registered for P2P reads, then reported."""
        if self.backend.pins_stores:
            self.backend.pin_store(self.stores.get(checkpoint, version))
            ready.seconds = time.monotonic() - t0
        if self._p2p_enabled:
            store = self.stores.get(checkpoint, version)
            addr = buffer_address(store.mem)
            engine = self.p2p()
            engine.register(addr, store.nbytes)
            ready.p2p.session, ready.p2p.addr = engine.session, addr
        log.info(
            "store_loaded", checkpoint=checkpoint, version=version, bytes=ready.nbytes,
            seconds=round(ready.seconds, 4), p2p=ready.p2p.session,
        )  # fmt: skip
        self.reply(cid, ok=True, store=ready)

    def _preallocate(self) -> None:
        nbytes = self.store_options.prealloc_bytes
        t0 = time.monotonic()
        try:
            pin = self.backend.pin_store if self.backend.pins_stores else None
            made = self.stores.preallocate(nbytes, pin)
        except StoreError as e:
            log.warning("stores_not_preallocated", bytes=nbytes, reason=e.message)
            return
        log.info("stores_preallocated", stores=made, bytes=nbytes, seconds=time.monotonic() - t0)

    def _seal(self, cmd: apb.Command) -> None:
        t0 = time.monotonic()
        s = cmd.seal
        sums = self.stores.checksums(s.checkpoint, s.version, s.items)
        self.reply(
            cmd.id,
            ok=True,
            store=apb.StoreReady(checksums=sums, seconds=time.monotonic() - t0),
        )

    def _diff(self, cmd: apb.Command) -> None:
        pin = self.backend.pin_store if self.backend.pins_stores else None
        done = delta_stores.make(self.stores, cmd.diff, pin)
        log.info(
            "delta_made", checkpoint=cmd.diff.checkpoint, version=cmd.diff.version,
            base=cmd.diff.base, bytes=done.nbytes, seconds=round(done.seconds, 4),
        )  # fmt: skip
        self.reply(cmd.id, ok=True, diff=done)

    def _drop(self, cmd: apb.Command) -> None:
        if self._p2p_engine is not None:
            try:
                store = self.stores.get(cmd.drop.checkpoint, cmd.drop.version)
                self._p2p_engine.unregister(buffer_address(store.mem))
            except StoreError:
                pass
        self.stores.drop(cmd.drop.checkpoint, cmd.drop.version)
        self.reply(cmd.id, ok=True)

    def _prepare(self, cmd: apb.Command) -> None:
        p = cmd.prepare_group
        store = serve_store(self.host, p.world_size)
        self._group_stores = {group_key(p): store}  # one group at a time per device
        self.reply(cmd.id, ok=True, group=apb.GroupReady(addr=self.host, port=store.port))

    def _group_store(self, u: apb.RunUpdate, abort: Abort) -> dist.Store:
        """The job's store (rank 0 holds the server since PrepareGroup), scoped to the job
        so a reused store never mixes two groups."""
        import torch.distributed as dist

        store = self._group_stores.pop(group_key(u), None)
        if store is None:
            store = store_client(u.rendezvous, abort)
        return dist.PrefixStore(f"job/{group_key(u)}", store)

    def _lock_update(self, abort: Abort, u: apb.RunUpdate) -> None:
        """One update at a time; a job aborted (or out of time) while it waits gives up."""
        deadline = time.monotonic() + max(1.0, u.deadlines.timeout_s)
        if abort.is_set():  # the job ended before its turn came
            raise StoreError("ABORTED", abort.reason)
        while not self._update_lock.acquire(timeout=0.2):
            if abort.is_set() or time.monotonic() > deadline:
                raise StoreError("ABORTED", abort.reason or "another update held this device")

    def _update(self, cmd: apb.Command) -> None:
        from ckpt_agent.pipeline import run_update

        u = cmd.run_update
        abort = self._aborts.setdefault(u.job_id, Abort())
        ended = self.ended.why(u.job_id)  # an Abort handled before the line above
        if ended is not None:
            abort.trip(ended, apb.ORIGIN_DAEMON)  # ended: only ckptd's Abort ends a job
        watch: PeerWatch | None = None
        store: dist.Store | None = None
        hosting = group_key(u) in self._group_stores  # this rank serves the group's store
        result: apb.UpdateDone | None = None
        try:
            self._lock_update(abort, u)
            try:
                import torch.distributed as dist

                store = self._group_store(u, abort)
                scoped = lambda: dist.PrefixStore(  # noqa: E731
                    f"job/{group_key(u)}", store_client(u.rendezvous)
                )
                watch = PeerWatch(scoped, store, abort).start()
                where = f"rank {u.rendezvous.group_rank} ({self.node_id}/{self.device})"
                result = run_update(
                    u,
                    backend=self._update_backend(u),
                    stores=self._update_stores(u),
                    link=self.link,
                    group_store=store,
                    abort=abort,
                    progress=lambda k, n: self._progress(u, k, n),
                    publish=lambda why: watch.publish(f"{where}: {why}") if watch else None,
                )
            finally:
                self._update_lock.release()
        finally:
            if watch is not None:
                watch.stop()
            self._aborts.pop(u.job_id, None)
            if store is not None:
                ok = hosting and result is not None and result.result.ok
                finished(store, u.rendezvous.world_size, ok)
        assert result is not None  # run_update returned (it raises otherwise)
        result.result.node_id, result.result.device = self.node_id, self.device
        self.reply(cmd.id, ok=True, update=result)

    def _progress(self, u: apb.RunUpdate, bucket: int, nbytes: int) -> None:
        self.send(
            apb.AgentMessage(
                progress=apb.Progress(
                    job_id=u.job_id, device=self.device, bucket=bucket, bytes=nbytes
                )
            )
        )

    def _update_backend(self, u: apb.RunUpdate) -> Backend:
        if not u.plan.sources:
            return self.backend
        from ckpt_agent.backends.p2p import P2PReadBackend

        remote = any(not s.local_segment for s in u.plan.sources)
        engine = self.p2p() if remote else None  # same-node sources need no transfer engine
        self.siblings.prune()
        return P2PReadBackend(self.backend, engine, list(u.plan.sources), self.siblings)

    def _update_stores(self, u: apb.RunUpdate) -> HostStore | None:
        """This rank's stores; none for P2P reads (their sources are other ranks' stores)."""
        return None if u.plan.sources else self.stores

    def close(self) -> None:
        self.siblings.close()
        self.backend.close()  # first: it unpins the stores and drops its views of them
        self.stores.close()
        self.link.close()


def worker_main(conn: Connection, spec: WorkerSpec) -> None:
    """A worker process's entry point (spawned by the supervisor)."""
    die_with_parent()
    # The agent stops its workers (pipe EOF) and cleans up after them: a signal sent to the
    # whole process group must not kill a worker before its segments are unlinked.
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    setup_logging(
        json=True,
        level=spec.log_level,
        service="ckpt-agent",
        node=spec.node_id,
        device=spec.device,
        pid=os.getpid(),
    )
    import torch  # noqa: F401  (import once, before the first update, not during it)

    tunables.install(spec.tunables)
    w = Worker(conn, spec)
    try:
        w.serve()
    finally:
        try:
            w.close()
        finally:
            # Gloo threads of a group given up on may still wait for their timeout: do not
            # let interpreter shutdown join them.
            os._exit(0)
