"""Local rendezvous under attack by another local user (CI runs as root; the attacker is
nobody, through setpriv): an IPC dir made in advance, a fake worker at the socket path, an
engine of another user at a reachable worker socket, a segment someone else owns. Real
agents, ckptd, reference receivers; the attacker's processes are
tests/support/rendezvous_peers.py."""

from __future__ import annotations

import json
import os
import shutil
import site
import stat
import subprocess
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

from ckpt.v1 import types_pb2 as tpb
from ckpt_agent import shm
from ckpt_common.ipc import worker_endpoint
from tests.support.cluster import PY, REPO, Cluster, read_report, wait_for
from tests.support.tensors import write_sharded

pytestmark = pytest.mark.slow
NOBODY = 65534
PEERS = str(REPO / "tests" / "support" / "rendezvous_peers.py")
NODE = f"rdv{os.getpid()}"  # its own: other runs on this machine clean up "n1"'s segments


def as_nobody(*cmd: str) -> list[str]:
    return ["setpriv", f"--reuid={NOBODY}", f"--regid={NOBODY}", "--clear-groups", *cmd]


def _nobody_python() -> list[str] | None:
    """An interpreter (with this venv's packages and the repo) that nobody can run: ours if
    nobody can reach it, else the system's of the same version."""
    path = ":".join([str(REPO), *(os.path.realpath(p) for p in site.getsitepackages())])
    v = f"{sys.version_info.major}.{sys.version_info.minor}"
    for exe in (os.path.realpath(sys.executable), f"/usr/bin/python{v}"):
        cmd = ["env", f"PYTHONPATH={path}", exe]
        r = subprocess.run(
            as_nobody(*cmd, "-c", "import zmq, ckpt.v1.ipc_pb2, ckpt_common.checksum"),
            capture_output=True,
            timeout=60,
            cwd="/",
        )
        if r.returncode == 0:
            return cmd
    return None


@pytest.fixture(scope="module")
def nobody_py() -> list[str]:
    cmd = _nobody_python()
    if cmd is None:
        pytest.skip("no Python interpreter another user can run with these packages")
    return cmd


@pytest.fixture
def public() -> Iterator[Path]:
    """A directory every user can reach (pytest's tmp dirs are root's alone), with a sticky
    world-writable `tmp` in it standing in for /tmp."""
    root = Path(tempfile.mkdtemp(prefix="ckpt-rdv-", dir="/tmp"))
    root.chmod(0o755)
    (root / "tmp").mkdir()
    (root / "tmp").chmod(0o1777)
    yield root
    shutil.rmtree(root, ignore_errors=True)


def records(path: Path) -> list[dict]:
    if not path.exists():
        return []
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def events(path: Path) -> list[str]:
    return [r["event"] for r in records(path)]


def spawn(cmd: list[str], log: Path, env: dict | None = None) -> subprocess.Popen:
    out = open(log, "ab")  # noqa: SIM115 (the child keeps it)
    return subprocess.Popen(
        cmd, stdout=out, stderr=subprocess.STDOUT, env=env, cwd="/", start_new_session=True
    )


def stop(p: subprocess.Popen) -> None:
    if p.poll() is None:
        p.kill()
    p.wait(10)


def nobody_segment(nobody_py: list[str], name: str) -> None:
    r = subprocess.run(as_nobody(*nobody_py, PEERS, "segment", name), capture_output=True)
    assert r.returncode == 0, r.stderr
    st = os.stat(os.path.join(shm.SHM_DIR, name))
    assert st.st_uid == NOBODY


def reference(ipc: Path, device: int, report: Path, log: Path) -> subprocess.Popen:
    cmd = [PY, "-m", "vllm_ext.reference", "--node-id", NODE, "--device", str(device)]
    env = {**os.environ, "PYTHONPATH": str(REPO), "CKPT_IPC_DIR": str(ipc)}
    return spawn([*cmd, "--ipc-dir", str(ipc), "--report", str(report)], log, env)


