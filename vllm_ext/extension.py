"""The vLLM worker extension: `--worker-extension-cls vllm_ext.WorkerExtension`.

vLLM mixes this class into its worker, so `self` is the worker (self.model_runner,
self.rank, self.vllm_config). ckptd reaches `ckpt_update` through `/collective_rpc` (server,
VLLM_SERVER_DEV_MODE=1) or `LLM.collective_rpc` (offline; see vllm_ext.offline). Every
worker of the engine takes the update from the agent worker on its own device: ckptd passes
the agents' endpoints in engine rank order, and worker `self.rank` takes its own.

Loading goes through `model_runner.reload_weights(weights_iterator=...,
is_checkpoint_format=True)`: vLLM's in-place path, which buffers a layer's tensors until the
layer is complete and runs post-load processing (repacking on CPU, quantized layers on GPU).
`vllm_ext.post_load` does what that path leaves undone (the fused-MoE experts' prepack,
layers that share a loaded layer's weights such as a tied lm_head); `vllm_ext.coverage`
refuses partial updates that would leave an engine layer half loaded.
The receiver never reuses a buffer slot while a layer that points into it is incomplete: the
planner keeps layers inside one bucket, and tensors whose layer spans buckets are copied.
Where reload_weights is missing, `model.load_weights` + post-processing is the fallback.

Method names start with `ckpt_`: vLLM worker methods (update_weights, reload_weights...)
must not be shadowed.
"""

from __future__ import annotations

import json
import os
import time
from collections.abc import Iterator
from typing import Any

from ckpt_common.ipc import endpoint_refusal
from vllm_ext.receiver import Receiver, UpdateInfo

STEP_TIMEOUT_S = 30.0


class WorkerExtension:
    # --------------------------------------------------------------- entry points

    def ckpt_update(self, arg: str) -> dict:
        """Takes one update. arg: JSON {job_id, endpoints, timeout_s, checkpoint, version}.
        Returns a plain dict (JSON-safe) that ckptd checks for every worker."""
        spec = json.loads(arg)
        rank = int(getattr(self, "rank", 0))
        t0 = time.monotonic()
        endpoints = spec.get("endpoints") or []
        if rank >= len(endpoints):
            return {
                "ok": False,
                "rank": rank,
                "reason": f"worker rank {rank} has no endpoint ({len(endpoints)} given)",
                "touched": False,
            }
        why = endpoint_refusal(str(endpoints[rank]))
        if why:
            return {"ok": False, "rank": rank, "reason": why, "touched": False}
        timeout = float(spec.get("timeout_s") or 300.0)
        # Between two steps of an update (bucket to bucket) a healthy worker takes well
        # under a second; a frozen one must not hold the engine for the whole job.
        step = min(timeout, float(spec.get("step_timeout_s") or STEP_TIMEOUT_S))
        recv = self._ckpt_receiver(endpoints[rank])
        try:
            done = recv.receive(
                load=self._ckpt_load,
                validate=self._ckpt_validate,
                job_id=spec.get("job_id", ""),
                wait_s=min(60.0, timeout),
                step_timeout_s=step,
            )
        except TimeoutError as e:  # no update started: nothing was loaded
            recv.reset()
            return {"ok": False, "rank": rank, "reason": str(e), "touched": False}
        except Exception as e:  # never raise through collective_rpc: say what happened
            recv.reset()
            return {"ok": False, "rank": rank, "reason": f"{type(e).__name__}: {e}"}
        return {
            "ok": bool(done.ok),
            "touched": bool(done.touched),  # False: it can serve on (nothing was loaded)
            "rank": rank,
            "reason": done.reason,
            "checkpoint": done.checkpoint,
            "version": int(done.version),
            "seconds": round(time.monotonic() - t0, 4),
        }

    def ckpt_info(self) -> dict:
        """What this worker serves, as far as ckptd's updates went."""
        st = self._ckpt_state()
        return {
            "rank": int(getattr(self, "rank", 0)),
            "checkpoint": st["checkpoint"],
            "version": st["version"],
            "updates": st["updates"],
            "pid": os.getpid(),
        }

    # --------------------------------------------------------------- internals

    def _ckpt_state(self) -> dict:
        st = getattr(self, "_ckpt_st", None)
        if st is None:
            st = {
                "checkpoint": "",
                "version": 0,
                "updates": 0,
                "receiver": None,
                "expected": None,
                "feeds": None,
            }
            self._ckpt_st = st
        return st

    def _ckpt_receiver(self, endpoint: str) -> Receiver:
        st = self._ckpt_state()
        r = st["receiver"]
        if r is None or r.endpoint != endpoint:
            if r is not None:
                r.close()
            device = getattr(self, "device", None)
            if device is not None and getattr(device, "type", "cpu") == "cpu":
                device = None
            r = st["receiver"] = Receiver(endpoint, engine="vllm", device=device)
        return r

    def _ckpt_expected(self) -> dict[str, tuple[int, ...]] | None:
        """Checkpoint-format names and shapes the model takes: the model directory's
        safetensors headers when it has them (exact); None when unknown."""
        st = self._ckpt_state()
        if st["expected"] is None:
            from vllm_ext.model_names import expected_from_model

            st["expected"] = expected_from_model(self.vllm_config, self.model_runner.model)
        return st["expected"] or None

    def _ckpt_validate(self, info: UpdateInfo) -> str | None:
        from vllm_ext.model_names import check_names

        expected = self._ckpt_expected()
        problem = check_names(info.tensors, expected, self.model_runner.model, partial=info.partial)
        if problem or not info.partial:
            return problem
        return self._ckpt_check_layers({t.name for t in info.tensors}, expected)

    def _ckpt_check_layers(self, names: set[str], expected: dict | None) -> str | None:
        """A partial update must fill every engine layer it touches (vllm_ext.coverage)."""
        from vllm_ext.coverage import incomplete_layers, module_feeds

        st = self._ckpt_state()
        if st.get("feeds") is None:
            if not expected:
                return "partial update refused: the engine's checkpoint tensors are unknown"
            try:
                st["feeds"] = module_feeds(self.model_runner.model, expected)
            except Exception as e:  # a model whose loading cannot be traced on meta
                return f"partial update refused: cannot map tensors to engine layers ({e!r})"
        return incomplete_layers(names, st["feeds"])

    def _ckpt_load(self, info: UpdateInfo, tensors: Iterator[tuple[str, Any]]) -> None:
        runner = self.model_runner
        model = runner.model
        if hasattr(runner, "reload_weights"):
            from vllm_ext.post_load import PostLoad

            with PostLoad(model) as post:
                runner.reload_weights(weights_iterator=tensors, is_checkpoint_format=True)
            post.finish()
        else:  # older vLLM: a full load and a full post-load pass
            from vllm.model_executor.model_loader.utils import process_weights_after_loading

            model.load_weights(tensors)
            process_weights_after_loading(model, self.vllm_config.model_config, self.device)
        st = self._ckpt_state()
        st["checkpoint"], st["version"] = info.checkpoint, int(info.version)
        st["updates"] += 1
