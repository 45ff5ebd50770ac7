"""A worker's defences against faults, in one process: commands of a job ckptd already
aborted are dropped (the abort is read before them, whatever order they queued in), and a
wait for an engine that has died ends at once rather than at the receiver timeout."""

from __future__ import annotations

import multiprocessing as mp
import threading
import time
from pathlib import Path

import pytest
import zmq

from ckpt.v1 import agent_pb2 as apb
from ckpt.v1 import ipc_pb2 as ipb
from ckpt_agent.receiver_link import ABSENT_S, LinkError, ReceiverLink
from ckpt_agent.stale import MAX_ENDED, EndedJobs, read_batch


def _cmd(**kw) -> bytes:
    return apb.Command(**kw).SerializeToString()


def test_queued_abort_is_read_before_the_jobs_commands() -> None:
    a, b = mp.Pipe()
    a.send_bytes(_cmd(id=1, prepare_group=apb.PrepareGroup(job_id="j1", world_size=2)))
    a.send_bytes(_cmd(id=2, run_update=apb.RunUpdate(job_id="j1")))
    a.send_bytes(_cmd(id=3, abort=apb.Abort(job_id="j1", reason="rank 2 failed")))
    a.send_bytes(_cmd(id=4, run_update=apb.RunUpdate(job_id="j2")))
    batch = read_batch(b, b.recv_bytes())
    assert [c.id for c in batch] == [3, 1, 2, 4]
    ended = EndedJobs()
    ended.end(batch[0].abort.job_id, batch[0].abort.reason)
    assert "ended before this prepare_group ran: rank 2 failed" in ended.stale(batch[1])
    assert ended.stale(batch[2]) is not None
    assert ended.stale(batch[3]) is None  # another job runs
    assert ended.stale(apb.Command(drop=apb.Drop(checkpoint="c"))) is None


def test_ended_jobs_are_bounded() -> None:
    ended = EndedJobs()
    for i in range(MAX_ENDED + 10):
        ended.end(f"j{i}", "x")
    assert ended.why("j0") is None and ended.why(f"j{MAX_ENDED + 9}") == "x"


def _hello(job_id: str = "") -> bytes:
    return ipb.ReceiverMessage(hello=ipb.ReceiverHello(job_id=job_id)).SerializeToString()


def test_a_dead_engine_is_known_at_once(tmp_path: Path) -> None:
    link = ReceiverLink(f"ipc://{tmp_path}/w.sock")
    ctx = zmq.Context.instance()
    try:
        eng = ctx.socket(zmq.DEALER)
        eng.setsockopt(zmq.LINGER, 0)
        eng.connect(link.endpoint)
        eng.send(_hello())
        link.wait_hello("j", 5)
        eng.close(0)  # the engine dies between two updates
        t0 = time.monotonic()
        with pytest.raises(LinkError, match="no engine connected.*disconnected"):
            link.wait_hello("j2", 30)
        assert time.monotonic() - t0 < ABSENT_S + 2
    finally:
        link.close()


_FROZEN_ENGINE = """
import sys, time, zmq
from ckpt.v1 import ipc_pb2 as ipb
from ckpt_common.ipc import keepalive
s = zmq.Context.instance().socket(zmq.DEALER)
keepalive(s)
s.connect(sys.argv[1])
s.send(ipb.ReceiverMessage(hello=ipb.ReceiverHello(job_id="")).SerializeToString())
print("sent", flush=True)
time.sleep(120)
"""


@pytest.mark.parametrize("job_after_s", [0.0, 4.0])
def test_a_stopped_engine_is_known_within_seconds(tmp_path: Path, job_after_s: float) -> None:
    """An engine that is stopped (SIGSTOP: its socket stays open, its hello is queued) stops
    answering the link's heartbeats: the wait for it fails within seconds, whether the job
    starts right after the freeze (its queued hello is taken, then it vanishes) or later."""
    import os
    import signal
    import subprocess
    import sys

    link = ReceiverLink(f"ipc://{tmp_path}/w.sock")
    eng = subprocess.Popen([sys.executable, "-c", _FROZEN_ENGINE, link.endpoint],
                           stdout=subprocess.PIPE, text=True)  # fmt: skip
    try:
        assert eng.stdout is not None and eng.stdout.readline().strip() == "sent"
        time.sleep(0.5)
        os.kill(eng.pid, signal.SIGSTOP)
        time.sleep(job_after_s)
        t0 = time.monotonic()
        with pytest.raises(LinkError, match="no engine connected|engine went away"):
            link.wait_hello("j", 60)
            link.expect("validated", 60)  # the queued hello was taken: it never validates
        assert time.monotonic() - t0 < ABSENT_S + 2
    finally:
        os.kill(eng.pid, signal.SIGKILL)
        eng.wait(10)
        link.close()


