"""Hostile input over every RPC and the agent stream, with raw stubs (the client would refuse
to build some of these): each gets its precise status, changes nothing, and the cluster
serves a normal push and update afterwards."""

from __future__ import annotations

import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import grpc
import pytest

from ckpt.v1 import agent_pb2 as apb
from ckpt.v1 import agent_pb2_grpc, ckptd_pb2_grpc
from ckpt.v1 import ckptd_pb2 as cpb
from ckpt.v1 import types_pb2 as tpb
from tests.support.cluster import Cluster, Latency, read_report, wait_for
from tests.support.spec import ClusterSpec, Node, Receivers
from tests.support.tensors import digests, mixed_tensors, write_sharded

pytestmark = pytest.mark.slow
IA = grpc.StatusCode.INVALID_ARGUMENT
NF = grpc.StatusCode.NOT_FOUND
FP = grpc.StatusCode.FAILED_PRECONDITION
PD = grpc.StatusCode.PERMISSION_DENIED
RE = grpc.StatusCode.RESOURCE_EXHAUSTED
BIG = 2**63
MAX_U64 = 2**64 - 1


SPEC = ClusterSpec(receiver_timeout_s=4, nodes=(Node(id="n1"),), receivers=(Receivers(node="n1"),))


@dataclass(frozen=True)
class Raw:
    """ckptd's API without the client: its own channel, a stub, the admin's metadata."""

    channel: grpc.Channel
    stub: ckptd_pb2_grpc.CkptStub
    md: tuple[tuple[str, str], ...]


@pytest.fixture(scope="module")
def cluster(module_cluster) -> Cluster:
    """Version 1 of "good" pushed; instance r0 (no device named) registered on n1."""
    c = module_cluster(SPEC, "bad")
    good = write_sharded(mixed_tensors(1, layers=1), c.root / "good")
    c.client.push("good", 1, [str(good)])
    c.client.register_instance(
        tpb.Instance(name="r0", kind=tpb.INSTANCE_RECEIVER, ranks=[tpb.InstanceRank(node_id="n1")])
    )
    return c


@pytest.fixture(scope="module")
def api(cluster: Cluster) -> Iterator[Raw]:
    channel = grpc.insecure_channel(cluster.addr)
    md = (("authorization", f"Bearer {cluster.token_file.read_text().strip()}"),)
    yield Raw(channel, ckptd_pb2_grpc.CkptStub(channel), md)
    channel.close()


def meta(name="w", dtype="F32", shape=(4,), nbytes=16, **piece) -> tpb.TensorMeta:
    return tpb.TensorMeta(name=name, dtype=dtype, shape=list(shape), nbytes=nbytes, **piece)


def inst(**kw) -> tpb.Instance:
    d = {"name": "x", "kind": tpb.INSTANCE_RECEIVER, "ranks": [tpb.InstanceRank(node_id="n9")]}
    d.update(kw)
    return tpb.Instance(**d)


def push(**kw) -> cpb.PushCheckpointRequest:
    d = {"name": "p", "version": 1, "sources": [tpb.Source(path="/tmp/none.safetensors")]}
    d.update(kw)
    return cpb.PushCheckpointRequest(**d)


def begin(**kw) -> cpb.BeginPushRequest:
    d = {"name": "d", "version": 1, "node_id": "n1", "tensors": [meta()]}
    d.update(kw)
    return cpb.BeginPushRequest(**d)


def update(**kw) -> cpb.UpdateRequest:
    d = {"checkpoint": "good", "version": 1, "ranks": [0]}
    d.update(kw)
    return cpb.UpdateRequest(**d)