def test_agent_refuses_an_ipc_dir_another_user_made(public: Path, tmp_path: Path) -> None:
    """(a) nobody made the IPC dir first (in a sticky world-writable dir, as in /tmp): the
    agent stops with the reason; the dir stays nobody's and holds nothing of the agent's."""
    ipc = public / "tmp" / "ckpt-ipc"
    assert subprocess.run(as_nobody("mkdir", "-m", "777", str(ipc))).returncode == 0
    env = {**os.environ, "PYTHONPATH": str(REPO), "CKPT_IPC_DIR": str(ipc)}
    args = ["-m", "ckpt_agent.main", "--daemon", "127.0.0.1:1", "--node-id", NODE]
    log = tmp_path / "agent.log"
    p = spawn([PY, *args], log, env)
    try:
        code = p.wait(60)
    except subprocess.TimeoutExpired:
        code = None
    finally:
        stop(p)
    text = log.read_text()
    assert code not in (None, 0), f"the agent adopted nobody's IPC dir: {text[-2000:]}"
    assert "owned by uid 65534" in text and str(ipc) in text, text[-2000:]
    st = ipc.stat()
    assert st.st_uid == NOBODY and stat.S_IMODE(st.st_mode) == 0o777  # not chmodded
    assert os.listdir(ipc) == []


def _fake_worker(nobody_py: list[str], ipc: Path, seg: str, out: Path, log: Path):
    endpoint = worker_endpoint(NODE, 0, str(ipc))
    p = spawn(as_nobody(*nobody_py, PEERS, "worker", endpoint, seg, str(out)), log)
    wait_for(lambda: "bound" in events(out), 30, "the fake worker to bind")
    return p


@pytest.mark.parametrize("dir_owner", ["nobody", "root"])
def test_engine_refuses_a_worker_another_user_bound(
    nobody_py: list[str], public: Path, tmp_path: Path, dir_owner: str
) -> None:
    """(b) nobody's fake worker listens at the worker's socket path, serving pwned@666 from
    its own segment with right checksums. In a dir nobody owns, the engine refuses the dir;
    in a root-owned dir nobody bound in while it was loose (since tightened), it refuses the
    peer (SO_PEERCRED). Either way nothing is loaded."""
    ipc = public / "tmp" / "ipc"
    if dir_owner == "nobody":
        assert subprocess.run(as_nobody("mkdir", "-m", "755", str(ipc))).returncode == 0
    else:
        ipc.mkdir()
        ipc.chmod(0o777)
    seg = f"ckpt-rdv-{os.getpid()}-{dir_owner}"
    nobody_segment(nobody_py, seg)
    out, report, rlog = (
        public / "tmp" / "worker.jsonl",
        tmp_path / "report.json",
        tmp_path / "r.log",
    )
    w = _fake_worker(nobody_py, ipc, seg, out, tmp_path / "worker.log")
    if dir_owner == "root":
        ipc.chmod(0o755)
    r = reference(ipc, 0, report, rlog)
    try:
        want = "owned by uid 65534" if dir_owner == "nobody" else "runs as uid 65534"
        wait_for(lambda: want in rlog.read_text(), 60, "the engine to refuse", interval=0.2)
        time.sleep(1.0)
        assert read_report(report).get("version") == 0
        assert "validated" not in events(out) and "done" not in events(out)
        if dir_owner == "nobody":
            assert "hello" not in events(out)  # it never even connected
    finally:
        stop(r)
        stop(w)
        shm.unlink(seg)


