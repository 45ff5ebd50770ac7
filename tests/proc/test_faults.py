"""Fault injection on real processes: ckptd (port 0), two agents x 2 CPU slots, four
reference receivers. Each case sends one signal (SIGKILL or SIGSTOP) to one target (node-b's
agent, one of its workers, the whole node, rank 3's engine, ckptd) at one moment (idle, during
a push, during an update), and asserts:

- the push or job ends within BOUND_S of the fault (or is refused at once), with a reason
  that names what failed; nothing hangs;
- once the process is back (SIGCONT, or restarted), a new push and update to all four ranks
  succeeds within seconds, and every receiver holds exactly its bytes (sha256 per tensor);
- the registry holds no LOADING version and no unfinished job, and /dev/shm no orphan
  segment (after the test's versions are deleted, only one hand-off segment per device).

The final version of an engine after a failed update (rollback) is not asserted here.
"""

from __future__ import annotations

import os
import re
import signal
import subprocess
import time
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path

import pytest
import torch

from ckpt.v1 import types_pb2 as tpb
from ckpt_agent.host_store import segment_prefix
from ckpt_common.errors import CkptError, FailedPrecondition, Unavailable
from tests.support.cluster import Cluster, read_report, wait_for
from tests.support.spec import ClusterSpec, Node, Receivers
from tests.support.tensors import digests, write_sharded

RANKS = [0, 1, 2, 3]
NODES = ("node-a", "node-b")
BOUND_S = 10.0  # a fault ends its push or job within this
NEXT_S = 20.0  # the next update after recovery succeeds within this
BUCKET = 32 << 10  # small buckets: an update of SLOW_BYTES lasts a couple of seconds
KILL, STOP = signal.SIGKILL, signal.SIGSTOP
DONE = (tpb.JOB_SUCCEEDED, tpb.JOB_FAILED, tpb.JOB_CANCELLED)

# What a reason must mention, per target (the rank or node that failed, and how).
REASONS = {
    "agent": r"node-b",
    "worker": r"node-b|rank [23]",
    "node": r"node-b",
    "engine": r"rank 3|node-b/1|node-b:1|engine",
    "ckptd": r"ckptd restarted",
}


SPEC = ClusterSpec(  # four unregistered receivers: ranks 0-3, rank 3 on node-b's device 1
    receiver_timeout_s=4,
    nodes=tuple(Node(id=n, devices=2) for n in NODES),
    receivers=tuple(Receivers(node=n, devices=(0, 1)) for n in NODES),
)


@dataclass
class Run:
    """What the module's cluster has been through: pushes so far (each push's name and
    seed), node-a's listening sockets after a first job (what every case must leave)."""

    seq: int = 0
    ports: int = 0


RUN = Run()


@pytest.fixture(scope="module")
def cluster(module_cluster, tmp_path_factory) -> Cluster:
    c = module_cluster(SPEC, "faults")
    RUN.seq = 0
    _next_update_succeeds(c, tmp_path_factory.mktemp("first"))  # what a job leaves for good
    _clean(c, ports=False)
    RUN.ports = _ports(c)
    return c


# ----------------------------------------------------------------------------- processes


def _children(pid: int) -> list[int]:
    out = subprocess.run(["pgrep", "-P", str(pid)], capture_output=True, text=True)
    kids = []
    for p in (int(x) for x in out.stdout.split()):
        try:
            cmd = Path(f"/proc/{p}/cmdline").read_bytes()
        except FileNotFoundError:
            continue
        if b"spawn_main" in cmd and b"resource_tracker" not in cmd:
            kids.append(p)
    return sorted(kids)


def _workers(c: Cluster, node: str) -> list[int]:
    agent = c.procs[f"agent-{node}"].pid
    return wait_for(lambda: (w := _children(agent)) and len(w) == 2 and w, 60, "workers")


def _pids(c: Cluster, target: str) -> list[int]:
    if target == "agent":
        return [c.procs["agent-node-b"].pid]
    if target == "worker":
        return [_workers(c, "node-b")[-1]]
    if target == "node":
        return [c.procs["agent-node-b"].pid, *_workers(c, "node-b")]
    if target == "engine":
        return [c.procs["recv-node-b-1"].pid]
    return [c.procs["ckptd"].pid]