R = tpb.InstanceRank
CASES = [
    # PushCheckpoint
    ("PushCheckpoint", push(name=""), IA),
    ("PushCheckpoint", push(name="a/b"), IA),
    ("PushCheckpoint", push(name="a\x00b"), IA),
    ("PushCheckpoint", push(name="a\nb"), IA),
    ("PushCheckpoint", push(name="x" * 300), IA),
    ("PushCheckpoint", push(name="a@b"), IA),
    ("PushCheckpoint", push(version=0), IA),
    ("PushCheckpoint", push(version=BIG), IA),
    ("PushCheckpoint", push(version=MAX_U64), IA),
    ("PushCheckpoint", push(sources=[]), IA),
    ("PushCheckpoint", push(sources=[tpb.Source(path="")]), IA),
    ("PushCheckpoint", push(sources=[tpb.Source(path="w.safetensors")]), IA),
    ("PushCheckpoint", push(sources=[tpb.Source(path="/tmp/\x1b[31m")]), IA),
    ("PushCheckpoint", push(sources=[tpb.Source(path="/" + "a" * 5000)]), IA),
    ("PushCheckpoint", push(sources=[tpb.Source(path="/etc/shadow")]), PD),
    ("PushCheckpoint", push(sources=[tpb.Source(path="/dev/zero")]), PD),
    ("PushCheckpoint", push(sources=[tpb.Source(path="/dev/shm/../etc/passwd")]), PD),
    ("PushCheckpoint", push(sources=[tpb.Source(path="/tmp/x", node_id="n7")]), IA),
    ("PushCheckpoint", push(timeout_s=-1), IA),
    ("PushCheckpoint", push(timeout_s=float("nan")), IA),
    ("PushCheckpoint", push(timeout_s=float("inf")), IA),
    ("PushCheckpoint", push(replicas=5), IA),
    ("PushCheckpoint", push(replicas=-1), IA),
    ("PushCheckpoint", push(ranks=[-1]), IA),
    ("PushCheckpoint", push(ranks=[99]), IA),
    ("PushCheckpoint", push(ranks=list(range(70000))), IA),
    ("PushCheckpoint", push(probe=tpb.Probe(expected_token_ids=[1])), IA),
    ("PushCheckpoint", push(name="good"), grpc.StatusCode.ALREADY_EXISTS),
    # BeginPush / CommitPush
    ("BeginPush", begin(tensors=[meta(shape=(1 << 40,), nbytes=4 << 40)]), RE),
    ("BeginPush", begin(tensors=[meta(nbytes=15)]), IA),
    ("BeginPush", begin(tensors=[meta(nbytes=-16)]), IA),
    ("BeginPush", begin(tensors=[meta(shape=(-4,), nbytes=16)]), IA),
    ("BeginPush", begin(tensors=[meta(dtype="F99")]), IA),
    ("BeginPush", begin(tensors=[meta(name="w\x00")]), IA),
    ("BeginPush", begin(tensors=[meta(name="")]), IA),
    ("BeginPush", begin(tensors=[meta(shape=(1,) * 40, nbytes=4)]), IA),
    ("BeginPush", begin(tensors=[]), IA),
    ("BeginPush", begin(node_id="nowhere"), FP),
    ("BeginPush", begin(version=BIG), IA),
    ("BeginPush", begin(timeout_s=-3), IA),
    ("BeginPush", begin(parts=-1), IA),
    ("BeginPush", begin(part=-1, parts=2), IA),
    ("BeginPush", begin(part=2, parts=2), IA),
    ("BeginPush", begin(part=0, parts=1 << 30), IA),
    ("BeginPush", begin(tensors=[meta(nbytes=8, piece_offset=[-1], piece_shape=[2])]), IA),
    ("BeginPush", begin(tensors=[meta(nbytes=20, piece_offset=[0], piece_shape=[5])]), IA),
    ("BeginPush", begin(tensors=[meta(nbytes=4, piece_offset=[0, 0], piece_shape=[1, 1])]), IA),
    ("BeginPush", begin(tensors=[meta(nbytes=16, piece_offset=[0], piece_shape=[2])]), IA),
    ("BeginPush", begin(tensors=[meta(nbytes=8, piece_offset=[0], piece_shape=[2])]), IA),
    ("BeginPush", begin(tensors=[meta(nbytes=8, piece_offset=[2], piece_shape=[2])] * 2), IA),
    ("CommitPush", cpb.CommitPushRequest(name="d", version=1, part=-1), IA),
    ("CommitPush", cpb.CommitPushRequest(name="never", version=1), NF),
    ("CommitPush", cpb.CommitPushRequest(name="\x07", version=1), IA),
    # reads
    ("GetCheckpoint", cpb.GetCheckpointRequest(name="none"), NF),
    ("GetCheckpoint", cpb.GetCheckpointRequest(name="good\t"), IA),
    ("GetCheckpoint", cpb.GetCheckpointRequest(name="good", version=MAX_U64), IA),
    ("ListCheckpoints", cpb.ListCheckpointsRequest(name="n" * 10000), IA),
    ("DeleteCheckpoint", cpb.DeleteCheckpointRequest(name="none"), NF),
    ("DeleteCheckpoint", cpb.DeleteCheckpointRequest(name="good", version=BIG), IA),
    # Update
    ("Update", update(checkpoint="none"), NF),
    ("Update", update(checkpoint="a/b"), IA),
    ("Update", update(version=BIG), IA),
    ("Update", update(version=9), NF),
    ("Update", update(ranks=[-5]), IA),
    ("Update", update(ranks=[10**6]), IA),
    ("Update", update(ranks=[], instances=["nope"]), NF),
    ("Update", update(ranks=[], instances=["bad name"]), IA),
    ("Update", update(method=99), IA),
    ("Update", update(bucket_bytes=-1), IA),
    ("Update", update(bucket_bytes=1), IA),
    ("Update", update(bucket_bytes=1 << 40), IA),
    ("Update", update(tensors=["p"] * 5000), IA),
    ("Update", update(tensors=[""]), IA),
    ("Update", update(tensors=[f"zz{i}." for i in range(800)]), IA),
    ("Update", update(tensors=["x" * 2000]), IA),
    ("Update", update(timeout_s=float("nan")), IA),
    # jobs
    ("GetJob", cpb.GetJobRequest(id="nope"), NF),
    ("GetJob", cpb.GetJobRequest(id="\x00"), IA),
    ("CancelJob", cpb.GetJobRequest(id="nope"), NF),
    ("ListJobs", cpb.ListJobsRequest(limit=-1), IA),
    # instances
    ("RegisterInstance", inst(name=""), IA),
    ("RegisterInstance", inst(name="a b"), IA),
    ("RegisterInstance", inst(kind=tpb.INSTANCE_VLLM, endpoint="ftp://127.0.0.1:1"), IA),
    (
        "RegisterInstance",
        inst(
            kind=tpb.INSTANCE_VLLM,
            endpoint="http://169.254.169.254:80",
            ranks=[R(node_id="n1")],
        ),
        IA,
    ),
    (
        "RegisterInstance",
        inst(kind=tpb.INSTANCE_VLLM, endpoint="http://127.0.0.1:9/x", ranks=[R(node_id="n1")]),
        IA,
    ),
    ("RegisterInstance", inst(ranks=[]), IA),
    ("RegisterInstance", inst(ranks=[R(node_id="n1", device=-1)]), IA),
    ("RegisterInstance", inst(ranks=[R(node_id="a/b")]), IA),
    ("RegisterInstance", inst(ranks=[R(node_id="n1"), R(node_id="n1")]), IA),
    ("RegisterInstance", inst(tp_size=3, ranks=[R(node_id="n1"), R(node_id="n2")]), IA),
    ("RegisterInstance", inst(kind=99), IA),
    ("RegisterInstance", inst(name="r1", ranks=[R(node_id="n1")]), FP),  # r0's device
    (
        "JoinInstance",
        cpb.JoinInstanceRequest(instance=inst(), checkpoint="good", timeout_s=-1),
        IA,
    ),
    ("JoinInstance", cpb.JoinInstanceRequest(instance=inst(name="\x01"), checkpoint="good"), IA),
    ("RemoveInstance", cpb.RemoveInstanceRequest(name="nope"), NF),
    ("RemoveInstance", cpb.RemoveInstanceRequest(name="\x7f"), IA),
    # agents
    ("RemoveAgent", cpb.RemoveAgentRequest(node_id="nope"), NF),
    ("RemoveAgent", cpb.RemoveAgentRequest(node_id="n1"), FP),
    ("RemoveAgent", cpb.RemoveAgentRequest(node_id=""), IA),
]


