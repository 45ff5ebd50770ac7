"""The vLLM worker extension: `--worker-extension-cls vllm_ext.WorkerExtension`.

vLLM mixes this class into its worker, so `self` is the worker (self.model_runner,
self.rank, self.vllm_config). ckptd reaches `ckpt_update` through `/collective_rpc` (server,
VLLM_SERVER_DEV_MODE=1, behind vllm_ext.guard) or `LLM.collective_rpc` (offline; see
vllm_ext.offline). Every worker of the engine takes the update from the agent worker on its
own device: ckptd passes the agents' endpoints in engine rank order, and worker `self.rank`
takes its own. The update itself is vllm_ext.engine_update, shared with the `ckptd`
weight-transfer backend (vllm_ext.transfer_engine).

Method names start with `ckpt_`: vLLM worker methods (update_weights, reload_weights...)
must not be shadowed.
"""

from __future__ import annotations

import json
from typing import Any

from vllm_ext.engine_update import EngineUpdate


class WorkerExtension:
    def ckpt_update(self, arg: str) -> dict:
        """Takes one update. arg: JSON {job_id, endpoints, timeout_s, checkpoint, version}.
        Returns a plain dict (JSON-safe) that ckptd checks for every worker."""
        return self._ckpt().update(json.loads(arg), int(getattr(self, "rank", 0)))

    def ckpt_info(self) -> dict:
        """What this worker serves, as far as ckptd's updates went."""
        return self._ckpt().info(int(getattr(self, "rank", 0)))

    def ckpt_layout(self, arg: str) -> dict:
        """This worker's sharding map (vllm_ext.layout) for the checkpoint tensors in arg:
        JSON [[name, dtype, shape], ...]. Returns {rank, keeps: {name: "whole" | [offset,
        shape]}}; a tensor this rank keeps nothing of is absent."""
        from vllm_ext.layout import capture

        runner: Any = self.model_runner  # type: ignore[attr-defined]
        tensors = [(str(n), str(d), [int(x) for x in s]) for n, d, s in json.loads(arg)]
        device = getattr(self, "device", None) or "cpu"
        return {
            "rank": int(getattr(self, "rank", 0)),
            "keeps": capture(runner.model, tensors, device),
        }

    def _ckpt(self) -> EngineUpdate:
        up = getattr(self, "_ckpt_update", None)
        if up is None:
            runner: Any = self.model_runner  # type: ignore[attr-defined]

            def reload(model: Any, tensors: Any) -> None:
                runner.reload_weights(weights_iterator=tensors, is_checkpoint_format=True)

            up = self._ckpt_update = EngineUpdate(
                self.vllm_config,  # type: ignore[attr-defined]
                lambda: runner.model,
                getattr(self, "device", None),
                reload,
            )
        return up
