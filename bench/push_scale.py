"""A direct push of many small tensors, timed on the control plane: BeginPush and CommitPush
of N tensor declarations against real ckptd and agent processes on loopback, while another
thread calls ListAgents every 20 ms (the worst answer is how long ckptd stalled).

    python -m bench.push_scale --tensors 100000 [--load 2]

--load N runs N busy processes (pure Python loops) meanwhile: ckptd and its agent then share
the CPUs with them, as on a loaded host.
"""

from __future__ import annotations

import argparse
import multiprocessing
import tempfile
import time
from pathlib import Path

from ckpt.v1 import ckptd_pb2 as cpb
from ckpt.v1 import types_pb2 as tpb


def main() -> None:
    ap = argparse.ArgumentParser(prog="python -m bench.push_scale")
    ap.add_argument("--tensors", type=int, default=100_000)
    ap.add_argument("--load", type=int, default=0, help="busy processes meanwhile")
    args = ap.parse_args()
    from tests.support.cluster import Cluster, Latency  # real processes, as the tests start them

    c = Cluster(Path(tempfile.mkdtemp(prefix="push-scale-")))
    try:
        c.start_daemon()
        c.start_agent("n1", 1)
        c.wait_ranks(1)
        metas = [
            tpb.TensorMeta(name=f"model.layers.{i // 10}.w{i % 10}", dtype="F32", shape=[4],
                           nbytes=16)
            for i in range(args.tensors)
        ]  # fmt: skip
        begin = cpb.BeginPushRequest(name="big", version=1, node_id="n1", tensors=metas,
                                     timeout_s=120)  # fmt: skip
        hogs = [multiprocessing.Process(target=_spin, daemon=True) for _ in range(args.load)]
        for h in hogs:
            h.start()
        with Latency(c.client.agents) as lat:
            t0 = time.monotonic()
            c.client._call("BeginPush", begin, 150)
            t1 = time.monotonic()
            cp = c.client._call("CommitPush", cpb.CommitPushRequest(name="big", version=1), 150)
            t2 = time.monotonic()
        for h in hogs:
            h.kill()
        print(
            f"tensors={args.tensors} load={args.load} begin_s={t1 - t0:.2f} commit_s={t2 - t1:.2f} "
            f"worst_list_agents_s={lat.worst:.2f} state={tpb.CheckpointState.Name(cp.state)}"
        )
    finally:
        c.close()


def _spin() -> None:
    while True:
        pass


if __name__ == "__main__":
    main()