def state(c: Cluster) -> tuple:
    return (
        [(x.name, x.version, x.state) for x in c.client.checkpoints()],
        [(i.name, i.version, i.ready, i.endpoint) for i in c.client.instances()],
        [(a.node_id, a.state, a.host) for a in c.client.agents()],
        sorted(j.id for j in c.client.jobs(1000)),
    )


@pytest.mark.parametrize(
    "method, request_, code", CASES, ids=[f"{i}-{m}" for i, (m, _, _) in enumerate(CASES)]
)
def test_bad_request(cluster: Cluster, api: Raw, method: str, request_, code) -> None:
    c = cluster
    before = state(c)
    t0 = time.monotonic()
    call = getattr(api.stub, method)
    with pytest.raises(grpc.RpcError) as e:
        out = call(request_, metadata=api.md, timeout=20)
        if method == "WatchJob":
            list(out)
    took = time.monotonic() - t0
    assert e.value.code() == code, (e.value.code(), e.value.details())
    details = e.value.details() or ""
    assert len(details) <= 1100 and details.isprintable(), details[:200]
    assert took < 10, took
    assert state(c) == before


def test_watch_job_bad_ids(cluster: Cluster, api: Raw) -> None:
    for job_id, code in (("nope", NF), ("a\nb", IA)):
        with pytest.raises(grpc.RpcError) as e:
            list(api.stub.WatchJob(cpb.GetJobRequest(id=job_id), metadata=api.md, timeout=10))
        assert e.value.code() == code


