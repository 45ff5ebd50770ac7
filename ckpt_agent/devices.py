"""The devices an agent reports: its GPUs (or CPU slots), their memory now and the ceilings
their workers measured."""

from __future__ import annotations

import os
from collections.abc import Mapping

from ckpt.v1 import types_pb2 as tpb
from ckpt_agent.backends.cpu import free_host_bytes
from ckpt_agent.config import AgentConfig


def node_devices(cfg: AgentConfig) -> list[tpb.Device]:
    """CUDA: the first --slots GPUs (all with 0; more slots than GPUs: ranks share them in
    turn, benchmarks emulating more ranks); CPU: --slots slots sharing the host's memory."""
    if cfg.device == "cuda":
        from ckpt_agent.backends.cuda_devices import list_devices

        devs = list_devices()
        if devs and cfg.slots > len(devs):  # ranks share GPUs (emulating more ranks)
            return [
                tpb.Device(index=i, kind="cuda", uuid=devs[i % len(devs)].uuid,
                           total_bytes=devs[i % len(devs)].total_bytes,
                           free_bytes=devs[i % len(devs)].free_bytes)
                for i in range(cfg.slots)
            ]  # fmt: skip
        return devs[: cfg.slots] if cfg.slots else devs
    total = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    return [
        tpb.Device(
            index=i,
            kind="cpu",
            uuid=f"{cfg.node_id}/{i}",
            total_bytes=total // cfg.slots,
            free_bytes=free_host_bytes() // cfg.slots,
        )
        for i in range(cfg.slots)
    ]


def refreshed(
    devices: list[tpb.Device], cfg: AgentConfig, ceilings: Mapping[int, Mapping[str, float]]
) -> list[tpb.Device]:
    """The devices with their free memory now and the ceilings their workers measured."""
    for d in devices:
        got = ceilings.get(d.index)
        if got:
            d.ceilings.clear()
            d.ceilings.update(got)
    if cfg.device == "cpu":
        free = free_host_bytes() // cfg.slots
        for d in devices:
            d.free_bytes = free
    else:
        from ckpt_agent.backends.cuda_devices import free_bytes

        for d in devices:
            d.free_bytes = free_bytes(d.index)
    return list(devices)
