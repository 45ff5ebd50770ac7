"""The trainer SDK (ckpt_trainer): name and dtype hooks, then one-call publishes into real
receivers with retention, sync and asyncio."""

from __future__ import annotations

import asyncio

import pytest
import torch

from ckpt.v1 import types_pb2 as tpb
from ckpt_trainer import AsyncPublisher, JobOutcome, Publisher
from ckpt_trainer.publisher import prepare, strip_wrappers
from tests.support.cluster import Cluster, read_report, wait_for
from tests.support.spec import ClusterSpec, Node, Receivers
from tests.support.tensors import digests


def test_strip_wrappers() -> None:
    assert strip_wrappers("_orig_mod.module._fsdp_wrapped_module.model.w") == "model.w"
    assert strip_wrappers("model._checkpoint_wrapped_module.layers.0.w") == "model.layers.0.w"
    assert strip_wrappers("model.layers.0.submodule.w") == "model.layers.0.submodule.w"


class Sharded:
    """Duck-typed like a DTensor: full_tensor() gathers it."""

    def __init__(self, t: torch.Tensor) -> None:
        self._t = t

    def full_tensor(self) -> torch.Tensor:
        return self._t


def test_prepare_renames_drops_casts_and_gathers() -> None:
    sd = {
        "module.a": torch.ones(2, 3),
        "module.b": Sharded(torch.arange(4, dtype=torch.float32)),
        "module.step": torch.tensor(7),
        "module.drop_me": torch.zeros(1),
    }
    out = prepare(sd, lambda n: None if "drop" in n else strip_wrappers(n), "bf16")
    assert set(out) == {"a", "b", "step"}
    assert out["a"].dtype == torch.bfloat16 and out["b"].dtype == torch.bfloat16
    assert out["step"].dtype == torch.int64  # integers are not cast
    with pytest.raises(ValueError, match="two tensors map"):
        prepare({"module.a": torch.ones(1), "a": torch.ones(1)})
    with pytest.raises(TypeError):
        prepare([1, 2])


SPEC = ClusterSpec(
    receiver_timeout_s=4,
    nodes=(Node(id="node-t"),),
    receivers=(Receivers(node="node-t", instance="T"),),
)


@pytest.fixture(scope="module")
def cluster(module_cluster) -> Cluster:
    return module_cluster(SPEC, "sdk")


def model(seed: int) -> torch.nn.Module:
    torch.manual_seed(seed)
    return torch.nn.Sequential(torch.nn.Linear(64, 32), torch.nn.Linear(32, 8))


def holds(c: Cluster, sd: dict) -> bool:
    return read_report(c.reports[0]).get("tensors") == digests(sd)


@pytest.mark.slow
def test_publish_updates_and_keeps_the_last_k(cluster: Cluster) -> None:
    c = cluster
    pub = Publisher("policy", instances=["T"], keep=2, dtype="bf16", client=c.client)
    for step in (1, 2, 3):
        m = model(step)
        res = pub.publish(step, m)
        assert res.state is JobOutcome.SUCCEEDED, res.reason
        assert (res.checkpoint, res.version, res.tensors) == ("policy", step, 4)
        want = {k: v.detach().to(torch.bfloat16) for k, v in m.state_dict().items()}
        wait_for(lambda w=want: holds(c, w), 30, f"step {step}'s bytes")
    assert res.pruned == [1]
    assert [cp.version for cp in c.client.checkpoints("policy")] == [2, 3]
    inst = {i.name: i for i in c.client.instances()}["T"]
    assert (inst.checkpoint, inst.version, inst.ready) == ("policy", 3, True)


@pytest.mark.slow
def test_async_publish_and_push_only(cluster: Cluster) -> None:
    c = cluster
    apub = AsyncPublisher("policy", instances=["T"], keep=1, client=c.client)
    res = asyncio.run(apub.publish(4, model(4).state_dict()))
    assert res.state is JobOutcome.SUCCEEDED and res.pruned == [2, 3]
    only = Publisher("staged", client=c.client).publish(1, {"w": torch.ones(8)})
    assert only.state is JobOutcome.NOT_RUN
    assert c.client.get("staged", 1).state == tpb.CHECKPOINT_READY


@pytest.mark.slow
def test_vllm_trainer_api_switches_by_name(cluster: Cluster) -> None:
    """Code written for vLLM's trainer-side API: trainer_init + send_weights, backend ckptd."""
    from vllm.distributed.weight_transfer.base import ModuleSource
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

    from ckpt_trainer.vllm_trainer import CkptdTrainerInitInfo

    c = cluster
    m = model(9)
    token = str(c.token_file)
    info = CkptdTrainerInitInfo("vt", instances=["T"], addr=c.addr, token_file=token, rank=0)
    engine = WeightTransferTrainerFactory.trainer_init(info, client=None, source=ModuleSource(m))
    try:
        for _ in range(2):
            engine.send_weights()
            assert engine.last is not None and engine.last.state is JobOutcome.SUCCEEDED
            wait_for(lambda: holds(c, m.state_dict()), 30, "the module's bytes")
            with torch.no_grad():
                m[0].weight.add_(1.0)
        assert [cp.version for cp in c.client.checkpoints("vt")] == [1, 2]
        peer = WeightTransferTrainerFactory.trainer_init(
            CkptdTrainerInitInfo("vt", addr=c.addr, token_file=token, rank=1),
            client=None,
            source=ModuleSource(m),
        )
        peer.send_weights()  # a non-sender rank iterates, publishes nothing
        assert peer.last is None and len(c.client.checkpoints("vt")) == 2
    finally:
        engine.shutdown()
