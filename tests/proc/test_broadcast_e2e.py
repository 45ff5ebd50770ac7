"""End to end on real processes: ckptd on port 0, two agents x 2 slots, reference receivers
on all four ranks. Push from files, broadcast updates, errors, restarts."""

from __future__ import annotations

import json
import os
import signal
import struct
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from ckpt.v1 import types_pb2 as tpb
from ckpt_client.probes import make_probe
from ckpt_common.errors import (
    AlreadyExists,
    FailedPrecondition,
    InvalidArgument,
    NotFound,
    PermissionDenied,
)
from tests.support.cluster import Cluster, read_report, wait_for
from tests.support.spec import ClusterSpec, Node, Receivers
from tests.support.tensors import digests, mixed_tensors, write_sharded

pytestmark = pytest.mark.slow
RANKS = [0, 1, 2, 3]


SPEC = ClusterSpec(  # four unregistered receivers: ranks 0-3
    receiver_timeout_s=4,
    nodes=(Node(id="node-a", devices=2), Node(id="node-b", devices=2)),
    receivers=(Receivers(node="node-a", devices=(0, 1)), Receivers(node="node-b", devices=(0, 1))),
)


@pytest.fixture(scope="module")
def cluster(module_cluster) -> Cluster:
    return module_cluster(SPEC, "e2e")


def versions(c: Cluster) -> list[int]:
    return [read_report(r).get("version", 0) for r in c.reports]


def hashes(c: Cluster, rank: int) -> dict:
    return read_report(c.reports[rank]).get("tensors", {})


def run(c: Cluster, *args, **kw) -> tpb.Job:
    job = c.client.update(*args, **kw)
    return c.client.wait(job.id, 120)


