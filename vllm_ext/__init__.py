"""The engine side of ckptd: a framework-agnostic receiver, the reference engine
(ckpt-receiver) and the vLLM worker extension. Imports nothing heavy at package import."""

from __future__ import annotations

from typing import Any

__all__ = ["ProbeScheduler", "WorkerExtension"]


def __getattr__(name: str) -> Any:
    if name == "WorkerExtension":
        from vllm_ext.extension import WorkerExtension

        return WorkerExtension
    if name == "ProbeScheduler":
        from vllm_ext.probe_scheduler import ProbeScheduler

        return ProbeScheduler
    raise AttributeError(name)
