"""The IPC protocol between an agent worker and its engine for one update.

    worker                         engine
    Begin (buffer, tensors)  ->
                             <-    Validated (ok, reason)
    Proceed (ok)             ->    (maps the buffer; nothing is loaded before this)
    BucketReady j ...        ->
                             <-    BucketLoaded j ...
    End (ok)                 ->
                             <-    ReceiverDone (ok, version)

An update that will not happen ends with Proceed(ok=False) before the engine touched a
weight, or End(ok=False) after; the engine is told exactly once.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from ckpt.v1 import agent_pb2 as apb
from ckpt.v1 import ipc_pb2 as ipb
from ckpt_agent.receiver_link import LinkError, ReceiverLink


class EngineSession:
    def __init__(
        self,
        link: ReceiverLink,
        cmd: apb.RunUpdate,
        abort: threading.Event,
        engine_s: Callable[[int], float],
    ) -> None:
        """engine_s(nbytes): seconds the engine may take for a step moving nbytes."""
        self.link = link
        self.cmd = cmd
        self.abort = abort
        self._engine_s = engine_s
        self.loaded = -1  # highest bucket the engine has loaded
        self.told = False  # the engine already knows this update will not happen
        self.proceeded = False  # the engine was told to map the buffer
        self.layout: ipb.EngineLayout | None = None  # the engine's map, when it was asked
        link.peer = None

    def begin(self, buffer: str, nslots: int) -> str:
        """Waits for the engine, describes the update; why it cannot go on, or ""."""
        cmd = self.cmd
        begin = ipb.WorkerMessage(
            begin=ipb.Begin(
                job_id=cmd.job_id,
                checkpoint=cmd.checkpoint,
                version=cmd.version,
                buffer=buffer,
                slot_bytes=cmd.plan.bucket_bytes,
                nbuf=nslots,
                bucket_count=len(cmd.plan.buckets),
                tensors=cmd.plan.tensors,
                partial=cmd.plan.partial,
                device=cmd.device,
                kept=cmd.plan.kept,
                want_layout=cmd.want_layout,
            )
        )
        try:
            deadline = time.monotonic() + cmd.deadlines.receiver_timeout_s
            while True:  # a hello from an engine that has since gone is skipped
                self.link.wait_hello(cmd.job_id, max(0.0, deadline - time.monotonic()), self.abort)
                try:
                    self.link.send(begin)
                    break
                except LinkError:
                    continue
            v = self.link.expect(
                "validated", cmd.deadlines.receiver_timeout_s, self.abort
            ).validated
        except LinkError as e:
            if self.abort.is_set():  # the wait ended from outside: that is the reason
                return getattr(self.abort, "reason", "") or str(e)
            return str(e)
        self.layout = v.layout if v.HasField("layout") else None
        return "" if v.ok else f"engine refused the update: {v.reason}"

    def refuse(self, reason: str) -> None:
        """The update will not start: the engine serves on, untouched."""
        if self.link.peer is None:
            return
        self.told = True
        try:
            self.link.send(ipb.WorkerMessage(proceed=ipb.Proceed(ok=False, reason=reason)))
        except LinkError:
            pass

    def proceed(self) -> None:
        self.link.send(ipb.WorkerMessage(proceed=ipb.Proceed(ok=True)))
        self.proceeded = True

    def bucket_ready(self, j: int, slot: int, bucket: apb.Bucket, copy: list[bool]) -> None:
        self.link.send(
            ipb.WorkerMessage(
                bucket=ipb.BucketReady(
                    bucket=j,
                    slot=slot,
                    entries=[
                        ipb.IpcTensor(
                            tensor=e.tensor,
                            offset=e.bucket_offset,
                            nbytes=e.nbytes,
                            chunk_offset=e.chunk_offset,
                            copy=copy[i],
                        )
                        for i, e in enumerate(bucket.entries)
                    ],
                )
            )
        )

    def wait_loaded(self, k: int, progress: Callable[[int, int], None]) -> None:
        buckets = self.cmd.plan.buckets
        while self.loaded < k:
            msg = self.link.expect(
                "loaded", self._engine_s(buckets[self.loaded + 1].nbytes), self.abort
            )
            self.loaded = max(self.loaded, msg.loaded.bucket)
            progress(msg.loaded.bucket, buckets[msg.loaded.bucket].nbytes)

    def end(self, done_s: float) -> tuple[str, int]:
        """After the last bucket was loaded: (why the engine failed or "", its version)."""
        try:
            self.link.send(ipb.WorkerMessage(end=ipb.End(ok=True)))
            done = self.link.expect("done", done_s, self.abort).done
        except LinkError as e:
            return str(e), 0
        return ("" if done.ok else f"engine failed: {done.reason}"), done.version

    def end_failed(self, reason: str) -> None:
        """The update failed after it began: tell the engine, once."""
        if self.link.peer is None or self.told:
            return
        self.told = True
        try:
            self.link.send(ipb.WorkerMessage(end=ipb.End(ok=False, reason=reason)))
        except LinkError:
            pass
