"""Triggers inference engines to pull an update from their agent workers.

INSTANCE_RECEIVER instances drive themselves (they wait on their worker's socket), so only
vLLM servers are called, over their HTTP API.
"""

from __future__ import annotations

from ckpt_daemon.model import Instance, Job
from ckpt_daemon.registry import Registry


class EngineTrigger:
    def __init__(self, registry: Registry) -> None:
        self._registry = registry

    async def trigger(self, instance: Instance, job: Job, timeout: float) -> None:
        return None
