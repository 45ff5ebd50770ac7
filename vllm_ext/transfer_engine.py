"""The `ckptd` weight-transfer backend for vLLM's native API (vllm.distributed.weight_transfer).

    vllm serve MODEL --weight-transfer-config '{"backend": "ckptd"}' ...

registered through the `vllm.general_plugins` entry point (vllm_ext.plugin). ckptd drives an
engine started with it through vLLM's own endpoints: /pause, /init_weight_transfer_engine,
/start_weight_update, /update_weights (update_info: the job's id, the agents' endpoints in
engine rank order, deadlines, checkpoint@version), /finish_weight_update (weight_version
"checkpoint@version"), /resume; vLLM's weight-operation metrics and /weight_info follow.
Every worker takes its part from the agent worker on its own device exactly as the worker
extension does (vllm_ext.engine_update: names and shapes validated and checksums verified
before anything is loaded). A failed update raises out of /update_weights (HTTP 500); ckptd
reads the engine's own reason, and whether it loaded anything, from the agent's side.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any

import torch
from vllm.distributed.weight_transfer.base import (
    WeightTransferEngine,
    WeightTransferInitInfo,
    WeightTransferUpdateInfo,
)

from vllm_ext.engine_update import EngineUpdate

BACKEND = "ckptd"


@dataclass
class CkptdInitInfo(WeightTransferInitInfo):
    """Nothing to rendezvous: the agent workers are found per update."""


@dataclass
class CkptdUpdateInfo(WeightTransferUpdateInfo):
    job_id: str
    endpoints: list[str] = field(default_factory=list)  # agent workers, engine rank order
    timeout_s: float = 300.0
    step_timeout_s: float = 0.0
    checkpoint: str = ""
    version: int = 0


class UpdateFailed(RuntimeError):
    """An update this worker could not take (vLLM answers 500; the reason is in the log and,
    for ckptd, on the agent's side)."""


class CkptdWeightTransferEngine(WeightTransferEngine[CkptdInitInfo, CkptdUpdateInfo]):
    init_info_cls = CkptdInitInfo
    update_info_cls = CkptdUpdateInfo
    supports_draft_weight_update = False

    def __init__(self, config: Any, vllm_config: Any, device: torch.device, model: Any) -> None:
        super().__init__(config, vllm_config, device, model)
        self._update = EngineUpdate(vllm_config, lambda: self.model, device)
        self.last: dict = {}

    def init_transfer_engine(self, init_info: CkptdInitInfo) -> None:
        pass

    def start_weight_update(self) -> None:
        pass  # the receive validates before it loads, and reloads layer by layer itself

    def receive_weights(self, update_info: CkptdUpdateInfo) -> None:
        rank = int(self.parallel_config.rank)
        self.last = self._update.update(dataclasses.asdict(update_info), rank)
        if not self.last.get("ok"):
            raise UpdateFailed(
                f"worker {rank}: {self.last.get('reason')} "
                f"(touched={self.last.get('touched', True)})"
            )

    def finish_weight_update(self) -> None:
        pass

    def shutdown(self) -> None:
        r = self._update._receiver
        if r is not None:
            r.close()
