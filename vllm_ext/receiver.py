"""The framework-agnostic receiving loop: what any engine runs to take one update from the
agent worker on its device.

    r = Receiver(worker_endpoint(node_id, device))
    done = r.receive(validate=check_names, load=lambda info, tensors: model.load(tensors))

`load` gets an iterator of (name, tensor) views into the shared buffer. A view is valid until
the iterator advances past its bucket, except tensors the worker flags `copy` (their layer
continues in a later bucket) and tensors cut into chunks, which are handed over as copies.
"""

from __future__ import annotations

import os
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import zmq
from zmq.utils.monitor import recv_monitor_message

from ckpt.v1 import ipc_pb2 as ipb
from ckpt.v1 import types_pb2 as tpb
from ckpt_common import checksum
from ckpt_common.dtypes import torch_dtype
from ckpt_common.ipc import keepalive, socket_dir_refusal
from ckpt_common.layout_wire import to_pb as layout_pb
from ckpt_common.rendezvous import peer_refusal, trusted_uids
from vllm_ext.assembly import Assembly, kept_problem, pieces_problem
from vllm_ext.buffers import MappedBuffer
from vllm_ext.delta_apply import Base, apply_all

HELLO_EVERY_S = 2.0


def _warm_checksum(device: Any) -> None:
    """Builds (or loads) the GPU checksum kernel now, not inside the first update."""
    import torch

    checksum.of_torch(torch.zeros(1 << 16, dtype=torch.uint8, device=device))


class ReceiveError(Exception):
    pass


@dataclass(frozen=True, kw_only=True)
class UpdateInfo:
    job_id: str
    checkpoint: str
    version: int
    tensors: list[tpb.TensorMeta]
    partial: bool
    device: int
    kept: bool = False  # the tensors are this rank's parts (TensorMeta.piece_*)


Validate = Callable[[UpdateInfo], str | None]
Load = Callable[[UpdateInfo, Iterator[tuple[str, Any]]], None]
Layout = Callable[[UpdateInfo], dict[str, Any]]  # the engine's sharding map (vllm_ext.layout)


@dataclass(frozen=True, kw_only=True, slots=True)
class UpdateOutcome:
    """How one update ended on this engine rank (what it also told its worker)."""

    ok: bool
    reason: str = ""
    checkpoint: str = ""
    version: int = 0
    touched: bool = False  # the loader was handed tensors: the engine may hold a mix