def test_an_engine_never_seen_gets_the_whole_wait(tmp_path: Path) -> None:
    link = ReceiverLink(f"ipc://{tmp_path}/w.sock")
    try:
        t0 = time.monotonic()
        with pytest.raises(LinkError, match="no engine connected"):
            link.wait_hello("j", 1.5)
        assert time.monotonic() - t0 >= 1.4
    finally:
        link.close()


def test_begin_barrier_ends_on_abort_or_a_lost_store() -> None:
    from datetime import timedelta

    import torch.distributed as dist

    from ckpt.v1 import agent_pb2 as apb
    from ckpt_agent.begin_barrier import all_begun
    from ckpt_agent.group_abort import PEER_FAILED, Abort

    server = dist.TCPStore("127.0.0.1", 0, 2, True, timedelta(seconds=5), wait_for_workers=False)
    abort = Abort()
    threading.Timer(0.3, abort.trip, args=("aborted by ckptd: x", apb.ORIGIN_DAEMON)).start()
    t0 = time.monotonic()
    got = all_begun(dist.PrefixStore("a", server), 2, abort, 30)
    assert got == ("aborted by ckptd: x", apb.ORIGIN_DAEMON)
    assert time.monotonic() - t0 < 2
    alone = all_begun(dist.PrefixStore("b", server), 1, Abort(), 30)  # alone: at once
    assert alone == ("", apb.ORIGIN_UNSPECIFIED)

    class Gone:
        def add(self, key: str, n: int) -> int:
            raise RuntimeError("Connection was likely closed")

    why, origin = all_begun(Gone(), 2, Abort(), 30)
    assert why.startswith(PEER_FAILED) and origin == apb.ORIGIN_PEER


def _begin(job: str, seg: str, data) -> ipb.WorkerMessage:
    from ckpt.v1 import types_pb2 as tpb
    from ckpt_common import checksum

    meta = tpb.TensorMeta(name="w", dtype="F32", shape=[data.size // 4], nbytes=data.size)
    meta.checksum = checksum.of_numpy(data)
    begin = ipb.Begin(job_id=job, checkpoint=f"c-{job}", version=1, buffer=f"shm:{seg}",
                      slot_bytes=data.size, nbuf=1, bucket_count=1, tensors=[meta])  # fmt: skip
    return ipb.WorkerMessage(begin=begin)


def test_an_engine_stopped_through_a_job_never_mixes_it_with_the_next(tmp_path: Path) -> None:
    """The engine was stopped while the worker began job j1 and gave up on it. Resumed, the
    engine answers j1's Begin; the worker, now in j2, skips that answer (another job's), and
    the engine leaves j1 when j2's Begin comes and takes j2 at once: j2's bytes, j2's sums
    (answered for j1, it loaded j2's bytes against j1's checksums and failed)."""
    import numpy as np
    import torch

    from ckpt_agent import shm
    from vllm_ext.receiver import Receiver

    link = ReceiverLink(f"ipc://{tmp_path}/w.sock")
    seg = f"ckpt_test_stale_{time.monotonic_ns()}"
    old, new = (np.full(64, v, np.float32).view(np.uint8) for v in (1.0, 2.0))
    mem = shm.create(seg, old.size)
    r = Receiver(link.endpoint)
    results: list = []

    def engine() -> None:
        for _ in range(2):
            got: dict = {}

            def load(info, it, got=got) -> None:
                got.update((n, t.clone()) for n, t in it)

            results.append((r.receive(load=load, wait_s=20, step_timeout_s=20), got))

    th = threading.Thread(target=engine, daemon=True)
    try:
        th.start()
        time.sleep(2.5)  # two hellos queued: one for each job
        link.wait_hello("j1", 10)
        link.send(_begin("j1", seg, old))  # j1: given up on, its Validated comes late
        time.sleep(0.5)
        link.wait_hello("j2", 10)
        mem.buf[: new.size] = new.tobytes()
        link.send(_begin("j2", seg, new))
        assert link.expect("validated", 10).validated.ok
        link.send(ipb.WorkerMessage(proceed=ipb.Proceed(ok=True)))
        entry = ipb.IpcTensor(tensor=0, offset=0, nbytes=new.size)
        link.send(ipb.WorkerMessage(bucket=ipb.BucketReady(bucket=0, slot=0, entries=[entry])))
        assert link.expect("loaded", 10).loaded.bucket == 0
        link.send(ipb.WorkerMessage(end=ipb.End(ok=True)))
        done = link.expect("done", 10).done
        assert done.ok and done.checkpoint == "c-j2", done
        th.join(10)
        (first, _), (second, got) = results
        assert not first.ok and "began job j2" in first.reason, first
        assert second.ok and torch.equal(got["w"], torch.full((64,), 2.0))
    finally:
        r.close()
        link.close()
        mem.close()
        shm.unlink(seg)