def _signal(pids: list[int], sig: int) -> None:
    for p in pids:
        try:
            os.kill(p, sig)
        except ProcessLookupError:
            pass


def _bring_back(c: Cluster, target: str, sig: int, pids: list[int]) -> None:
    """SIGCONT what was stopped; restart what was killed (a worker restarts by itself)."""
    if sig == STOP:
        _signal(pids, signal.SIGCONT)
    elif target in ("agent", "node"):
        c.stop("agent-node-b")  # the rest of its process group, if any
        c.start_agent("node-b", 2)
    elif target == "engine":
        c.stop("recv-node-b-1")
        c.reports[3] = c.start_receiver("node-b", 1)
    elif target == "ckptd":
        c.procs.pop("ckptd").wait(10)
        c.start_daemon(*c.spec.daemon_flags())
    c.wait_ranks(4)
    wait_for(lambda: len(_workers(c, "node-b")) == 2, 60, "node-b's workers")


# ----------------------------------------------------------------------------- checks


def _tensors(seed: int, nbytes: int) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(seed)
    n = max(1, nbytes // (8 * 4 * 1024))
    return {f"model.layers.{i}.w": torch.randn(1024, n, generator=g) for i in range(8)}


def _push(c: Cluster, tmp: Path, tensors: dict, **kw) -> str:
    RUN.seq += 1
    name = f"f{RUN.seq}"
    src = str(write_sharded(tensors, tmp / name))
    deadline = time.monotonic() + 10
    while True:  # an agent whose worker was restarted re-attaches: a moment without it
        try:
            c.client.push(name, 1, [src], **kw)
            return name
        except Unavailable:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def _wait_job(c: Cluster, job_id: str, timeout: float) -> tpb.Job:
    def ended() -> tpb.Job | None:
        try:
            j = c.client.job(job_id)
        except CkptError:
            return None
        return j if j.state in DONE else None

    return wait_for(ended, timeout, f"job {job_id} to end", interval=0.05)


def _next_update_succeeds(c: Cluster, tmp: Path) -> float:
    """A fresh push and an update of all ranks; every receiver holds exactly its bytes."""
    t = _tensors(1000 + RUN.seq, 64 << 10)
    name = _push(c, tmp, t)
    t0 = time.monotonic()
    while True:
        job = wait_for(lambda: _try_update(c, name), NEXT_S, "an update to be accepted")
        job = _wait_job(c, job.id, NEXT_S)
        # An engine whose worker vanished mid-update waits for its step timeout (10 s, the
        # reference receiver's) before it says hello again: then the update is retried.
        if "no engine connected" not in job.reason or time.monotonic() - t0 > NEXT_S:
            break
    took = time.monotonic() - t0
    assert job.state == tpb.JOB_SUCCEEDED, job.reason
    want = digests(t)
    for r in c.reports:
        got = read_report(r).get("tensors", {})
        assert {k: got.get(k) for k in want} == want, r
    return took


def _try_update(c: Cluster, name: str) -> tpb.Job | None:
    try:
        return c.client.update(name, ranks=RANKS, bucket_bytes=BUCKET)
    except CkptError:  # e.g. an update to these ranks is still being rolled back
        return None


def _shm_orphans(c: Cluster) -> list[str]:
    """With no version left: segments of the cluster's devices beyond one each (its engine
    hand-off buffer), whatever the naming scheme inside a device's prefix."""
    out = []
    names = os.listdir("/dev/shm")
    for node in NODES:
        for d in (0, 1):
            pre = f"{segment_prefix(node)}{d}_"
            out += sorted(n for n in names if n.startswith(pre))[1:]
    return out


def _listening(pid: int) -> int:
    """TCP sockets the process listens on (/proc: its socket inodes in LISTEN state)."""
    mine = set()
    try:
        for fd in os.listdir(f"/proc/{pid}/fd"):
            link = os.readlink(f"/proc/{pid}/fd/{fd}")
            if link.startswith("socket:["):
                mine.add(link[8:-1])
    except OSError:
        return 0
    n = 0
    for table in ("tcp", "tcp6"):
        with open(f"/proc/{pid}/net/{table}") as f:
            for line in list(f)[1:]:
                cols = line.split()
                n += cols[3] == "0A" and cols[9] in mine
    return n


def _ports(c: Cluster) -> int:
    """Listening sockets of node-a's agent and workers (node-a survives every case)."""
    agent = c.procs["agent-node-a"].pid
    return sum(_listening(p) for p in (agent, *_workers(c, "node-a")))


def _clean(c: Cluster, ports: bool = True) -> None:
    """No version LOADING, no job running; after deleting every version, no orphans, and
    node-a listens on no more ports than before any case (a group store or gloo pair left
    behind by an aborted job would)."""
    cps = c.client.checkpoints()
    assert not [x for x in cps if x.state == tpb.CHECKPOINT_LOADING], cps
    assert all(j.state in DONE for j in c.client.jobs(1000))
    wait_for(lambda: all(j.state in DONE for j in c.client.jobs(1000)), 30, "rollbacks")
    for x in cps:
        try:
            c.client.delete(x.name, x.version)
        except CkptError:
            pass
    wait_for(lambda: not _shm_orphans(c), 15, "orphan segments to go")
    if ports:
        wait_for(lambda: _ports(c) <= RUN.ports, 15, f"node-a back to {RUN.ports} listening ports")


# ----------------------------------------------------------------------------- moments


def _fault_idle(c: Cluster, tmp: Path, target: str, sig: int) -> str:
    """The fault first, then an update: refused at once, or failed within BOUND_S."""
    name = _push(c, tmp, _tensors(RUN.seq, 64 << 10))
    pids = _pids(c, target)
    _signal(pids, sig)
    t0 = time.monotonic()
    try:
        try:
            job = c.client.update(name, ranks=RANKS, bucket_bytes=BUCKET)
        except CkptError as e:
            return f"{time.monotonic() - t0:.1f}s refused: {e}"
        done = _wait_job(c, job.id, BOUND_S + 5)
        took = time.monotonic() - t0
        assert took <= BOUND_S, done
        return f"{took:.1f}s {_outcome(done, target)}"
    finally:
        _bring_back(c, target, sig, pids)


def _fault_update(c: Cluster, tmp: Path, target: str, sig: int) -> str:
    """The fault while buckets flow; the job ends within BOUND_S of it."""
    name = _push(c, tmp, _tensors(RUN.seq, 8 << 20))
    job = c.client.update(name, ranks=RANKS, bucket_bytes=BUCKET)
    flowing = wait_for(lambda: _flowing(c, job.id), 30, "buckets to flow", 0.02)
    assert flowing.state == tpb.JOB_RUNNING, flowing.reason
    pids = _pids(c, target)
    _signal(pids, sig)
    t0 = time.monotonic()
    try:
        if target == "ckptd":
            if sig == KILL:
                _bring_back(c, target, sig, pids)
                t0 = time.monotonic()
            else:
                time.sleep(2)
                _signal(pids, signal.SIGCONT)
                t0 = time.monotonic()
        done = _wait_job(c, job.id, BOUND_S + 10)
        took = time.monotonic() - t0
        assert took <= BOUND_S, (took, done)
        return f"{took:.1f}s {_outcome(done, target)}"
    finally:
        if target != "ckptd":
            _bring_back(c, target, sig, pids)


def _flowing(c: Cluster, job_id: str) -> tpb.Job | None:
    j = c.client.job(job_id)
    return j if j.buckets_done >= 4 or j.state in DONE else None


def _fault_push(c: Cluster, tmp: Path, target: str, sig: int) -> str:
    """SIGSTOP before the push (its commands reach a frozen process); SIGKILL right after
    the push was recorded. The push ends (READY, or failed and removed) within BOUND_S."""
    t = _tensors(RUN.seq, 8 << 20)
    pids = _pids(c, target)
    RUN.seq += 1
    name = f"f{RUN.seq}"
    src = str(write_sharded(t, tmp / name))
    outcome = ""
    if sig == STOP and target != "ckptd":
        _signal(pids, sig)
        t0 = time.monotonic()
        try:
            c.client.push(name, 1, [src], timeout_s=60)
            outcome = "completed"
        except CkptError as e:
            outcome = f"failed: {e}"
            assert re.search(REASONS[target], str(e)), e
        took = time.monotonic() - t0
        _bring_back(c, target, sig, pids)
        assert took <= BOUND_S, (took, outcome)
        return f"{took:.1f}s {outcome}"
    c.client.push(name, 1, [src], wait=False)
    _signal(pids, sig)
    t0 = time.monotonic()
    if target == "ckptd":
        if sig == STOP:
            time.sleep(2)
        _bring_back(c, target, sig, pids)
        t0 = time.monotonic()
    state = wait_for(lambda: _push_state(c, name), BOUND_S + 10, "the push to end")
    took = time.monotonic() - t0
    if target != "ckptd":
        _bring_back(c, target, sig, pids)
    assert took <= BOUND_S, (took, state)
    return f"{took:.1f}s {state}"


def _push_state(c: Cluster, name: str) -> str:
    try:
        cps = c.client.checkpoints(name)
    except CkptError:
        return ""
    if not cps:
        return "removed"
    s = cps[0].state
    return "" if s == tpb.CHECKPOINT_LOADING else f"{tpb.CheckpointState.Name(s)} {cps[0].reason}"


def _outcome(job: tpb.Job, target: str) -> str:
    if job.state == tpb.JOB_FAILED:
        assert re.search(REASONS[target], job.reason), job.reason
    return f"{tpb.JobState.Name(job.state)}: {job.reason[:160]}"


MOMENTS: dict[str, Callable[[Cluster, Path, str, int], str]] = {
    "idle": _fault_idle,
    "update": _fault_update,
    "push": _fault_push,
}


def _cases() -> list:
    out = []
    for target in ("agent", "worker", "node", "engine", "ckptd"):
        for sig in ("KILL", "STOP"):
            for moment in ("idle", "update", "push"):
                if target == "engine" and moment == "push":
                    continue  # engines take no part in a push
                if target == "ckptd" and moment == "idle":
                    continue  # covered by test_broadcast_e2e (restart between push and update)
                if target == "node" and sig == "KILL":
                    continue  # same as the agent: its workers die with it
                slow = sig == "KILL" and target in ("agent", "ckptd") or moment == "idle"
                marks = [pytest.mark.slow] if slow else []
                out.append(pytest.param(target, sig, moment, marks=marks))
    return out


@pytest.mark.parametrize("target,sig,moment", _cases())
def test_fault(cluster: Cluster, tmp_path: Path, target: str, sig: str, moment: str) -> None:
    c = cluster
    t0 = time.monotonic()
    outcome = MOMENTS[moment](c, tmp_path, target, {"KILL": KILL, "STOP": STOP}[sig])
    t_fault = time.monotonic() - t0
    took = _next_update_succeeds(c, tmp_path)
    _clean(c)
    print(
        f"\nFAULT {target} SIG{sig} {moment}: {outcome} | "
        f"case {t_fault:.1f}s, next update {took:.1f}s"
    )


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:  # a zombie has exited
        with open(f"/proc/{pid}/stat") as f:
            return f.read().split(") ", 1)[1][0] != "Z"
    except OSError:
        return False


@pytest.mark.slow
@pytest.mark.parametrize("to", ["group", "pid"])
def test_agent_sigterm_exits_promptly_and_leaves_no_segments(tmp_path: Path, to: str) -> None:
    """SIGTERM as Kubernetes (the pid) and systemd (the group) send it: the agent and its
    workers are gone within 3 s, and so are their shared-memory segments."""
    c = Cluster(tmp_path)
    try:
        c.start_daemon()
        c.start_agent("term", 2)
        c.wait_ranks(2)
        c.client.push("t", 1, [str(write_sharded(_tensors(7, 1 << 20), tmp_path / "t"))])
        pre = segment_prefix("term")
        assert [n for n in os.listdir("/dev/shm") if n.startswith(pre)]
        agent = c.procs.pop("agent-term")
        t0 = time.monotonic()
        kids = _children(agent.pid)
        assert kids
        (os.killpg if to == "group" else os.kill)(agent.pid, signal.SIGTERM)
        agent.wait(10)
        wait_for(lambda: not [k for k in kids if _alive(k)], 10, "workers to exit")
        took = time.monotonic() - t0
        assert took < 3, f"{took:.2f}s"
        assert not [n for n in os.listdir("/dev/shm") if n.startswith(pre)]
    finally:
        c.close()


@pytest.mark.slow
def test_ckptd_sigterm_drains_running_jobs_to_their_own_end(tmp_path: Path) -> None:
    """SIGTERM while a job runs: new jobs are refused, the running one ends on its own (here:
    failed, its engine never came) rather than being cut off, then ckptd exits; the
    restarted ckptd shows the job with its own reason."""
    c = Cluster(tmp_path)
    try:
        c.start_daemon("--receiver-timeout-s", "3", "--drain-s", "20")
        c.start_agent("drain", 1)
        c.wait_ranks(1)
        c.client.push("d", 1, [str(write_sharded(_tensors(3, 1 << 16), tmp_path / "d"))])
        job = c.client.update("d", 1, ranks=[0])  # no engine on rank 0: fails after 3 s
        ckptd = c.procs["ckptd"]
        t0 = time.monotonic()
        ckptd.send_signal(signal.SIGTERM)
        time.sleep(0.5)
        with pytest.raises(Unavailable, match="shutting down"):
            c.client.update("d", 1, ranks=[0])
        ckptd.wait(30)
        took = time.monotonic() - t0
        c.procs.pop("ckptd")
        c.start_daemon()
        done = c.client.job(job.id)
        assert done.state == tpb.JOB_FAILED, done
        assert "ckptd stopped" not in done.reason and "engine" in done.reason, done.reason
        assert took < 15, f"{took:.1f}s"
    finally:
        c.close()


def _hold(c: Cluster, t: dict) -> None:
    """Every receiver holds exactly t's bytes (its report is written once it has loaded)."""
    want = digests(t)

    def held() -> bool:
        return all(
            {k: read_report(r).get("tensors", {}).get(k) for k in want} == want for r in c.reports
        )

    wait_for(held, 10, "every receiver to hold the update's bytes")


def _update_when_accepted(c: Cluster, name: str, within: float) -> tpb.Job:
    return wait_for(lambda: _try_update(c, name), within, "an update to be accepted", 0.05)


def test_thawed_worker_drops_commands_of_ended_jobs(cluster: Cluster, tmp_path: Path) -> None:
    """A worker frozen while two updates are sent to it finds their commands (and their
    aborts) queued when it thaws: it drops them instead of connecting to groups long gone
    (RENDEZVOUS_S each, deaf to aborts), so an update right after the thaw runs at once."""
    c = cluster
    t = _tensors(2000 + RUN.seq, 64 << 10)
    name = _push(c, tmp_path, t)
    pids = _pids(c, "worker")
    _signal(pids, STOP)
    try:
        for _ in range(2):  # each reaches the frozen worker before its agent notices
            job = _update_when_accepted(c, name, BOUND_S)
            done = _wait_job(c, job.id, BOUND_S + 5)
            assert done.state == tpb.JOB_FAILED, done
    finally:
        _signal(pids, signal.SIGCONT)
    t0 = time.monotonic()
    job = _update_when_accepted(c, name, BOUND_S)
    done = _wait_job(c, job.id, NEXT_S)
    took = time.monotonic() - t0
    assert done.state == tpb.JOB_SUCCEEDED, done.reason
    assert took < 6, f"{took:.1f}s"
    _hold(c, t)
    _clean(c)


def test_forced_removal_during_an_update_is_refused_before_it_changes_anything(
    cluster: Cluster, tmp_path: Path
) -> None:
    """RemoveAgent --force while a job sends bytes to the node: FAILED_PRECONDITION, the
    agent stays attached and the job succeeds."""
    c = cluster
    t = _tensors(3000 + RUN.seq, 8 << 20)
    name = _push(c, tmp_path, t)
    job = c.client.update(name, ranks=RANKS, bucket_bytes=BUCKET)
    flowing = wait_for(lambda: _flowing(c, job.id), 30, "buckets to flow", 0.02)
    assert flowing.state == tpb.JOB_RUNNING, flowing.reason
    with pytest.raises(FailedPrecondition, match="a job is running on node-b"):
        c.client.remove_agent("node-b", force=True)
    agents = {a.node_id: a.state for a in c.client.agents()}
    assert agents["node-b"] == tpb.AGENT_ATTACHED, agents
    done = _wait_job(c, job.id, 60)
    assert done.state == tpb.JOB_SUCCEEDED, done.reason
    _hold(c, t)
    _clean(c)
