"""The abortable gloo collective and the peer-failure watch, in one process (two ranks on
two threads, a real TCPStore): a rank that never shows up ends its peer's wait on abort or
at the step's deadline, and a published failure reaches the other rank's abort."""

from __future__ import annotations

import threading
import time
from datetime import timedelta

import pytest
import torch.distributed as dist

from ckpt.v1 import agent_pb2 as apb
from ckpt_agent.backends.gloo import CollectiveAborted, GlooCollective
from ckpt_agent.group_abort import PEER_FAILED, Abort, PeerWatch


def _store(port: int = 0, master: bool = True) -> dist.TCPStore:
    return dist.TCPStore(
        "127.0.0.1", port, 2, is_master=master, timeout=timedelta(seconds=5), wait_for_workers=False
    )


def _pair() -> tuple[GlooCollective, GlooCollective]:
    server = _store()
    out: list[GlooCollective] = [None, None]  # type: ignore[list-item]

    def make(rank: int) -> None:
        st = server if rank == 0 else _store(server.port, master=False)
        out[rank] = GlooCollective(dist.PrefixStore("g", st), rank, 2, 30.0)

    threads = [threading.Thread(target=make, args=(r,)) for r in (0, 1)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(20)
    return out[0], out[1]


def test_abort_ends_a_collective_whose_peer_never_comes() -> None:
    a, _b = _pair()
    abort = Abort()
    a.bind(abort, 30.0)
    threading.Timer(0.3, abort.trip, args=("rank 1 (n/1): gone",)).start()
    t0 = time.monotonic()
    with pytest.raises(CollectiveAborted, match="rank 1"):
        a.agree(0)
    assert time.monotonic() - t0 < 2
    t0 = time.monotonic()
    a.close()  # released off this thread: returns at once
    assert time.monotonic() - t0 < 1


def test_step_deadline_ends_a_collective() -> None:
    a, _b = _pair()
    a.bind(Abort(), 0.5)
    t0 = time.monotonic()
    with pytest.raises((TimeoutError, RuntimeError)):
        a.agree(0)
    assert time.monotonic() - t0 < 3
    a.close()


def test_published_failure_trips_the_peers_abort() -> None:
    server = _store()
    scoped = dist.PrefixStore("job/x", server)
    mine, theirs = Abort(), Abort()

    def connect() -> dist.PrefixStore:
        return dist.PrefixStore("job/x", _store(server.port, master=False))

    w0 = PeerWatch(connect, scoped, mine).start()
    w1 = PeerWatch(connect, scoped, theirs).start()
    try:
        w0.publish("rank 0 (n/0): engine sent no loaded within 5s")
        assert theirs.wait(3)
        assert theirs.reason == f"{PEER_FAILED}: rank 0 (n/0): engine sent no loaded within 5s"
        assert theirs.origin == apb.ORIGIN_PEER  # not its own: ckptd reports the publisher
        time.sleep(0.5)
        assert not mine.is_set()  # its own failure is not a peer's
    finally:
        w0.stop()
        w1.stop()