class Receiver:
    def __init__(
        self, endpoint: str, *, engine: str = "reference", device: Any = None, parts: bool = False
    ) -> None:
        """parts: an engine that takes kept parts as they are (shaped as their box) rather
        than inside a tensor of the full shape (what vLLM's loaders need)."""
        self.endpoint = endpoint
        self.parts = parts
        self.engine = engine
        self.device = device  # torch device for CUDA buffers
        self.trusted = trusted_uids()  # who may be the worker (SO_PEERCRED, every message)
        self._ctx = zmq.Context.instance()
        self._sock: zmq.Socket | None = None
        self._mon: zmq.Socket | None = None
        self.buffer = MappedBuffer()
        if device is not None and getattr(device, "type", str(device)).startswith("cuda"):
            _warm_checksum(device)
        self._job = ""  # the update under way: replies name it, other jobs' messages are skipped
        self._next: ipb.WorkerMessage | None = None  # a newer job's Begin that ended the last
        self._base: Base | None = None  # the update's base tensors (delta updates)

    def _socket(self) -> zmq.Socket:
        if self._sock is None:
            why = socket_dir_refusal(self.endpoint)
            if why:
                raise ReceiveError(why)
            s = self._ctx.socket(zmq.DEALER)
            s.setsockopt(zmq.LINGER, 0)
            keepalive(s)
            # A disconnect tells an engine in the middle of an update that its worker died
            # (or is stopped: it missed the heartbeats): it gives up at once rather than at
            # its step timeout (ZMQ reconnects by itself for the next update).
            self._mon = s.get_monitor_socket(zmq.EVENT_DISCONNECTED)
            s.connect(self.endpoint)
            self._sock = s
        return self._sock

    def _worker_lost(self) -> bool:
        """Drains the monitor: whether the worker disconnected since the last look."""
        lost = False
        while self._mon is not None and self._mon.poll(0):
            lost = recv_monitor_message(self._mon)["event"] == zmq.EVENT_DISCONNECTED or lost
        return lost

    def _send(self, msg: ipb.ReceiverMessage) -> None:
        msg.job_id = "" if msg.HasField("hello") else self._job
        self._socket().send(msg.SerializeToString())

    def _recv(self, timeout_s: float, kinds: tuple[str, ...]) -> ipb.WorkerMessage | None:
        sock = self._socket()
        poller = zmq.Poller()
        poller.register(sock, zmq.POLLIN)
        if self._mon is not None:
            poller.register(self._mon, zmq.POLLIN)
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if left <= 0:
                return None
            # Short polls, so signal handlers run while an engine waits for an update.
            ready = dict(poller.poll(max(1, int(min(left, 0.5) * 1000))))
            if self._mon in ready and self._worker_lost() and "begin" not in kinds:
                raise ReceiveError("the agent worker went away during the update")
            if sock not in ready:
                continue
            frame = sock.recv(copy=False)
            why = peer_refusal(frame, self.trusted)
            if why:  # not the agent's worker: nothing it says is read
                raise ReceiveError(f"refusing the worker at {self.endpoint}: {why}")
            msg = ipb.WorkerMessage.FromString(frame.bytes)
            kind = msg.WhichOneof("body")
            if kind == "begin" and "begin" not in kinds and msg.job_id != self._job:
                self._next = msg  # taken by the next receive(), at once
                raise ReceiveError(f"the worker began job {msg.job_id} before this one ended")
            if "begin" not in kinds and msg.job_id != self._job:
                continue  # a message of a job this engine is not in (one it was stopped through)
            if kind in kinds:
                return msg
            if kind == "end" and not msg.end.ok and "begin" not in kinds:
                raise ReceiveError(f"the update failed: {msg.end.reason}")
            # anything else is left over from an earlier update: skip it

    def receive(
        self,
        *,
        load: Load,
        validate: Validate | None = None,
        layout: Layout | None = None,
        base: Base | None = None,
        job_id: str = "",
        wait_s: float = 60.0,
        step_timeout_s: float = 300.0,
    ) -> UpdateOutcome:
        """Takes one update. Raises TimeoutError if none starts within wait_s. base: the
        engine's current tensor of a name (checkpoint format), for delta updates
        (vllm_ext.delta_apply); None: this engine takes none."""
        self._base = base
        b = self._await_begin(job_id, wait_s)
        self._job = b.job_id
        info = UpdateInfo(
            job_id=b.job_id,
            checkpoint=b.checkpoint,
            version=b.version,
            tensors=list(b.tensors),
            partial=b.partial,
            device=b.device,
            kept=b.kept,
        )
        problem, mine = self._validate(info, b.want_layout, validate, layout)
        if not problem and base is None and any(m.HasField("delta") for m in info.tensors):
            problem = "this engine takes no delta updates"
        self._send(
            ipb.ReceiverMessage(
                validated=ipb.Validated(ok=not problem, reason=problem or "", layout=mine)
            )
        )
        try:
            go = self._recv(step_timeout_s, ("proceed",))
        except ReceiveError as e:
            return UpdateOutcome(ok=False, reason=str(e))
        if go is None:
            return UpdateOutcome(ok=False, reason="worker sent no go-ahead")
        if not go.proceed.ok:
            return UpdateOutcome(ok=False, reason=problem or go.proceed.reason)
        touched = [False]
        try:
            buf = self.buffer.map(b.buffer, self.device)
            it = self._tensors(info, buf, b.slot_bytes, step_timeout_s, touched)
            del buf
            load(info, it)
            for _ in it:  # a loader that stopped early still lets the worker finish
                pass
            done = ipb.ReceiverDone(ok=True, checkpoint=b.checkpoint, version=b.version)
        except Exception as e:
            done = ipb.ReceiverDone(
                ok=False,
                reason=f"{type(e).__name__}: {e}",
                checkpoint=b.checkpoint,
                version=b.version,
            )
        done.touched = touched[0]
        it = None
        if b.buffer.startswith("cuda:"):
            # A device buffer lives for one update: unmap it before saying done, so the
            # worker can give its memory back.
            self.buffer.close()
        self._send(ipb.ReceiverMessage(done=done))
        return UpdateOutcome(
            ok=done.ok,
            reason=done.reason,
            checkpoint=done.checkpoint,
            version=done.version,
            touched=done.touched,
        )

    def _await_begin(self, job_id: str, wait_s: float) -> ipb.Begin:
        """The worker's Begin of the next update (Hello said again now and then: a worker
        that restarted never saw the first one). TimeoutError after wait_s."""
        hello = ipb.ReceiverMessage(
            hello=ipb.ReceiverHello(engine=self.engine, pid=os.getpid(), job_id=job_id)
        )
        self._socket()
        self._worker_lost()  # a disconnect between updates is no news
        deadline = time.monotonic() + wait_s
        msg, self._next, self._job = self._next, None, ""
        while msg is None and time.monotonic() < deadline:
            self._send(hello)
            msg = self._recv(min(HELLO_EVERY_S, max(0.0, deadline - time.monotonic())), ("begin",))
        if msg is None:
            self.reset()
            raise TimeoutError(f"no update started on {self.endpoint} within {wait_s:.0f}s")
        return msg.begin

    @staticmethod
    def _validate(
        info: UpdateInfo, want_layout: bool, validate: Validate | None, layout: Layout | None
    ) -> tuple[str | None, str]:
        """(why the update cannot be taken or None, this rank's layout if asked)."""
        mine: ipb.EngineLayout | None = None
        try:
            if info.kept:
                if layout is None:
                    return "this engine cannot take kept parts (it reports no layout)", None
                problem = kept_problem(info.tensors, layout(info), info.partial)
            else:
                problem = pieces_problem(info.tensors)
            problem = problem or (validate(info) if validate else None)
            if want_layout and layout is not None and not problem:
                mine = layout_pb(layout(info))
        except Exception as e:
            problem = f"validation crashed: {e!r}"
        return problem, mine

    def _tensors(
        self, info: UpdateInfo, buf: Any, slot_bytes: int, timeout_s: float, touched: list[bool]
    ) -> Iterator[tuple[str, Any]]:
        """Yields each bucket's tensors once every checksum in it matched: a bucket that does
        not match fails before any of its tensors reaches the loader."""
        import torch

        partial: dict[int, tuple[Any, int]] = {}  # tensor index -> (bytes, received)
        pieces = Assembly(info.tensors, info.kept, self.parts)
        while True:
            msg = self._recv(timeout_s, ("bucket", "end"))
            if msg is None:
                raise ReceiveError(f"no bucket within {timeout_s:.0f}s")
            if msg.WhichOneof("body") == "end":
                if not msg.end.ok:
                    raise ReceiveError(f"the update failed: {msg.end.reason}")
                if partial or pieces.waiting:
                    n = len(partial) + pieces.waiting
                    raise ReceiveError(f"the update ended with {n} tensors incomplete")
                return
            bk = msg.bucket
            ready = self._bucket_tensors(info, bk, buf, bk.slot * slot_bytes, partial)
            bad = checksum.mismatches(
                [(m.name, m.checksum, raw) for m, raw, _ in ready if m.HasField("checksum")]
            )
            if bad:
                raise ReceiveError(
                    f"checksum mismatch in bucket {bk.bucket}: {len(bad)} tensors, e.g. {bad[0]!r}"
                )
            ready = self._deltas_applied(ready)
            ready = [w for r in ready for w in pieces.add(*r)]
            touched[0] = touched[0] or bool(ready)
            for meta, raw, copy in ready:
                t = raw.view(torch_dtype(meta.dtype)).reshape(tuple(meta.shape))
                yield meta.name, (t.clone() if copy else t)
            if buf.is_cuda:  # the loader's copies out of this slot must be done
                torch.cuda.current_stream(buf.device).synchronize()
            self._send(ipb.ReceiverMessage(loaded=ipb.BucketLoaded(bucket=bk.bucket)))

    def _deltas_applied(self, ready: list[tuple[Any, Any, bool]]) -> list[tuple[Any, Any, bool]]:
        """The bucket's tensors with its deltas applied onto the engine's own (one check of
        every base and one of every result: vllm_ext.delta_apply)."""
        at = [i for i, (m, _, _) in enumerate(ready) if m.HasField("delta")]
        if not at:
            return ready
        done = apply_all([(ready[i][0], ready[i][1]) for i in at], self._base)
        out = list(ready)
        for i, flat in zip(at, done, strict=True):
            out[i] = (ready[i][0], flat, False)
        return out

    @staticmethod
    def _bucket_tensors(
        info: UpdateInfo, bk: Any, buf: Any, base: int, partial: dict[int, tuple[Any, int]]
    ) -> list[tuple[tpb.TensorMeta, Any, bool]]:
        """The bucket's complete tensors as (meta, raw bytes, copy before handing over):
        views into the slot, or assembled copies of chunked tensors whose last piece came."""
        import torch

        out = []
        for e in bk.entries:
            meta = info.tensors[e.tensor]
            if e.offset < 0 or e.nbytes < 0 or e.offset + e.nbytes > buf.numel() - base:
                raise ReceiveError(f"bucket {bk.bucket}: an entry lies outside the buffer")
            piece = buf[base + e.offset : base + e.offset + e.nbytes]
            if e.nbytes == meta.nbytes:
                out.append((meta, piece, e.copy))
                continue
            # a chunk of a large tensor
            whole, got = partial.get(e.tensor) or (
                torch.empty(meta.nbytes, dtype=torch.uint8, device=buf.device),
                0,
            )
            if e.chunk_offset < 0 or e.chunk_offset + e.nbytes > meta.nbytes:
                raise ReceiveError(f"bucket {bk.bucket}: a chunk lies outside its tensor")
            whole[e.chunk_offset : e.chunk_offset + e.nbytes].copy_(piece)
            got += e.nbytes
            if got < meta.nbytes:
                partial[e.tensor] = (whole, got)
                continue
            partial.pop(e.tensor, None)
            out.append((meta, whole, False))
        return out

    def reset(self) -> None:
        """Drops the socket (queued hellos with it)."""
        if self._sock is not None:
            self._sock.disable_monitor()
            self._sock.close(0)
            self._sock = None
        if self._mon is not None:
            self._mon.close(0)
            self._mon = None

    def close(self) -> None:
        self.reset()
        self.buffer.close()