def hello(**kw) -> apb.AgentMessage:
    d = {
        "node_id": "rogue",
        "host": "127.0.0.1",
        "devices": [tpb.Device(index=0, kind="cpu", uuid="rogue/0")],
    }
    d.update(kw)
    return apb.AgentMessage(hello=apb.Hello(**d))


ATTACH = [
    (apb.AgentMessage(heartbeat=apb.Heartbeat()), IA),
    (hello(node_id=""), IA),
    (hello(node_id="a/b"), IA),
    (hello(node_id="n\x00"), IA),
    (hello(host="127.0.0.1\n"), IA),
    (hello(devices=[]), IA),
    (hello(devices=[tpb.Device(index=-1, kind="cpu")]), IA),
    (hello(devices=[tpb.Device(index=0, kind="cpu", free_bytes=-5)]), IA),
    (hello(devices=[tpb.Device(index=0), tpb.Device(index=0)]), IA),
    (hello(devices=[tpb.Device(index=i) for i in range(2000)]), IA),
    (hello(host_free_bytes=-1), IA),
    (hello(stores=[apb.HeldStore(checkpoint="good", version=1, device=0, nbytes=-1)]), IA),
    (hello(node_id="n1"), grpc.StatusCode.ALREADY_EXISTS),  # never evicts a live agent
]


@pytest.mark.parametrize("first, code", ATTACH, ids=[str(i) for i in range(len(ATTACH))])
def test_bad_attach(cluster: Cluster, api: Raw, first: apb.AgentMessage, code) -> None:
    c = cluster
    before = state(c)
    stub = agent_pb2_grpc.AgentLinkStub(api.channel)
    with pytest.raises(grpc.RpcError) as e:
        for _ in stub.Attach(iter([first]), metadata=api.md, timeout=10):
            pass
    assert e.value.code() == code, (e.value.code(), e.value.details())
    assert state(c) == before
    assert [a.node_id for a in c.client.agents()] == ["n1"]


def test_still_healthy_after_all_that(cluster: Cluster, tmp_path: Path) -> None:
    c = cluster
    t = mixed_tensors(5, layers=1)
    c.client.push("after", 1, [str(write_sharded(t, tmp_path / "a"))])
    job = c.client.wait(c.client.update("after", 1, ranks=[0]).id, 60)
    assert job.state == tpb.JOB_SUCCEEDED, job.reason
    wait_for(lambda: read_report(c.reports[0]).get("tensors") == digests(t), 30, "the bytes")