def test_engine_refuses_a_segment_another_user_owns(
    nobody_py: list[str], public: Path, tmp_path: Path
) -> None:
    """(d) a worker the engine trusts (root) names a segment nobody made: the engine does
    not map it, nothing is loaded. The same worker with its own segment is loaded (control)."""
    ipc = tmp_path / "ipc"
    ipc.mkdir(mode=0o700)
    bad, good = f"ckpt-rdv-{os.getpid()}-nobody", f"ckpt-rdv-{os.getpid()}-root"
    nobody_segment(nobody_py, bad)
    env = {**os.environ, "PYTHONPATH": str(REPO)}
    subprocess.run([PY, PEERS, "segment", good], check=True, env=env)
    os.chmod(os.path.join(shm.SHM_DIR, good), 0o600)
    procs = []
    try:
        for device, seg in ((0, bad), (1, good)):
            out = tmp_path / f"worker{device}.jsonl"
            endpoint = worker_endpoint(NODE, device, str(ipc))
            cmd = [PY, PEERS, "worker", endpoint, seg, str(out)]
            procs.append(spawn(cmd, tmp_path / f"w{device}.log", env))
            wait_for(lambda out=out: "bound" in events(out), 30, "the fake worker to bind")
            report = tmp_path / f"report{device}.json"
            procs.append(reference(ipc, device, report, tmp_path / f"r{device}.log"))
            wait_for(lambda out=out: "done" in events(out), 60, "the update to end")
        # control: the same worker with its own segment is loaded
        wait_for(lambda: read_report(tmp_path / "report1.json").get("version") == 666, 10, "666")
        assert read_report(tmp_path / "report0.json").get("version") == 0
        assert f"segment {bad} is owned by uid 65534" in (tmp_path / "r0.log").read_text()
    finally:
        for p in procs:
            stop(p)
        shm.unlink(bad)
        shm.unlink(good)


def test_worker_ignores_an_engine_of_another_user(
    nobody_py: list[str], public: Path, tmp_path: Path
) -> None:
    """(c) the worker socket is reachable by other users (the operator trusts engines of
    uid 12345: dir 0711, socket 0666; made so here too, whatever the agent did): nobody's
    engine says hello first, but is never answered; the update fails for want of an engine,
    and a trusted engine then takes the next one through the same socket."""
    ipc = public / "ipc"
    c = Cluster(tmp_path / "c")
    c.env.update({"CKPT_IPC_DIR": str(ipc), "CKPT_IPC_PEER_UIDS": "12345"})
    try:
        c.start_daemon("--receiver-timeout-s", "3")
        c.start_agent(NODE, 1)
        c.wait_ranks(1)
        t = {"w": torch.arange(64, dtype=torch.float32)}
        cp = c.client.push("m", 1, [str(write_sharded(t, tmp_path / "v1"))])
        assert cp.state == tpb.CHECKPOINT_READY
        inst = tpb.Instance(
            name="i", kind=tpb.INSTANCE_RECEIVER, tp_size=1,
            ranks=[tpb.InstanceRank(node_id=NODE, device=0)],
        )  # fmt: skip
        c.client.register_instance(inst)
        endpoint = worker_endpoint(NODE, 0, str(ipc))
        sock = endpoint.removeprefix("ipc://")
        wait_for(lambda: os.path.exists(sock), 30, "the worker socket")
        ipc.chmod(0o711)
        os.chmod(sock, 0o666)
        out = public / "tmp" / "engine.jsonl"
        p = spawn(as_nobody(*nobody_py, PEERS, "engine", endpoint, str(out), "20"), tmp_path / "e")
        try:
            wait_for(lambda: "connected" in events(out), 30, "nobody's engine")
            time.sleep(1.0)  # its hellos are queued at the worker before the job starts
            job = c.client.wait(c.client.update("m", 1, instances=["i"]).id, 60)
            assert job.state == tpb.JOB_FAILED, job
            assert "heard" not in events(out), records(out)
            assert "engine_peer_refused" in c.log(f"agent-{NODE}")
        finally:
            stop(p)
        report = c.start_receiver(NODE, 0)
        wait_for(report.exists, 60, "the trusted receiver")
        job = c.client.wait(c.client.update("m", 1, instances=["i"]).id, 60)
        assert job.state == tpb.JOB_SUCCEEDED, job.reason
        assert read_report(report)["version"] == 1
    finally:
        c.close()
