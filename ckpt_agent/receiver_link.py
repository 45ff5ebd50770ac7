"""The worker's side of the engine hand-off: a ZMQ ROUTER on ipc://, typed protobuf frames.

The link counts the engines connected to it (a socket monitor): once an engine has been
connected, a wait that finds none (it died: the kernel closed its socket; or it is stopped:
it missed the heartbeats, ckpt_common.ipc.keepalive) fails within seconds, not at the
receiver timeout: ENGINE_GONE_S in the middle of an update, ABSENT_S
while waiting for an engine's hello (an engine that reset its socket after a failed update
connects again when it is triggered)."""

from __future__ import annotations

import os
import threading
import time

import structlog
import zmq
from zmq.utils.monitor import recv_monitor_message

from ckpt.v1 import ipc_pb2 as ipb
from ckpt_common.ipc import keepalive
from ckpt_common.rendezvous import others_allowed, peer_refusal, peer_uid, trusted_uids

log = structlog.get_logger("ckpt_agent.link")

ENGINE_GONE_S = 1.0  # mid-update: no engine connected this long (after one was): it is gone
ABSENT_S = 5.0  # waiting for a hello: the same, from the wait's start at the earliest


class LinkError(Exception):
    pass


class ReceiverLink:
    """Only engines that run as a trusted uid (ckpt_common.rendezvous) are heard: every
    message's sender is checked (SO_PEERCRED); others' messages are dropped unread."""

    def __init__(self, endpoint: str) -> None:
        path = endpoint.removeprefix("ipc://")
        try:
            os.unlink(path)
        except FileNotFoundError:
            pass
        self._ctx = zmq.Context.instance()
        self._sock = self._ctx.socket(zmq.ROUTER)
        self._sock.setsockopt(zmq.LINGER, 0)
        self._sock.setsockopt(zmq.ROUTER_MANDATORY, 1)
        keepalive(self._sock)  # a stopped engine is disconnected: check_engine sees it
        self._mon = self._sock.get_monitor_socket(zmq.EVENT_ACCEPTED | zmq.EVENT_DISCONNECTED)
        self._sock.bind(endpoint)
        # Other users reach it only where the operator trusts one (CKPT_IPC_PEER_UIDS).
        os.chmod(path, 0o666 if others_allowed() else 0o600)
        self.endpoint = endpoint
        self.trusted = trusted_uids()
        self.peer: bytes | None = None
        self.job_id = ""  # the job every message sent is stamped with, and answers must name
        self._refused: set[int | None] = set()  # uids already logged
        self.connected = 0  # engines connected now
        self._seen = False  # an engine was connected once
        self._none_since: float | None = None  # when the last engine went away

    def _count(self) -> None:
        """Drains the monitor into `connected`."""
        while self._mon.poll(0):
            ev = recv_monitor_message(self._mon)["event"]
            if ev == zmq.EVENT_ACCEPTED:
                self.connected, self._seen = self.connected + 1, True
            elif ev == zmq.EVENT_DISCONNECTED:
                self.connected = max(0, self.connected - 1)
        if self.connected or not self._seen:
            self._none_since = None
        elif self._none_since is None:
            self._none_since = time.monotonic()

    def check_engine(self, grace_s: float = ENGINE_GONE_S, since: float = 0.0) -> None:
        """Raises LinkError when the engine that was connected is gone: for ENGINE_GONE_S,
        and past since + grace_s (a wait gives an engine that reset its socket that long to
        connect again)."""
        self._count()
        gone, now = self._none_since, time.monotonic()
        if gone is not None and now > max(gone + ENGINE_GONE_S, since + grace_s):
            raise LinkError(
                f"no engine connected to {self.endpoint}: the one that was disconnected "
                f"{now - gone:.1f}s ago (it died or is stopped?)"
            )

    def recv(self, timeout_s: float) -> tuple[bytes, ipb.ReceiverMessage] | None:
        if not self._sock.poll(max(0, int(timeout_s * 1000))):
            return None
        frames = self._sock.recv_multipart(copy=False)
        if len(frames) != 2:
            return None
        why = peer_refusal(frames[1], self.trusted)
        if why:
            uid = peer_uid(frames[1])
            if uid not in self._refused:
                self._refused.add(uid)
                log.warning("engine_peer_refused", endpoint=self.endpoint, uid=uid, reason=why)
            return None
        msg = ipb.ReceiverMessage()
        try:
            msg.ParseFromString(frames[1].bytes)
        except Exception:
            return None
        return frames[0].bytes, msg

    def wait_hello(
        self, job_id: str, timeout_s: float, abort: threading.Event | None = None
    ) -> ipb.ReceiverHello:
        """Waits for an engine that wants this job (or any next job)."""
        start = time.monotonic()
        deadline = start + timeout_s
        while True:
            left = deadline - time.monotonic()
            if abort is not None and abort.is_set():
                raise LinkError("aborted while waiting for the engine to connect")
            if left <= 0:
                raise LinkError(f"no engine connected to {self.endpoint} within {timeout_s:.0f}s")
            self.check_engine(ABSENT_S, start)
            got = self.recv(min(left, 0.5))
            if got is None:
                continue
            peer, msg = got
            if msg.WhichOneof("body") != "hello":
                continue  # left over from an earlier job
            if msg.hello.job_id and msg.hello.job_id != job_id:
                continue
            self.peer, self.job_id = peer, job_id
            return msg.hello

    def send(self, msg: ipb.WorkerMessage) -> None:
        if self.peer is None:
            raise LinkError("no engine connected")
        msg.job_id = self.job_id
        try:
            self._sock.send_multipart([self.peer, msg.SerializeToString()], flags=zmq.NOBLOCK)
        except zmq.ZMQError as e:
            raise LinkError(f"engine went away: {e}") from None

    def expect(
        self, kind: str, timeout_s: float, abort: threading.Event | None = None
    ) -> ipb.ReceiverMessage:
        """The next message from the current engine; a ReceiverDone(ok=False) is an error,
        and so is `abort` being set while waiting."""
        deadline = time.monotonic() + timeout_s
        while True:
            left = deadline - time.monotonic()
            if abort is not None and abort.is_set():
                raise LinkError(f"aborted while waiting for the engine's {kind}")
            if left <= 0:
                raise LinkError(f"engine sent no {kind} within {timeout_s:.0f}s")
            self.check_engine()
            got = self.recv(min(left, 0.5))
            if got is None:
                continue
            peer, msg = got
            if peer != self.peer or msg.job_id != self.job_id:
                continue  # another engine's, or an answer to a job given up on
            body = msg.WhichOneof("body")
            if body == "done" and kind != "done" and not msg.done.ok:
                raise LinkError(f"engine failed: {msg.done.reason}")
            if body == kind:
                return msg

    def close(self) -> None:
        self._mon.close(0)
        self._sock.close(0)
        try:
            os.unlink(self.endpoint.removeprefix("ipc://"))
        except FileNotFoundError:
            pass