def test_push_update_all_subset_and_v2(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    t1 = mixed_tensors(1)
    cp = c.client.push("llama", 1, [str(write_sharded(t1, tmp_path / "v1"))])
    assert cp.state == tpb.CHECKPOINT_READY and cp.tensor_count == len(t1)
    assert sorted(s.rank for s in cp.shards) == RANKS  # spread over every rank

    job = run(c, "llama", ranks=RANKS, bucket_bytes=1 << 20)
    assert job.state == tpb.JOB_SUCCEEDED, job.reason
    assert job.buckets_done == job.buckets_total > 0
    assert len(job.results) == 4 and all(r.ok for r in job.results)
    want1 = digests(t1)
    for r in RANKS:
        assert hashes(c, r) == want1

    # version 2 from two plain files, onto a subset only
    t2 = mixed_tensors(2)
    names = sorted(t2)
    save_file({n: t2[n] for n in names[:7]}, str(tmp_path / "a.safetensors"))
    save_file({n: t2[n] for n in names[7:]}, str(tmp_path / "b.safetensors"))
    c.client.push("llama", 2, [str(tmp_path / "a.safetensors"), str(tmp_path / "b.safetensors")])
    job = run(c, "llama", 2, ranks=[1, 3], bucket_bytes=1 << 20)
    assert job.state == tpb.JOB_SUCCEEDED, job.reason
    assert list(job.ranks) == [1, 3]
    want2 = digests(t2)
    assert versions(c) == [1, 2, 1, 2]
    assert hashes(c, 1) == want2 and hashes(c, 0) == want1

    # newest READY is the default; small buckets split tensors into chunks
    job = run(c, "llama", ranks=RANKS, bucket_bytes=4096 * 4)
    assert job.state == tpb.JOB_SUCCEEDED, job.reason
    assert job.version == 2 and job.buckets_total > 8
    for r in RANKS:
        assert hashes(c, r) == want2

    # partial update: one layer of version 1
    job = run(c, "llama", 1, ranks=RANKS, tensors=["model.layers.1."])
    assert job.state == tpb.JOB_SUCCEEDED, job.reason
    h = hashes(c, 2)
    for n in t1:
        assert h[n] == (want1[n] if n.startswith("model.layers.1.") else want2[n])


def test_errors_are_precise_and_change_nothing(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    c.client.push("errs", 1, [str(write_sharded(mixed_tensors(5, layers=1), tmp_path / "e"))])
    before = [(x.name, x.version, x.state) for x in c.client.checkpoints()]
    njobs = len(c.client.jobs(1000))

    with pytest.raises(NotFound, match="not found"):
        c.client.update("no-such", ranks=[0])
    with pytest.raises(NotFound, match="errs@9"):
        c.client.update("errs", 9, ranks=[0])
    with pytest.raises(InvalidArgument, match="out of range"):
        c.client.update("errs", 1, ranks=[0, 4])
    with pytest.raises(InvalidArgument, match="no target"):
        c.client.update("errs", 1)
    with pytest.raises(InvalidArgument, match="no tensor matches"):
        c.client.update("errs", 1, ranks=[0], tensors=["zzz"])
    with pytest.raises(NotFound, match="no such file"):
        c.client.push("errs", 2, [str(tmp_path / "missing.safetensors")])
    bad = tmp_path / "corrupt.safetensors"
    bad.write_bytes(b"\x10\x00\x00\x00\x00\x00\x00\x00{not json at all")
    with pytest.raises(InvalidArgument, match="not UTF-8 JSON"):
        c.client.push("errs", 2, [str(bad)])
    with pytest.raises(AlreadyExists):
        c.client.push("errs", 1, [str(tmp_path / "e")])
    with pytest.raises(InvalidArgument, match="version must be 1-"):
        c.client.push("errs", 0, [str(tmp_path / "e")])
    with pytest.raises(InvalidArgument, match="name"):
        c.client.push("bad/name", 1, [str(tmp_path / "e")])
    with pytest.raises(InvalidArgument, match="out of range"):
        c.client.push("errs", 3, [str(tmp_path / "e")], ranks=[7])
    # confined agents: only regular files under the source roots, hostile headers refused
    with pytest.raises(PermissionDenied, match="outside this agent's source roots"):
        c.client.push("errs", 3, ["/etc/hostname"])
    os.mkfifo(tmp_path / "fifo.safetensors")
    with pytest.raises(InvalidArgument, match="not a regular file"):
        c.client.push("errs", 3, [str(tmp_path / "fifo.safetensors")])
    hdr = json.dumps({"w": {"dtype": "F32", "shape": [-4], "data_offsets": [0, 16]}}).encode()
    neg = tmp_path / "neg.safetensors"
    neg.write_bytes(struct.pack("<Q", len(hdr)) + hdr + b"\0" * 16)
    with pytest.raises(InvalidArgument, match="bad shape"):
        c.client.push("errs", 3, [str(neg)])
    (tmp_path / "esc").mkdir()
    (tmp_path / "esc" / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"w": "../../../../etc/hostname"}})
    )
    with pytest.raises(InvalidArgument, match="outside its directory"):
        c.client.push("errs", 3, [str(tmp_path / "esc")])
    for probe, why in (
        (make_probe([], [1]), "prompt tokens"),
        (make_probe([1], [2, 3], [-0.1]), "1 log-probs for 2"),
        (make_probe([1], [2], [float("nan")], 0.1), "finite"),
        (make_probe([1], [-2]), "negative"),
    ):
        with pytest.raises(InvalidArgument, match=why):
            c.client.push("errs", 3, [str(tmp_path / "e")], probe=probe)
    with pytest.raises(NotFound):
        c.client.job("nope")
    with pytest.raises(NotFound):
        c.client.delete("no-such")
    with pytest.raises(NotFound):
        c.client.remove_instance("no-such")

    assert [(x.name, x.version, x.state) for x in c.client.checkpoints()] == before
    assert len(c.client.jobs(1000)) == njobs


def test_concurrent_update_is_refused_and_missing_engine_fails(
    cluster: Cluster, tmp_path: Path
) -> None:
    c = cluster
    c.client.push("busy", 1, [str(write_sharded(mixed_tensors(7, layers=1), tmp_path / "b"))])
    c.stop("recv-node-b-1")  # rank 3 has no engine now
    try:
        job = c.client.update("busy", ranks=[2, 3])
        with pytest.raises(FailedPrecondition, match=job.id):
            c.client.update("busy", ranks=[3])
        t0 = time.monotonic()
        done = c.client.wait(job.id, 60)
        assert done.state == tpb.JOB_FAILED
        assert "no engine connected" in done.reason and "rank 3" in done.reason
        assert time.monotonic() - t0 < 30
        # the ranks are free again, the engine on rank 2 kept its version
        assert versions(c)[2] != 0
    finally:
        c.reports[3] = c.start_receiver("node-b", 1)
    job = run(c, "busy", ranks=[2, 3])
    assert job.state == tpb.JOB_SUCCEEDED, job.reason


