"""For RL frameworks that hold vLLM in-process (`vllm.LLM`): take an update from ckptd.

    from vllm import LLM
    llm = LLM(model_dir, worker_extension_cls="vllm_ext.WorkerExtension")
    client.register_instance(Instance(name="actor-0", kind=INSTANCE_RECEIVER, ranks=[...]))
    job = update_llm(llm, client, "policy", step, instance="actor-0")

ckptd does not call a receiver-kind instance itself: this helper starts the job, then runs
`llm.collective_rpc("ckpt_update", ...)` so every worker pulls from its agent worker.
"""

from __future__ import annotations

import json
from typing import Any

from ckpt.v1 import types_pb2 as tpb
from ckpt_client.client import Client
from ckpt_common.errors import Aborted, NotFound
from ckpt_common.ipc import worker_endpoint


def instance_endpoints(client: Client, instance: str) -> list[str]:
    insts = {i.name: i for i in client.instances()}
    if instance not in insts:
        raise NotFound(f"instance {instance!r} not found")
    ipc = {a.node_id: a.ipc_dir for a in client.agents()}
    return [
        worker_endpoint(r.node_id, r.device, ipc.get(r.node_id) or None)
        for r in insts[instance].ranks
    ]


def update_llm(
    llm: Any,
    client: Client,
    checkpoint: str,
    version: int = 0,
    *,
    instance: str,
    tensors: list[str] | None = None,
    timeout_s: float = 300.0,
) -> tpb.Job:
    endpoints = instance_endpoints(client, instance)
    job = client.update(
        checkpoint, version, instances=[instance], tensors=tensors, timeout_s=timeout_s
    )
    arg = json.dumps(
        {
            "job_id": job.id,
            "endpoints": endpoints,
            "timeout_s": timeout_s,
            "checkpoint": checkpoint,
            "version": job.version,
        }
    )
    results = llm.collective_rpc("ckpt_update", args=(arg,))
    final = client.wait(job.id, timeout_s + 30)
    bad = [r for r in results if not r.get("ok")]
    if bad:
        raise Aborted(f"worker {bad[0].get('rank')}: {bad[0].get('reason')}")
    if final.state != tpb.JOB_SUCCEEDED:
        raise Aborted(f"job {final.id}: {final.reason}")
    return final
