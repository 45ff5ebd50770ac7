"""Agents as another local user would try them: what they listen on, and what their files
let others read (CI runs as root: the other user is nobody, through setpriv)."""

from __future__ import annotations

import os
import stat
import subprocess
import threading
import time
from pathlib import Path

import pytest
import torch

from ckpt.v1 import types_pb2 as tpb
from ckpt_common.credentials import is_loopback_host
from tests.support.cluster import Cluster
from tests.support.spec import ClusterSpec, Node
from tests.support.tensors import write_sharded

pytestmark = pytest.mark.slow


def as_nobody(*cmd: str) -> subprocess.CompletedProcess:
    return subprocess.run(
        ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups", *cmd],
        capture_output=True,
        text=True,
        timeout=30,
    )


def group_pids(pid: int) -> set[int]:
    out = subprocess.run(["ps", "-e", "-o", "pid=,pgid="], capture_output=True, text=True)
    return {int(p) for p, g in (line.split() for line in out.stdout.splitlines()) if int(g) == pid}


def listening(pids: set[int]) -> set[str]:
    out = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout
    found = set()
    for line in out.splitlines():
        if any(f"pid={p}," in line for p in pids):
            found.add(line.split()[3].rsplit(":", 1)[0].strip("[]"))
    return found


SPEC = ClusterSpec(
    receiver_timeout_s=3,
    nodes=(Node(id="n1"), Node(id="n2")),
    env=(("CKPT_TRUSTED_FABRIC", "0"),),  # no Mooncake: everything else must stay on --host
)


@pytest.fixture(scope="module")
def cluster(module_cluster) -> Cluster:
    return module_cluster(SPEC, "confine")


def test_agents_listen_on_their_host_only(cluster: Cluster, tmp_path: Path) -> None:
    """Sampled all through a two-node update: the group's TCPStore and gloo's sockets."""
    c = cluster
    tensors = {f"w{i}": torch.randn(1024, 1024) for i in range(24)}
    c.client.push("big", 1, [str(write_sharded(tensors, tmp_path / "b"))])
    pids = group_pids(c.procs["agent-n1"].pid) | group_pids(c.procs["agent-n2"].pid)
    seen: set[str] = set()
    stop = threading.Event()

    def sample() -> None:
        while not stop.is_set():
            seen.update(listening(pids))
            time.sleep(0.005)

    th = threading.Thread(target=sample)
    th.start()
    try:
        job = c.client.wait(c.client.update("big", 1, ranks=[0, 1], bucket_bytes=1 << 20).id, 120)
    finally:
        stop.set()
        th.join()
    assert job.state in (tpb.JOB_SUCCEEDED, tpb.JOB_FAILED)  # no engines: the group ran
    assert seen, "nothing listened during the update: the sampling missed it"
    assert all(is_loopback_host(a) for a in seen), seen


def test_other_users_read_nothing(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    staged: list[str] = []
    from ckptctl import st_writer

    path = "/dev/shm/ckpt-push-confine-test.safetensors"
    victim = tmp_path / "victim"
    victim.write_bytes(b"keep")
    os.symlink(victim, path)  # planted by someone: the writer replaces the link, not its target
    staged.append(path)
    try:
        st_writer.write_safetensors({"w": torch.ones(4)}, path)
        assert victim.read_bytes() == b"keep" and not os.path.islink(path)
        assert stat.S_IMODE(os.stat(path).st_mode) == 0o600
        assert as_nobody("cat", path).returncode != 0
    finally:
        for p in staged:
            os.unlink(p)
    segs = [p for p in Path("/dev/shm").iterdir() if p.name.startswith("ckpt")]
    assert segs, "no host-store segments to check"
    for p in segs:
        assert stat.S_IMODE(p.stat().st_mode) & 0o077 == 0, p
    ipc = Path(c.env["CKPT_IPC_DIR"])
    assert stat.S_IMODE(ipc.stat().st_mode) == 0o700
    r = as_nobody("ls", str(ipc))
    assert r.returncode != 0 and "Permission denied" in r.stderr