def test_restart_between_push_and_update(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    t = mixed_tensors(11)
    c.client.push("restart", 1, [str(write_sharded(t, tmp_path / "r"))])
    c.stop("ckptd")
    c.start_daemon("--receiver-timeout-s", "4")
    c.wait_ranks(4)  # the agents re-attached by themselves
    cp = c.client.get("restart", 1)
    assert cp.state == tpb.CHECKPOINT_READY
    job = run(c, "restart", ranks=RANKS)
    assert job.state == tpb.JOB_SUCCEEDED, job.reason
    assert hashes(c, 0) == digests(t)


def test_agent_restart_marks_shards_lost(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    c.client.push("lost", 1, [str(write_sharded(mixed_tensors(3, layers=2), tmp_path / "l"))])
    c.stop("agent-node-b")
    c.start_agent("node-b", 2)
    wait_for(lambda: c.client.get("lost", 1).state == tpb.CHECKPOINT_LOST, 60, "LOST")
    cp = c.client.get("lost", 1)
    assert any(s.state == tpb.SHARD_LOST and s.node_id == "node-b" for s in cp.shards)
    c.wait_ranks(4)
    with pytest.raises(FailedPrecondition, match="LOST"):
        c.client.update("lost", 1, ranks=[0])
    assert [d.version for d in c.client.delete("lost")] == [1]
    # a receiver that lost its worker reconnects to the new one
    t = mixed_tensors(4)
    c.client.push("after", 1, [str(write_sharded(t, tmp_path / "a"))])
    job = run(c, "after", ranks=RANKS)
    assert job.state == tpb.JOB_SUCCEEDED, job.reason


def test_trainer_push_from_process_and_delete(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    t = {
        "model.layers.0.w": torch.randn(33, 17).to(torch.bfloat16),
        "model.norm.weight": torch.randn(17),
    }
    cp = c.client.push_tensors("trainer", 1, t, directory=str(tmp_path))
    assert cp.state == tpb.CHECKPOINT_READY and cp.tensor_count == 2
    assert not list(tmp_path.glob("ckpt-push-*"))  # the staging file is gone
    job = run(c, "trainer", ranks=[0])
    assert job.state == tpb.JOB_SUCCEEDED, job.reason
    h = hashes(c, 0)
    assert {k: h[k] for k in t} == digests(t)
    deleted = c.client.delete("trainer", 1)
    assert [d.version for d in deleted] == [1]
    with pytest.raises(NotFound):
        c.client.get("trainer", 1)


def _ctl(c: Cluster, *args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run(
        [sys.executable, "-m", "ckptctl.cli", "--addr", c.addr, *args],
        capture_output=True,
        text=True,
        timeout=120,
        env=c.env if env is None else env,
    )


def test_cli(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    d = write_sharded(mixed_tensors(9, layers=1), tmp_path / "cli")

    def ctl(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
        return _ctl(c, *args, env=env)

    anonymous = {k: v for k, v in c.env.items() if k != "CKPTD_TOKEN_FILE"}
    r = ctl("get", "agents", env=anonymous)
    assert r.returncode == 3 and "UNAUTHENTICATED" in r.stderr, r.stderr  # server: 3

    r = ctl("push", "cli", "1", str(d))
    assert r.returncode == 0 and "cli@1 READY" in r.stdout, r.stderr
    assert "push cli@1" in r.stderr  # progress (lines: stderr is no terminal)
    r = ctl("get", "agents")
    assert r.returncode == 0 and "node-a" in r.stdout and "RANK" in r.stdout
    r = ctl("get", "agents", "-o", "wide")
    assert "UUID" in r.stdout and "HEARD" in r.stdout and "GB/s" in r.stdout, r.stdout
    r = ctl("delete", "agent", "node-a")  # attached: only with --force
    assert r.returncode == 3 and "FAILED_PRECONDITION" in r.stderr, r.stderr
    r = ctl("delete", "agent", "no-such-node")
    assert r.returncode == 3 and "NOT_FOUND" in r.stderr, r.stderr
    r = ctl("update", "cli@1", "--ranks", "0-1,3", "--wait", "-o", "json")  # -o anywhere
    assert r.returncode == 0, r.stderr
    job = json.loads(r.stdout)
    assert job["state"] == "JOB_SUCCEEDED" and job["ranks"] == [0, 1, 3]
    # every field, zeros included, 64-bit integers as numbers
    assert job["results"][0]["rank"] == 0 and job["results"][0]["device"] == 0
    assert isinstance(job["bytes_total"], int) and isinstance(job["version"], int)
    r = ctl("update", "cli@1", "--ranks", "0-9")
    assert r.returncode == 3 and "INVALID_ARGUMENT" in r.stderr and "out of range" in r.stderr
    for usage in (["update", "cli@x"], ["bogus"], ["update"], ["get", "bogus"],
                  ["update", "cli", "--ranks", "3-1"], ["push", "cli", "0", str(d)],
                  ["delete", "jobs", "x"], ["cancel", "a", "b", "c"], []):  # fmt: skip
        assert ctl(*usage).returncode == 2, usage
    r = ctl("get", "checkpoints", "cli", "-o", "yaml")
    assert "state: CHECKPOINT_READY" in r.stdout, r.stdout
    r = ctl("get", "cp", "cli@1", "-o", "json")  # one object, not a list
    assert json.loads(r.stdout)["version"] == 1, r.stdout
    r = ctl("-o", "json", "describe", "checkpoint", "cli@1")
    cp = json.loads(r.stdout)
    assert cp["tensors"] and all("checksum" in t for t in cp["tensors"])
    r = ctl("describe", "job", job["id"])  # table: the job as YAML
    assert r.returncode == 0 and "results:" in r.stdout and "JOB_SUCCEEDED" in r.stdout
    r = ctl("describe", "agent", "node-a", "-o", "json")
    assert json.loads(r.stdout)["node_id"] == "node-a"
    assert ctl("describe", "instance", "nope").returncode == 3
    for kind in ("jobs", "instances", "checkpoints", "all"):
        for fmt in ("table", "wide", "json", "yaml"):
            r = ctl("get", kind, "-o", fmt)
            assert r.returncode == 0, (kind, fmt, r.stderr)
    assert ctl("status").returncode == 0
    r = ctl("get", "job", job["id"])
    assert r.returncode == 0 and "SUCCEEDED" in r.stdout
    r = ctl("cancel", "job", job["id"])
    assert r.returncode == 3 and "SUCCEEDED" in r.stderr
    r = ctl("watch", job["id"], "-o", "json")
    assert r.returncode == 0 and json.loads(r.stdout)["id"] == job["id"]
    assert ctl("--version").stdout.startswith("ckptctl ")
    r = ctl("health")
    assert r.returncode == 0 and "SERVING" in r.stdout
    # get -w: the list, then each row that changes (a new version), until Ctrl-C (exit 0)
    w = subprocess.Popen(
        [sys.executable, "-m", "ckptctl.cli", "--addr", c.addr, "get", "checkpoints", "cli", "-w",
         "--interval", "0.2"], stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True,
        env=c.env,
    )  # fmt: skip
    assert w.stdout is not None
    assert w.stdout.readline().split()[:2] == ["NAME", "VERSION"]
    assert w.stdout.readline().split()[:3] == ["cli", "1", "READY"]
    c.client.push("cli", 2, [str(d)])
    seen = []  # LOADING first, maybe
    while (line := w.stdout.readline()) and line.split()[:3] != ["cli", "2", "READY"]:
        seen.append(line)
    assert line.split()[:3] == ["cli", "2", "READY"], seen
    assert all(x.split()[:2] == ["cli", "2"] for x in seen), seen  # nothing else changed
    w.send_signal(signal.SIGINT)
    assert w.wait(10) == 0
    r = ctl("delete", "checkpoint", "cli@2")
    assert r.returncode == 0 and "deleted checkpoint cli@2" in r.stdout
    r = ctl("delete", "checkpoint", "cli@1", "-o", "json")
    assert r.returncode == 0 and json.loads(r.stdout)[0]["version"] == 1
    assert ctl("get", "checkpoints", "cli").returncode == 3  # NOT_FOUND


def test_cli_completion(cluster: Cluster) -> None:
    """The script, and completion itself (bash's protocol), including names from ckptd,
    through the installed `ckptctl` command (what a shell runs)."""
    c = cluster
    binary = str(Path(sys.executable).parent / "ckptctl")
    r = subprocess.run([binary, "completion", "bash"], capture_output=True, text=True,
                       timeout=60, env=c.env)  # fmt: skip
    assert r.returncode == 0 and "_CKPTCTL_COMPLETE" in r.stdout

    def complete(line: str) -> list[str]:
        words = line.split(" ")
        env = {**c.env, "_CKPTCTL_COMPLETE": "bash_complete", "COMP_WORDS": line,
               "COMP_CWORD": str(len(words) - 1)}  # fmt: skip
        r = subprocess.run([binary], capture_output=True, text=True, timeout=60, env=env)
        return [x.partition(",")[2] for x in r.stdout.splitlines()]

    assert "update" in complete("ckptctl up")
    assert set(complete("ckptctl get ")) >= {"checkpoints", "jobs", "agents", "instances"}
    agents = complete(f"ckptctl --addr {c.addr} describe agents ")
    assert "node-a" in agents, agents


def test_cli_reports_a_failed_jobs_reason_not_its_own_deadline(cluster: Cluster) -> None:
    """The job's deadline is short, the client waits past it: a job that fails (no engine
    on the rank) exits 1 with the job's own reason. Ctrl-C while waiting leaves the job
    running and says how to follow or cancel it."""
    c = cluster
    c.start_agent("node-x", 1)
    c.wait_ranks(5)
    cmd = [sys.executable, "-m", "ckptctl.cli", "--addr", c.addr, "update", "nowait@1",
           "--ranks", "4", "--wait"]  # fmt: skip
    try:
        d = write_sharded(mixed_tensors(9, layers=1), c.root / "nowait")
        c.client.push("nowait", 1, [str(d)])
        r = subprocess.run([*cmd, "--timeout", "8"], capture_output=True, text=True,
                           timeout=120, env=c.env)  # fmt: skip
        assert r.returncode == 1, r.stderr
        assert "failed" in r.stderr and "engine" in r.stderr, r.stderr
        assert "DEADLINE_EXCEEDED" not in r.stderr

        p = subprocess.Popen([*cmd, "--timeout", "60"], stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, env=c.env)  # fmt: skip
        assert p.stderr is not None
        first = p.stderr.readline()  # the job's first progress line
        job_id = first.split()[1]
        p.send_signal(signal.SIGINT)
        _out, err = p.communicate(timeout=10)
        assert p.returncode == 130, (first, err)
        assert f"job {job_id} keeps running" in err and f"ckptctl cancel {job_id}" in err, err
        assert c.client.job(job_id).state in (tpb.JOB_PENDING, tpb.JOB_RUNNING)
        r = _ctl(c, "cancel", job_id)
        assert r.returncode == 0, r.stderr
        assert c.client.wait(job_id, 60).state == tpb.JOB_CANCELLED
    finally:
        c.stop("agent-node-x")
        c.client.remove_agent("node-x", force=True)


def test_direct_push_from_trainer_memory(cluster: Cluster) -> None:
    from ckpt.v1 import ckptd_pb2 as cpb

    c = cluster
    t = mixed_tensors(31)
    cp = c.client.push_direct("direct", 1, t, node_id="node-b", threads=4)
    assert cp.state == tpb.CHECKPOINT_READY and cp.tensor_count == len(t)
    assert {s.node_id for s in cp.shards} == {"node-b"}  # the trainer's node holds the bytes
    job = run(c, "direct", ranks=RANKS)
    assert job.state == tpb.JOB_SUCCEEDED, job.reason
    for r in RANKS:
        got = hashes(c, r)
        assert {k: got[k] for k in t} == digests(t)
    with pytest.raises(AlreadyExists):
        c.client.push_direct("direct", 1, t, node_id="node-b")
    with pytest.raises(FailedPrecondition, match="no agent"):
        c.client.push_direct("direct", 2, t, node_id="nowhere")
    with pytest.raises(NotFound):
        c.client._call("CommitPush", cpb.CommitPushRequest(name="direct", version=9))
    # a push never committed is dropped after its timeout
    meta = tpb.TensorMeta(name="w", dtype="F32", shape=[4], nbytes=16)
    c.client._call(
        "BeginPush",
        cpb.BeginPushRequest(
            name="direct", version=3, node_id="node-a", tensors=[meta], timeout_s=1
        ),
    )
    assert c.client.get("direct", 3).state == tpb.CHECKPOINT_LOADING
    wait_for(
        lambda: not [x for x in c.client.checkpoints("direct") if x.version == 3],
        30,
        "the uncommitted push to expire",
    )
    bad = tpb.TensorMeta(name="w", dtype="F32", shape=[4], nbytes=15)
    with pytest.raises(InvalidArgument, match="16 bytes"):
        c.client._call(
            "BeginPush",
            cpb.BeginPushRequest(name="direct", version=4, node_id="node-a", tensors=[bad]),
        )
