"""Runs examples/fsdp2_publish.py as a two-process gloo job on this machine, each rank on
the node named for it (CKPT_NODE_ID), as torchrun would start it."""

from __future__ import annotations

import json
import socket
import subprocess
import sys
from pathlib import Path

from tests.support.cluster import Cluster

EXAMPLE = Path(__file__).resolve().parents[2] / "examples" / "fsdp2_publish.py"


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def run_fsdp2(c: Cluster, nodes: list[str], *args: str, timeout: float = 240) -> list[dict]:
    """Starts one process per node entry (rank i on nodes[i]); returns each rank's result."""
    port = free_port()
    result = c.root / f"fsdp2-{port}"
    procs = []
    for rank, node in enumerate(nodes):
        env = {
            **c.env,
            "CKPTD_ADDR": c.addr,
            "CKPT_NODE_ID": node,
            "RANK": str(rank),
            "LOCAL_RANK": str(rank),
            "WORLD_SIZE": str(len(nodes)),
            "MASTER_ADDR": "127.0.0.1",
            "MASTER_PORT": str(port),
            "OMP_NUM_THREADS": "1",
        }
        log = open(c.logs / f"fsdp2-{port}-{rank}.log", "w")  # noqa: SIM115
        procs.append(
            subprocess.Popen(
                [sys.executable, str(EXAMPLE), *args, "--result", str(result)],
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    try:
        codes = [p.wait(timeout) for p in procs]
    finally:
        for p in procs:
            p.kill()
    logs = [(c.logs / f"fsdp2-{port}-{r}.log").read_text()[-3000:] for r in range(len(nodes))]
    assert codes == [0] * len(nodes), f"ranks exited {codes}:\n" + "\n".join(logs)
    return [json.loads(Path(f"{result}.{r}").read_text()) for r in range(len(nodes))]