@pytest.mark.parametrize("after_hello", [False, True])
def test_garbage_on_attach(cluster: Cluster, api: Raw, after_hello: bool) -> None:
    """Bytes that are no AgentMessage, first or after a valid Hello: INVALID_ARGUMENT,
    nothing changes, no agent stays listed."""
    c = cluster
    before = state(c)
    attach = api.channel.stream_stream(
        "/ckpt.v1.AgentLink/Attach",
        request_serializer=lambda b: b,
        response_deserializer=apb.DaemonMessage.FromString,
    )
    first = [hello(node_id="garbage").SerializeToString()] if after_hello else []

    def requests():
        yield from first
        yield b"\xff\xff\xff\xff\x0f"  # a truncated varint: no protobuf parses it
        time.sleep(5)  # the stream stays open: the status is ckptd's verdict, not EOF

    with pytest.raises(grpc.RpcError) as e:
        for _ in attach(requests(), metadata=api.md, timeout=10):
            pass
    assert e.value.code() == IA, (e.value.code(), e.value.details())
    if not after_hello:
        assert state(c) == before
    assert [a.node_id for a in c.client.agents() if a.state == tpb.AGENT_ATTACHED] == ["n1"]


def test_silent_agent_is_detached_and_spares_other_pushes(
    cluster: Cluster, api: Raw, tmp_path: Path
) -> None:
    """A principal that attaches a node and then says nothing: detached after 3 missed
    heartbeats (not the 30 s grace of an agent that has spoken), and a push to every
    attached rank succeeds afterwards without it."""
    import threading

    c = cluster
    stub = agent_pb2_grpc.AgentLinkStub(api.channel)
    quiet = threading.Event()

    def requests():
        yield hello(node_id="mute")
        quiet.wait(30)

    def attach() -> None:
        try:
            for _ in stub.Attach(requests(), metadata=api.md, timeout=30):
                pass
        except grpc.RpcError:
            pass

    th = threading.Thread(target=attach, daemon=True)
    th.start()
    try:
        wait_for(lambda: "mute" in attached(c), 10, "the mute agent to attach")
        t0 = time.monotonic()
        wait_for(lambda: "mute" not in attached(c), 15, "the mute agent to be detached")
        assert time.monotonic() - t0 < 10
        t = mixed_tensors(9, layers=1)
        cp = c.client.push("after-mute", 1, [str(write_sharded(t, tmp_path / "m"))])
        assert {s.node_id for s in cp.shards} == {"n1"}
    finally:
        quiet.set()
        th.join(10)
    c.client.delete("after-mute", 1)


def attached(c: Cluster) -> list[str]:
    return [a.node_id for a in c.client.agents() if a.state == tpb.AGENT_ATTACHED]


@pytest.mark.parametrize("mb", [60, 200, 600])
def test_a_huge_hello_neither_stalls_nor_attaches(cluster: Cluster, api: Raw, mb: int) -> None:
    """A hello of 60 MB (parsed on a thread, refused for its content), 200 MB (over the
    hello's cap: refused unread) or 600 MB (over any message's: gRPC refuses it,
    RESOURCE_EXHAUSTED): refused within seconds, and every other call is answered meanwhile
    in well under a second."""
    c = cluster
    raw = hello(node_id="huge", version="v" * (mb << 20)).SerializeToString()
    attach = api.channel.stream_stream(
        "/ckpt.v1.AgentLink/Attach",
        request_serializer=lambda b: b,
        response_deserializer=apb.DaemonMessage.FromString,
    )
    with Latency(c.client.agents) as lat:
        t0 = time.monotonic()
        with pytest.raises(grpc.RpcError) as e:
            for _ in attach(iter([raw]), metadata=api.md, timeout=30):
                pass
        took = time.monotonic() - t0
    want = IA if mb < 512 else grpc.StatusCode.RESOURCE_EXHAUSTED
    assert e.value.code() == want, (e.value.code(), e.value.details())
    assert took < 5, took
    assert lat.worst < 1.0, lat.worst
    assert attached(c) == ["n1"]
