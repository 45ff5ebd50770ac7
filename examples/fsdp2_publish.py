"""Publish from an FSDP2 job: every rank pushes its own shards into its node's host stores.

    torchrun --nproc-per-node 2 examples/fsdp2_publish.py --model DIR --name llama \
        --version 2 --instances A

Each rank loads the model, shards it with FSDP2 (`fully_shard`), and calls
`Publisher(..., sharded=True).publish(step, model)`: the local shards (DTensor pieces) go
straight into the ckpt-agent's shared memory on the rank's node ($CKPT_NODE_ID, or the host
name), ckptd commits the version once every rank is in, and rank 0 updates the instances.
Works with gloo on CPU and NCCL on GPUs. ckptd's address and token come from CKPTD_ADDR and
CKPTD_TOKEN_FILE (ckpt_common.credentials).
"""

from __future__ import annotations

import argparse
import json
import os
from typing import Any


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--model", required=True, help="a transformers model directory")
    p.add_argument("--name", required=True)
    p.add_argument("--version", type=int, required=True)
    p.add_argument("--instances", default="", help="comma-separated; empty: push only")
    p.add_argument("--dtype", default=None, help="cast floating tensors (bf16, fp16, fp32)")
    p.add_argument("--result", default="", help="write each rank's result here (JSON)")
    p.add_argument(
        "--vllm-api",
        action="store_true",
        help="publish through vLLM's trainer-side API (WeightTransferTrainerFactory)",
    )
    a = p.parse_args()

    import torch
    import torch.distributed as dist
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard
    from transformers import AutoModelForCausalLM

    from ckpt_trainer import Publisher

    cuda = torch.cuda.is_available()
    dist.init_process_group("nccl" if cuda else "gloo")
    if cuda:
        torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
    mesh = init_device_mesh("cuda" if cuda else "cpu", (dist.get_world_size(),))
    model = AutoModelForCausalLM.from_pretrained(a.model, dtype=torch.float32)
    for layer in model.model.layers:
        fully_shard(layer, mesh=mesh)
    fully_shard(model, mesh=mesh)

    instances = [i for i in a.instances.split(",") if i]
    if a.vllm_api:
        res = publish_with_vllm_api(a, model, instances)
    else:
        pub = Publisher(a.name, instances=instances, dtype=a.dtype, sharded=True, keep=3)
        res = pub.publish(a.version, model)
        pub.close()
    if a.result:
        with open(f"{a.result}.{dist.get_rank()}", "w") as f:
            json.dump({"state": res.state.value, "reason": res.reason, "push_s": res.push_s,
                       "update_s": res.update_s, "tensors": res.tensors, "bytes": res.bytes},
                      f)  # fmt: skip
    dist.barrier()  # no rank tears the group down while another still uses it
    dist.destroy_process_group()


def publish_with_vllm_api(a: argparse.Namespace, model: Any, instances: list[str]) -> Any:
    """The same through vLLM's trainer-side API: code written for it switches by init info."""
    import torch.distributed as dist
    from vllm.distributed.weight_transfer.base import ModuleSource
    from vllm.distributed.weight_transfer.factory import WeightTransferTrainerFactory

    from ckpt_trainer.vllm_trainer import CkptdTrainerInitInfo

    info = CkptdTrainerInitInfo(
        a.name, instances=instances, rank=dist.get_rank(), sharded=True, dtype=a.dtype,
        start_version=a.version, keep=3,
    )  # fmt: skip
    engine = WeightTransferTrainerFactory.trainer_init(
        info, client=None, source=ModuleSource(model)
    )
    engine.send_weights()
    engine.shutdown()
    return engine.last


if __name__ == "__main__":
    main()
