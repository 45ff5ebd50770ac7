"""Fake peers of the engine hand-off, run as their own processes (an attacker's, as another
user, in tests/proc/test_local_rendezvous.py). Only zmq, protobuf and numpy: another user runs
this with a plain interpreter.

    segment NAME                  a shared-memory segment (0666) holding PAYLOAD
    worker ENDPOINT SEGMENT OUT   a fake agent worker: serves PAYLOAD as tensor "w" of
                                  pwned@666 (right checksum) to the first engine; OUT
                                  records what happened
    engine ENDPOINT OUT SECONDS   a fake engine: says hello, OUT records what it hears
"""

from __future__ import annotations

import json
import os
import sys
import time

import numpy as np
import zmq

from ckpt.v1 import ipc_pb2 as ipb
from ckpt.v1 import types_pb2 as tpb
from ckpt_common import checksum

PAYLOAD = np.full(64, 7.0, dtype=np.float32)
DEADLINE_S = 60.0


def record(path: str, **what: object) -> None:
    with open(path, "a") as f:
        f.write(json.dumps(what) + "\n")


def segment(name: str) -> None:
    from multiprocessing import resource_tracker, shared_memory

    data = PAYLOAD.view(np.uint8)
    mem = shared_memory.SharedMemory(name=name, create=True, size=data.size)
    resource_tracker.unregister(mem._name, "shared_memory")  # it outlives this process
    mem.buf[: data.size] = data.tobytes()
    os.fchmod(mem._fd, 0o666)
    mem.close()


def _recv(sock: zmq.Socket, deadline: float) -> tuple[bytes, ipb.ReceiverMessage] | None:
    while time.monotonic() < deadline:
        if sock.poll(200):
            ident, raw = sock.recv_multipart()
            return ident, ipb.ReceiverMessage.FromString(raw)
    return None


def worker(endpoint: str, seg: str, out: str) -> None:
    sock = zmq.Context.instance().socket(zmq.ROUTER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.bind(endpoint)
    os.chmod(endpoint.removeprefix("ipc://"), 0o777)
    record(out, event="bound", uid=os.geteuid())
    deadline = time.monotonic() + DEADLINE_S
    data = PAYLOAD.view(np.uint8)
    meta = tpb.TensorMeta(name="w", dtype="F32", shape=[PAYLOAD.size], nbytes=data.size)
    meta.checksum = checksum.of_numpy(data)
    begin = ipb.Begin(
        job_id="", checkpoint="pwned", version=666, buffer=f"shm:{seg}",
        slot_bytes=data.size, nbuf=1, bucket_count=1, tensors=[meta],
    )  # fmt: skip
    steps = [
        ("hello", ipb.WorkerMessage(begin=begin)),
        ("validated", ipb.WorkerMessage(proceed=ipb.Proceed(ok=True))),
        (
            "",
            ipb.WorkerMessage(
                bucket=ipb.BucketReady(
                    bucket=0, slot=0, entries=[ipb.IpcTensor(tensor=0, offset=0, nbytes=data.size)]
                )
            ),
        ),  # fmt: skip
        ("loaded", ipb.WorkerMessage(end=ipb.End(ok=True))),
        ("done", None),
    ]
    for want, reply in steps:
        while want:
            got = _recv(sock, deadline)
            if got is None:
                record(out, event="timeout", waiting=want)
                return
            ident, msg = got
            body = msg.WhichOneof("body")
            if body == "done":  # the engine gave up (or finished)
                record(out, event="done", ok=msg.done.ok, reason=msg.done.reason)
                return
            if body == want:
                record(out, event=want)
                break
        if reply is not None:
            sock.send_multipart([ident, reply.SerializeToString()])


def engine(endpoint: str, out: str, seconds: float) -> None:
    sock = zmq.Context.instance().socket(zmq.DEALER)
    sock.setsockopt(zmq.LINGER, 0)
    sock.connect(endpoint)
    hello = ipb.ReceiverMessage(hello=ipb.ReceiverHello(engine="nobody", pid=os.getpid()))
    record(out, event="connected", uid=os.geteuid())
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        sock.send(hello.SerializeToString())
        if sock.poll(500):
            msg = ipb.WorkerMessage.FromString(sock.recv())
            record(out, event="heard", body=msg.WhichOneof("body"))
            if msg.WhichOneof("body") == "begin":  # play along: say it validated
                ok = ipb.ReceiverMessage(validated=ipb.Validated(ok=True))
                sock.send(ok.SerializeToString())


if __name__ == "__main__":
    kind, *args = sys.argv[1:]
    if kind == "segment":
        segment(args[0])
    elif kind == "worker":
        worker(args[0], args[1], args[2])
    elif kind == "engine":
        engine(args[0], args[1], float(args[2]))
    else:
        raise SystemExit(f"unknown kind {kind!r}")
